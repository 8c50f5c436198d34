"""Synthetic `shapes` dataset: coloured polygons with exact instance masks, as COCO json.

Each instance is a polygon that is stored as its COCO `segmentation` and painted with
the rasterization of that very polygon (pycocotools, as Detectron2 uses to build GT
masks), and instances never touch, so the GT mask equals the painted pixels exactly.
Backgrounds are dark (every channel <= BG_MAX) and shapes bright (some channel >=
FG_MIN), so no background pixel can share an instance's colour.

A `domain` picks the classes, sizes and palette. `default` is the built-in dataset;
`downstream` (pentagons, hexagons, stars; smaller; dark shapes on light backgrounds,
i.e. the default palette inverted, so the same exactness argument holds) is a different
domain for transfer experiments: pretrain on one, fine-tune on the other.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import zlib
from dataclasses import dataclass

import numpy as np
import pycocotools.mask as mask_util
from PIL import Image

from peftseg import checks
from peftseg.data import SPLITS, DatasetSplits
from peftseg.data.subset import TrainSubsetOptions
from peftseg.errors import UserError
from peftseg.registry import register_dataset

# Bump whenever the generator's output changes, so stale caches are not reused.
GENERATOR_VERSION = 2

BG_MAX = 120
FG_MIN = 150
_PLACEMENT_TRIES = 50
_STALE_TMP_S = 3600
_KEYED = ("num_train", "num_val", "image_size", "max_instances", "seed", "domain")


@dataclass(frozen=True)
class Domain:
    # class name -> polygon vertices; a negative count -n draws an n-pointed star
    vertices: dict[str, int]
    size: tuple[float, float]  # circumscribed diameter, as fractions of the image side
    inverted: bool  # False: bright shapes on dark backgrounds; True: the palette inverted

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.vertices)


DOMAINS = {
    "default": Domain({"circle": 32, "square": 4, "triangle": 3}, (0.15, 0.5), inverted=False),
    "downstream": Domain({"pentagon": 5, "hexagon": 6, "star": -5}, (0.12, 0.35), inverted=True),
}
CLASSES = DOMAINS["default"].classes


def get_domain(name: str) -> Domain:
    if name not in DOMAINS:
        raise UserError(
            f"Unknown shapes domain {name!r}; the generator knows {', '.join(DOMAINS)}. "
            "Pick one with dataset.domain=<name>."
        )
    return DOMAINS[name]


@dataclass
class ShapesDatasetConfig(TrainSubsetOptions):  # + train_subset, subset_seed
    name: str = "shapes"
    num_train: int = 200
    num_val: int = 50
    image_size: int = 128
    max_instances: int = 4
    seed: int = 0
    domain: str = "default"  # classes, sizes and palette: default | downstream
    # Base cache folder; empty: $PEFTSEG_CACHE, else ~/.cache/peftseg. The data lands in
    # <base>/shapes/<key>, key = hash of the generation parameters.
    cache_dir: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()  # train_subset, subset_seed
        for key, low in (("num_train", 1), ("num_val", 1), ("image_size", 32), ("max_instances", 1), ("seed", 0)):
            checks.integer(f"dataset.{key}", getattr(self, key), minimum=low)
        checks.choice("dataset.domain", self.domain, DOMAINS)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    # A gradient between two dark colours plus noise: varied, yet never bright.
    c0, c1 = rng.uniform(0, BG_MAX - 30, size=(2, 3))
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    t = np.cos(angle) * xx + np.sin(angle) * yy
    t = (t - t.min()) / max(np.ptp(t), 1e-6)
    img = c0 + t[..., None] * (c1 - c0) + rng.normal(0, 8, size=(size, size, 3))
    return np.clip(np.rint(img), 0, BG_MAX).astype(np.uint8)


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    rgb = rng.integers(0, 256, size=3)
    rgb[rng.integers(0, 3)] = rng.integers(FG_MIN, 256)
    return tuple(int(v) for v in rgb)


def _polygon(rng: np.random.Generator, domain: Domain, cls: str, size: int) -> list[float]:
    radius = rng.uniform(*domain.size) * size / 2
    cx, cy = rng.uniform(radius, size - radius, size=2)
    n = domain.vertices[cls]
    if n > 0:
        angles = rng.uniform(0, 2 * np.pi) + 2 * np.pi * np.arange(n) / n
        radii = np.full(n, radius)
    else:  # star: alternate outer and inner vertices
        angles = rng.uniform(0, 2 * np.pi) + np.pi * np.arange(-2 * n) / -n
        radii = np.where(np.arange(-2 * n) % 2 == 0, radius, 0.45 * radius)
    xy = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)
    # Rounded before rasterizing so the json holds exactly the polygon that was painted.
    return [round(float(v), 2) for v in np.clip(xy, 0, size).ravel()]


def _rasterize(poly: list[float], size: int) -> np.ndarray:
    rle = mask_util.merge(mask_util.frPyObjects([poly], size, size))
    return mask_util.decode(rle).astype(bool)


def _dilate(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out


def _image(rng: np.random.Generator, domain: Domain, size: int, max_instances: int):
    img = _background(rng, size)
    taken = np.zeros((size, size), dtype=bool)
    instances = []
    for _ in range(int(rng.integers(1, max_instances + 1))):
        for _ in range(_PLACEMENT_TRIES):
            cls_idx = int(rng.integers(len(domain.classes)))
            poly = _polygon(rng, domain, domain.classes[cls_idx], size)
            mask = _rasterize(poly, size)
            # A one-pixel gap keeps every instance whole and separable from the others.
            if mask.any() and not (_dilate(mask) & taken).any():
                break
        else:
            break  # crowded image: keep the instances placed so far
        img[mask] = _colour(rng)
        taken |= mask
        instances.append((cls_idx + 1, poly, mask))
    return (255 - img if domain.inverted else img), instances


def _split_rng(seed: int, split_name: str) -> np.random.Generator:
    # The split name is mixed in so train and val never share images under one seed.
    return np.random.default_rng([seed, zlib.crc32(split_name.encode())])


def generate_split(
    out_dir: str | os.PathLike,
    split_name: str,
    num_images: int,
    image_size: int,
    max_instances: int,
    seed: int,
    json_path: str | os.PathLike | None = None,
    domain: str = "default",
) -> str:
    """Write `<out_dir>/<split_name>/*.png` and a COCO instances json; return its path.

    The json goes to `json_path`, by default `<out_dir>/<split_name>.json`; its
    `file_name`s are relative to the image folder.
    """
    if num_images < 1 or image_size < 16 or max_instances < 1:
        raise UserError(
            f"Cannot generate the shapes '{split_name}' split with num_images={num_images}, "
            f"image_size={image_size}, max_instances={max_instances}: each needs to be at "
            "least 1 (image_size at least 16). Fix the values, e.g. dataset.num_train=200 "
            "dataset.image_size=128 dataset.max_instances=4."
        )
    dom = get_domain(domain)
    out_dir = os.fspath(out_dir)
    rng = _split_rng(seed, split_name)
    image_dir = os.path.join(out_dir, split_name)
    os.makedirs(image_dir, exist_ok=True)
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        img, instances = _image(rng, dom, image_size, max_instances)
        file_name = f"{image_id:06d}.png"
        Image.fromarray(img).save(os.path.join(image_dir, file_name), compress_level=1)
        images.append(
            {"id": image_id, "file_name": file_name, "height": image_size, "width": image_size}
        )
        for category_id, poly, mask in instances:
            ys, xs = np.nonzero(mask)
            x0, y0 = int(xs.min()), int(ys.min())
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": category_id,
                "segmentation": [poly],
                "area": int(mask.sum()),
                "bbox": [x0, y0, int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0],
                "iscrowd": 0,
            })
    coco = {
        "info": {"description": f"peftseg synthetic shapes ({domain}), generator v{GENERATOR_VERSION}"},
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(dom.classes)
        ],
    }
    json_path = os.fspath(json_path or os.path.join(out_dir, f"{split_name}.json"))
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    with open(json_path, "w") as f:
        json.dump(coco, f)
    return json_path


def write_coco_layout(
    root: str | os.PathLike, num_train: int, num_val: int, image_size: int = 128, seed: int = 0,
    domain: str = "default",
) -> str:
    """Write shapes in COCO's on-disk layout under `root` (annotations/, train2017/, val2017/)."""
    for split, num in (("train2017", num_train), ("val2017", num_val)):
        json_path = os.path.join(root, "annotations", f"instances_{split}.json")
        generate_split(root, split, num, image_size, 4, seed, json_path=json_path, domain=domain)
    return os.fspath(root)


