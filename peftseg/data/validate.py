"""Eager checks of a COCO instances json + image folder: bad data fails before a model is built.

Each failure is a UserError that names the offending path and the fix; `fix_json` and
`fix_images` say how the user points the run at the right file or folder, which
depends on how the dataset was configured.

Beyond the format, `check_split` checks what detectron2 would otherwise only trip over
mid-training (or silently mistrain on): every image's header (readable, size equal to the
json's after EXIF orientation, a mode that converts to RGB without garbling), the json's
consistency (unique ids, references to existing images and categories, segmentation present
and well-formed, boxes finite) and non-empty val annotations. Problems that would break or
falsify training are errors, listed one per line with file, id and fix; problems detectron2
handles harmlessly (crowd regions, empty train images, degenerate extra polygons, boxes past
the edge that it clips, categories no annotation uses) are counted and returned as notes for
the log and the record; an unused category that is the supercategory of others (Roboflow
exports list the dataset as category 0) is reported so that it does not become a class.
Only headers are read (PIL opens lazily), in a thread pool: fast on large datasets.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from peftseg.data.images import ALPHA, ROTATED, pixel_problem, read_header
from peftseg.errors import UserError

_REQUIRED_KEYS = ("images", "annotations", "categories")
_SHOW_MISSING = 5
_SHOW_PROBLEMS = 10


@dataclass
class SplitCheck:
    categories: tuple[tuple[int, str], ...]
    mask_format: str = "polygon"  # "bitmask" when any annotation is RLE (detectron2 needs it)
    notes: dict[str, int] = field(default_factory=dict)  # harmless problems by kind: counts
    # the json lacks iscrowd/area, which pycocotools' COCOeval reads: evaluate from detectron2's
    # own conversion of the loaded dicts (convert_to_coco_json fills both) instead of the file
    needs_defaults: bool = False
    # categories no annotation of the split uses that are the `supercategory` of other categories
    # (Roboflow-style exports list the dataset itself as category 0): (id, name, subcategory names)
    unused_parents: tuple[tuple[int, str, tuple[str, ...]], ...] = ()


def _load(json_path: str, split: str, fix_json: str) -> dict:
    if not os.path.exists(json_path):
        raise UserError(f"The {split} annotation file {json_path} does not exist. {fix_json}")
    if not os.path.isfile(json_path):
        raise UserError(
            f"The {split} annotation path {json_path} is not a file (a folder?). {fix_json}"
        )
    try:
        with open(json_path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(
            f"The {split} annotation file {json_path} is not valid JSON: {e.msg} at line "
            f"{e.lineno} column {e.colno} (char {e.pos}). Repair or re-export the file. "
            f"{fix_json}"
        ) from e
    except UnicodeDecodeError as e:
        raise UserError(
            f"The {split} annotation file {json_path} is not valid JSON: it is not UTF-8 text "
            f"(byte {e.start}); is it an image or an archive? {fix_json}"
        ) from e


def _not_coco(json_path: str, split: str, problem: str, fix_json: str) -> UserError:
    return UserError(
        f"The {split} annotation file {json_path} is not in COCO instances format: {problem}. "
        "A COCO instances json is an object with 'images', 'annotations' and 'categories' "
        "lists, each category with an 'id' and a 'name' (https://cocodataset.org/#format-data); "
        f"convert the labels to that format. {fix_json}"
    )


def _categories(coco, json_path: str, split: str, fix_json: str) -> list[tuple[int, str]]:
    if not isinstance(coco, dict):
        raise _not_coco(json_path, split, f"its top level is a {type(coco).__name__}", fix_json)
    missing = [k for k in _REQUIRED_KEYS if k not in coco]
    if missing:
        keys = ", ".join(f"'{k}'" for k in missing)
        raise _not_coco(json_path, split, f"it lacks the key(s) {keys}", fix_json)
    bad = [k for k in _REQUIRED_KEYS if not isinstance(coco[k], list)]
    if bad:
        raise _not_coco(json_path, split, f"'{bad[0]}' is not a list", fix_json)
    if not coco["categories"]:
        raise _not_coco(json_path, split, "its 'categories' list is empty", fix_json)
    if not coco["images"]:
        raise _not_coco(json_path, split, "its 'images' list is empty", fix_json)
    cats = coco["categories"]
    if not all(isinstance(c, dict) and "id" in c and "name" in c for c in cats):
        raise _not_coco(json_path, split, "a category lacks its 'id' or 'name'", fix_json)
    if not all(isinstance(im, dict) and "file_name" in im for im in coco["images"]):
        raise _not_coco(json_path, split, "an image entry lacks its 'file_name'", fix_json)
    if not all(isinstance(c["id"], int) and not isinstance(c["id"], bool) for c in cats):
        bad = next(c["id"] for c in cats if not isinstance(c["id"], int) or isinstance(c["id"], bool))
        raise _not_coco(json_path, split, f"category id {bad!r} is not an integer (COCO ids are numbers)", fix_json)
    ids = Counter(c["id"] for c in cats)
    names = Counter(str(c["name"]) for c in cats)
    dup_ids = [i for i, n in ids.items() if n > 1]
    dup_names = [name for name, n in names.items() if n > 1]
    if dup_ids or dup_names:
        what = "; ".join(
            [f"category id {i} is listed {ids[i]} times" for i in dup_ids[:3]]
            + [f"{names[name]} categories are named {name!r} (ids "
               f"{', '.join(str(c['id']) for c in cats if str(c['name']) == name)})" for name in dup_names[:3]])
        raise UserError(
            f"The {split} annotation file {json_path} has duplicate categories: {what}. Each class needs one id and "
            "one name, or its annotations are split between two classes and one class's AP disappears from the "
            f"per-class table; merge the duplicates (and re-point their annotations' category_id). {fix_json}"
        )
    # Detectron2 orders classes by category id; so do we.
    return sorted((c["id"], str(c["name"])) for c in cats)


def _check_images(coco: dict, json_path: str, image_root: str, split: str, fix_images: str):
    present = set(os.listdir(image_root))
    names = [im["file_name"] for im in coco["images"]]
    # A listing answers flat folders at once; names with sub-folders need a stat each.
    missing = [
        n for n in names
        if n not in present and not ("/" in n and os.path.isfile(os.path.join(image_root, n)))
    ]
    if missing:
        shown = ", ".join(missing[:_SHOW_MISSING])
        shown += ", ..." if len(missing) > _SHOW_MISSING else ""
        raise UserError(
            f"{len(missing)} of {len(names)} images listed in the {split} annotation file "
            f"{json_path} are missing from {image_root}: {shown}. The json's file_name values "
            f"are relative to the image folder. {fix_images}"
        )


def _finite(values) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)


def _inside(root: str, name: str) -> bool:
    if os.path.isabs(name):
        return False
    root = os.path.realpath(root)
    return os.path.commonpath([root, os.path.realpath(os.path.join(root, name))]) == root


def _check_image_headers(coco: dict, image_root: str, problems: list, notes: Counter, split: str) -> None:
    images = coco["images"]
    paths = [os.path.join(image_root, im["file_name"]) for im in images]
    workers = min(16, max(1, len(images) // 64 + 1))
    with ThreadPoolExecutor(workers) as pool:  # header reads are I/O-bound: threads overlap the waits
        headers = list(pool.map(read_header, paths))  # the one reader's checks (data/images.py)
    for im, path, header in zip(images, paths, headers):
        where = f"image id {im.get('id')} ({path})"
        if isinstance(header, str):
            problems.append(f"{where} is not a readable image ({header}); replace the file or remove the image "
                            "and its annotations from the json")
            continue
        w, h, mode, orientation = header.width, header.height, header.mode, header.orientation
        jw, jh = im.get("width"), im.get("height")
        if not (isinstance(jw, int) and isinstance(jh, int)):
            problems.append(f"{where} has no integer width/height in the json (got {jw!r}, {jh!r}); set them to "
                            f"width={w}, height={h}")
        elif (jw, jh) != (w, h):
            rotated = (jh, jw) == (w, h) and orientation in ROTATED
            why = (f"its EXIF orientation {orientation} rotates it to {w}x{h} when loaded, but the json has "
                   f"the unrotated {jw}x{jh}; set width={w}, height={h} in the json if the annotations were made "
                   "on the rotated view, or save the image without the EXIF orientation tag if they were made "
                   "on the stored pixels") if rotated else (
                   f"it is {w}x{h} but the json says {jw}x{jh}; fix width/height in the json or replace the image")
            problems.append(f"{where}: {why}")
        if mode in ALPHA:
            notes["images with an alpha channel (dropped when converted to RGB)"] += 1
        problem = pixel_problem(header)  # 16-bit/float pixels, decompression bombs, degenerate sizes
        if problem:
            problems.append(f"{where} {problem}")


def _check_segmentation(ann: dict, image: dict, where: str, problems: list, notes: Counter) -> str | None:
    """Problems of one annotation's segmentation; its kind ("polygon"/"rle") when well-formed."""
    seg = ann.get("segmentation")
    if seg is None or seg == [] or seg == {}:
        problems.append(f"{where} has no segmentation; this project trains instance masks, so give every "
                        "annotation a polygon or RLE mask (or remove box-only annotations)")
        return None
    if isinstance(seg, dict):
        counts, size = seg.get("counts"), seg.get("size")
        if not isinstance(counts, (str, list)) or not (isinstance(size, list) and len(size) == 2):
            problems.append(f"{where} has an RLE segmentation without 'counts' (string or list) and "
                            "'size' [height, width]; re-export the masks in COCO RLE form")
            return None
        if list(size) != [image.get("height"), image.get("width")]:
            problems.append(f"{where} has an RLE mask of size {size} (height, width) on an image of "
                            f"{image.get('height')}x{image.get('width')}; re-export the mask at the image's size")
            return None
        if isinstance(counts, list) and not (all(isinstance(c, int) and c >= 0 for c in counts)
                                             and sum(counts) == size[0] * size[1]):
            problems.append(f"{where} has an uncompressed RLE whose run lengths do not add up to "
                            f"{size[0]}x{size[1]} pixels; re-export the mask")
            return None
        return "rle"
    if not isinstance(seg, list) or not all(isinstance(p, list) for p in seg):
        problems.append(f"{where} has a segmentation that is neither a list of polygons nor an RLE object; "
                        "use [[x1, y1, x2, y2, ...], ...] or {'counts': ..., 'size': [h, w]}")
        return None
    if not all(_finite(p) for p in seg):
        problems.append(f"{where} has a polygon with non-numeric, NaN or infinite coordinates; fix or drop it")
        return None
    good = [p for p in seg if len(p) >= 6 and len(p) % 2 == 0]
    if not good:
        problems.append(f"{where} has no polygon with at least 3 points (an even count of >= 6 numbers); "
                        "fix the polygon or drop the annotation")
        return None
    if len(good) < len(seg):
        notes["polygons with fewer than 3 points beside valid ones (dropped by detectron2)"] += 1
    return "polygon"


