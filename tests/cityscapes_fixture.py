"""A tiny dataset in Cityscapes' official gtFine layout, written by the tests that need it.

Each image holds a road (a stuff class: no instances) and a few non-overlapping boxes of
instance classes, drawn as cityscapesScripts draws polygons (PIL, in the json's order) into
the labelIds and instanceIds pngs (instance id = label id · 1000 + k), with a distinct colour
per class in the RGB image so that a model can learn them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# Cityscapes label ids (cityscapesscripts.helpers.labels)
ROAD, CAR, PERSON, BICYCLE = 7, 26, 24, 33
COLOURS = {CAR: (200, 40, 40), PERSON: (40, 200, 40), BICYCLE: (40, 40, 220)}
NAMES = {ROAD: "road", CAR: "car", PERSON: "person", BICYCLE: "bicycle"}


def write_cityscapes(root: Path, images: dict[str, int] | None = None, width: int = 256, height: int = 128,
                     seed: int = 0) -> Path:
    """`images`: split -> count (default train 4, val 2); returns `root`."""
    rng = np.random.default_rng(seed)
    for split, count in (images or {"train": 4, "val": 2}).items():
        city = {"train": "aachen", "val": "frankfurt"}.get(split, split)
        img_dir = root / "leftImg8bit" / split / city
        gt_dir = root / "gtFine" / split / city
        img_dir.mkdir(parents=True, exist_ok=True)
        gt_dir.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            stem = f"{city}_{i:06d}_000019"
            rgb = Image.fromarray(rng.integers(60, 110, size=(height, width, 3), dtype=np.uint8))
            labels = Image.new("L", (width, height), 0)
            instances = Image.new("I", (width, height), 0)
            objects = [{"label": "road", "polygon": [[0, height * 3 // 4], [width - 1, height * 3 // 4],
                                                     [width - 1, height - 1], [0, height - 1]]}]
            ImageDraw.Draw(labels).polygon([tuple(p) for p in objects[0]["polygon"]], fill=ROAD)
            ImageDraw.Draw(instances).polygon([tuple(p) for p in objects[0]["polygon"]], fill=ROAD)
            counts: dict[int, int] = {}
            slots = rng.permutation(8)[: int(rng.integers(2, 4))]  # 4x2 grid of 64x64 slots
            for slot in slots:
                label = [CAR, PERSON, BICYCLE][int(rng.integers(3))]
                x0 = int(slot % 4) * 64 + int(rng.integers(4, 14))
                y0 = int(slot // 4) * 64 + int(rng.integers(4, 14))
                x1, y1 = x0 + int(rng.integers(30, 46)), y0 + int(rng.integers(30, 46))
                polygon = [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]
                objects.append({"label": NAMES[label], "polygon": polygon})
                inst = label * 1000 + counts.setdefault(label, 0)
                counts[label] += 1
                for image, fill in ((labels, label), (instances, inst), (rgb, COLOURS[label])):
                    ImageDraw.Draw(image).polygon([tuple(p) for p in polygon], fill=fill)
            rgb.save(img_dir / f"{stem}_leftImg8bit.png")
            labels.save(gt_dir / f"{stem}_gtFine_labelIds.png")
            Image.fromarray(np.asarray(instances, dtype=np.uint16)).save(gt_dir / f"{stem}_gtFine_instanceIds.png")
            (gt_dir / f"{stem}_gtFine_polygons.json").write_text(
                json.dumps({"imgHeight": height, "imgWidth": width, "objects": objects}))
    return root