def cache_key(cfg) -> str:
    params = {k: getattr(cfg, k) for k in _KEYED}
    params["version"] = GENERATOR_VERSION
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


def cache_root(cfg) -> str:
    base = cfg.cache_dir or os.environ.get("PEFTSEG_CACHE") or "~/.cache/peftseg"
    return os.path.join(os.path.abspath(os.path.expanduser(base)), "shapes", cache_key(cfg))


def _complete(root: str, cfg) -> bool:
    # Only a finished build is ever renamed into place; this catches hand-deleted files.
    for split, num in (("train", cfg.num_train), ("val", cfg.num_val)):
        image_dir = os.path.join(root, split)
        if not os.path.isfile(os.path.join(root, f"{split}.json")) or not os.path.isdir(image_dir):
            return False
        if sum(n.endswith(".png") for n in os.listdir(image_dir)) != num:
            return False
    return True


def _remove_stale_tmp(parent: str, key: str) -> None:
    # Leftovers of generations that were killed midway; young ones may still be running.
    for name in os.listdir(parent):
        path = os.path.join(parent, name)
        try:
            stale = time.time() - os.path.getmtime(path) > _STALE_TMP_S
        except FileNotFoundError:  # removed by a concurrent run meanwhile
            continue
        if name.startswith(f".{key}.tmp-") and stale:
            shutil.rmtree(path, ignore_errors=True)