def _check_annotations(coco: dict, split: str, problems: list, notes: Counter) -> str:
    images = {im.get("id"): im for im in coco["images"]}
    id_types = sorted({type(im.get("id")).__name__ for im in coco["images"]})
    if id_types != ["int"]:
        problems.append(f"image ids are of type(s) {', '.join(id_types)}; COCO image ids are integers (and "
                        "pycocotools matches predictions by id, so 1 and \"1\" are different images): write "
                        "every image 'id' and annotation 'image_id' as a number")
    if len(images) != len(coco["images"]):
        dup = [i for i, n in Counter(im.get("id") for im in coco["images"]).items() if n > 1]
        problems.append(f"image ids {dup[:5]} occur more than once in 'images'; give every image a unique id")
    ann_ids = Counter(a.get("id") for a in coco["annotations"] if isinstance(a, dict))
    dup = [i for i, n in ann_ids.items() if n > 1]
    if dup:
        problems.append(f"annotation ids {dup[:5]} occur more than once; give every annotation a unique id "
                        "(COCOeval matches by id)")
    categories = {c["id"] for c in coco["categories"]}
    filled = Counter()  # keys COCOeval needs that the json leaves out, per key
    kinds, used = Counter(), 0
    annotated = set()
    for ann in coco["annotations"]:
        if not isinstance(ann, dict):
            problems.append(f"an entry of 'annotations' is a {type(ann).__name__}, not an object; remove it")
            continue
        where = f"annotation id {ann.get('id')} (image id {ann.get('image_id')})"
        image = images.get(ann.get("image_id"))
        if image is None:
            problems.append(f"{where} refers to an image id that 'images' does not list; fix its image_id or "
                            "remove the annotation")
            continue
        if ann.get("category_id") not in categories:
            problems.append(f"{where} has category_id {ann.get('category_id')!r}, which 'categories' does not "
                            f"list (ids: {sorted(categories)[:10]}); add the category or fix the id")
            continue
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and _finite(bbox)):
            problems.append(f"{where} has bbox {bbox!r}; a COCO box is 4 finite numbers [x, y, width, height]")
            continue
        # what many converters leave out: detectron2 assumes iscrowd 0 and computes the area from the mask
        if "iscrowd" not in ann:
            filled["iscrowd"] += 1
        elif ann["iscrowd"] not in (0, 1) or isinstance(ann["iscrowd"], (str, float)):
            problems.append(f"{where} has iscrowd {ann['iscrowd']!r}; it must be the number 0 or 1 (a text "
                            "\"0\" counts as true, making the object a crowd region); write it as a number")
            continue
        if "area" not in ann:
            filled["area"] += 1
        elif not (_finite([ann["area"]]) and ann["area"] >= 0):
            problems.append(f"{where} has area {ann['area']!r}; COCOeval needs a number >= 0 (the mask's pixel "
                            "count) or none at all: fix it or delete the key and peftseg lets detectron2 compute it")
            continue
        if ann.get("iscrowd", 0):
            notes["crowd annotations (ignored in training, as in COCO)"] += 1
            continue
        x, y, w, h = bbox
        iw, ih = image.get("width"), image.get("height")
        if w <= 0 or h <= 0:
            notes["boxes of zero width or height (dropped by detectron2)"] += 1
        elif isinstance(iw, int) and isinstance(ih, int):
            if x >= iw or y >= ih or x + w <= 0 or y + h <= 0:
                problems.append(f"{where} has bbox {bbox} entirely outside its {iw}x{ih} image; fix the box "
                                "(is it [x, y, width, height]?) or remove the annotation")
                continue
            if x < -1 or y < -1 or x + w > iw + 1 or y + h > ih + 1:
                notes["boxes past the image edge (clipped by detectron2)"] += 1
        kind = _check_segmentation(ann, image, where, problems, notes)
        if kind:
            kinds[kind] += 1
            used += 1
            annotated.add(ann["image_id"])
    if split == "val" and used == 0:
        problems.append("the val split has no usable (non-crowd, well-formed) annotation, so every AP would be "
                        "empty; give the val json the annotations of its images")
    if split == "train" and len(annotated) < len(images):
        notes["train images without annotations (skipped in training)"] += len(images) - len(annotated)
    if filled["iscrowd"]:
        notes["annotations without 'iscrowd' (0 assumed, as detectron2 does)"] += filled["iscrowd"]
    if filled["area"]:
        notes["annotations without 'area' (computed from the mask for evaluation)"] += filled["area"]
    return "bitmask" if kinds["rle"] else "polygon"


