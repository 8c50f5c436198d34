"""Eager checks of a COCO instances json + image folder: bad data fails before a model is built.

Each failure is a UserError that names the offending path and the fix; `fix_json` and
`fix_images` say how the user points the run at the right file or folder, which
depends on how the dataset was configured.
"""

from __future__ import annotations

import json
import os

from peftseg.errors import UserError

_REQUIRED_KEYS = ("images", "annotations", "categories")
_SHOW_MISSING = 5


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


def check_split(
    json_path: str, image_root: str, split: str, fix_json: str, fix_images: str
) -> tuple[tuple[int, str], ...]:
    """Validate one split; return its categories as sorted (id, name) pairs."""
    coco = _load(json_path, split, fix_json)
    categories = _categories(coco, json_path, split, fix_json)
    if not os.path.isdir(image_root):
        raise UserError(f"The {split} image folder {image_root} does not exist. {fix_images}")
    _check_images(coco, json_path, image_root, split, fix_images)
    return tuple(categories)