def ensure_shapes(cfg: ShapesDatasetConfig) -> str:
    """Return the cache folder with `train.json`, `val.json`, `train/`, `val/`; build if absent."""
    get_domain(cfg.domain)  # refuse an unknown domain before touching the cache
    root = cache_root(cfg)
    if os.path.isdir(root) and _complete(root, cfg):
        return root
    parent, key = os.path.split(root)
    try:
        os.makedirs(parent, exist_ok=True)
        _remove_stale_tmp(parent, key)
        if os.path.isdir(root):
            shutil.rmtree(root)
        tmp = tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=parent)
    except OSError as e:
        raise UserError(
            f"Cannot write the shapes dataset cache at {root}: {e}. Point the cache at a "
            "writable folder with dataset.cache_dir=/some/dir or the PEFTSEG_CACHE "
            "environment variable."
        ) from e
    try:
        for split, num in (("train", cfg.num_train), ("val", cfg.num_val)):
            generate_split(tmp, split, num, cfg.image_size, cfg.max_instances, cfg.seed, domain=cfg.domain)
        try:
            os.rename(tmp, root)
        except OSError:
            # Another process finished the same build first; its copy is identical.
            if not _complete(root, cfg):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


__all__ = [
    "CLASSES",
    "DOMAINS",
    "ShapesDatasetConfig",
    "ensure_shapes",
    "generate_split",
    "write_coco_layout",
]


@register_dataset("shapes", config=ShapesDatasetConfig,
                  summary="built-in synthetic shapes with exact masks (generated, cached)")
def register_shapes(cfg) -> DatasetSplits:
    from peftseg.data._catalog import publish_splits

    root = ensure_shapes(cfg)
    fix = (
        f"The shapes cache at {root} was altered; delete that folder and it is regenerated."
    )
    files = {s: (os.path.join(root, f"{s}.json"), os.path.join(root, s)) for s in SPLITS}
    return publish_splits(cfg, files, {s: (fix, fix) for s in SPLITS})