def problem_list(problems: list[str]) -> str:
    """"N problem(s):" and the first ones, one per line (the rest counted)."""
    shown = "\n  - ".join(problems[:_SHOW_PROBLEMS])
    more = f"\n  (and {len(problems) - _SHOW_PROBLEMS} more)" if len(problems) > _SHOW_PROBLEMS else ""
    return f"{len(problems)} problem(s):\n  - {shown}{more}"


def check_split(
    json_path: str, image_root: str, split: str, fix_json: str, fix_images: str
) -> SplitCheck:
    """Validate one split; its categories (sorted (id, name) pairs), mask format and notes."""
    coco = _load(json_path, split, fix_json)
    categories = _categories(coco, json_path, split, fix_json)
    if not os.path.isdir(image_root):
        raise UserError(f"The {split} image folder {image_root} does not exist. {fix_images}")
    outside = [im["file_name"] for im in coco["images"] if not _inside(image_root, str(im["file_name"]))]
    if outside:
        raise UserError(
            f"{len(outside)} file_name values of the {split} annotation file {json_path} point outside the "
            f"image folder {image_root} (e.g. {outside[0]!r}: an absolute path or '..'); file_name is relative "
            f"to the image folder, so move the images into it and give their relative names. {fix_images}"
        )
    _check_images(coco, json_path, image_root, split, fix_images)
    problems: list[str] = []
    notes: Counter = Counter()
    mask_format = _check_annotations(coco, split, problems, notes)
    _check_image_headers(coco, image_root, problems, notes, split)
    if problems:
        raise UserError(f"The {split} data ({json_path}, images in {image_root}) has {problem_list(problems)}")
    needs_defaults = any(kind.startswith("annotations without") for kind in notes)
    unused_parents = _unused_categories(coco, categories, notes)
    return SplitCheck(tuple(categories), mask_format, dict(notes), needs_defaults, unused_parents)


def _unused_categories(coco: dict, categories: list[tuple[int, str]], notes: Counter) -> tuple:
    """Names the categories no annotation uses in `notes`; returns those of them that are the
    supercategory of other categories (unused_parents)."""
    used = {a.get("category_id") for a in coco["annotations"] if isinstance(a, dict)}
    unused = [(cid, name) for cid, name in categories if cid not in used]
    if not unused:
        return ()
    shown = ", ".join(f"{name!r} (id {cid})" for cid, name in unused[:_SHOW_MISSING])
    shown += f" and {len(unused) - _SHOW_MISSING} more" if len(unused) > _SHOW_MISSING else ""
    notes[f"categories no annotation uses: {shown}"] += len(unused)
    children: dict[str, list[str]] = {}
    for c in coco["categories"]:
        parent = c.get("supercategory")
        if isinstance(parent, str) and parent != str(c["name"]):
            children.setdefault(parent, []).append(str(c["name"]))
    return tuple((cid, name, tuple(children[name])) for cid, name in unused if children.get(name))
