"""`dataset.train_subset`: train on N images, or a fraction, of any dataset's train split.

For data-efficiency studies: the selection is seeded (`dataset.subset_seed`, which defaults
to `train.seed`), keeps every class of the train split present, and is nested: for one seed,
the 10-image subset lies inside the 30-image one, which lies inside the 100-image one, so a
sweep over sizes adds data instead of redrawing it. Only the train split is restricted;
validation always uses the whole val split.

How: the images eligible for training are those detectron2's train loader keeps (at least
one non-crowd instance). They are put in a seeded random order; first a small cover of the
classes is taken (repeatedly the rarest class not yet covered, from the image in that order
holding it that covers most uncovered classes), then images in that order fill up to N. The
subset is published in Detectron2's DatasetCatalog under its own name, with the full split's
metadata, so every dataset kind (and every later one) gets it through `register_splits`.

Module top stays light (dataclass + checks): the data package is imported to collect
registrations before detectron2 loads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from peftseg.errors import UserError

SUBSET_SEED_DEFAULT = "${oc.select:train.seed,0}"  # train.seed; 0 for a dataset config alone


@dataclass
class TrainSubsetOptions:
    """Mixed into every dataset kind's config dataclass."""

    # 0: the whole train split; N >= 1 (an integer): N training images; 0 < f < 1: that
    # fraction of them (rounded, at least 1); 1.0 is refused (a count of one or the whole
    # split?). Every class of the train split stays present.
    train_subset: Any = 0
    # seed of the selection; defaults to train.seed
    subset_seed: Any = SUBSET_SEED_DEFAULT

    def __post_init__(self) -> None:
        check_train_subset(self.train_subset)
        seed = self.subset_seed
        if isinstance(seed, str) and seed.startswith("${"):
            return  # a dataclass built in Python: OmegaConf resolves the default later
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise UserError(
                f"dataset.subset_seed={seed!r} is not a seed; give a non-negative integer (it "
                "defaults to train.seed), e.g. dataset.subset_seed=0."
            )


_FIX = ("give a number of training images (an integer >= 1, e.g. dataset.train_subset=100), a "
        "fraction between 0 and 1 (e.g. dataset.train_subset=0.1), or 0 for the whole train split")


def check_train_subset(value: Any) -> None:
    """UserError unless `value` is 0, an integer >= 1, or a fraction in (0, 1)."""
    if value is None or (not isinstance(value, bool) and isinstance(value, (int, float)) and value == 0):
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise UserError(f"dataset.train_subset={value!r} is not a subset size; {_FIX}.")
    if isinstance(value, float) and value == 1:
        # read as a count, 1.0 is one image, while 0.999 is nearly the whole split: refuse, not guess
        raise UserError(
            f"dataset.train_subset={value!r} is ambiguous: as a fraction it means the whole train split, as a "
            "count one image; give a count (an integer >= 1) or a fraction < 1: dataset.train_subset=1 trains "
            "on one image, 0.5 on half of the split, and 0 (the default) on all of it."
        )
    if value >= 1 and not float(value).is_integer():
        raise UserError(
            f"dataset.train_subset={value!r} is above 1 but not a whole number of images; {_FIX}."
        )


def subset_size(value: Any, available: int) -> int | None:
    """Images the request asks for out of `available`; None for the whole split."""
    check_train_subset(value)
    if not value:
        return None
    if value < 1:
        return max(1, round(value * available))
    return int(value)


def eligible(dicts: list[dict]) -> list[dict]:
    """The images detectron2's train loader keeps (filter_empty): a non-crowd instance."""
    return [d for d in dicts if any(a.get("iscrowd", 0) == 0 for a in d.get("annotations", ()))]


def _classes(d: dict) -> set:
    return {a["category_id"] for a in d["annotations"] if a.get("iscrowd", 0) == 0}


def select(dicts: list[dict], n: int, seed: int, class_names=None) -> list[dict]:
    """`n` of the eligible `dicts` holding every class they hold, seeded and nested in `n`;
    in the split's own order. UserError when `n` images cannot hold every class."""
    import numpy as np

    pool = eligible(dicts)
    if n > len(pool):
        raise UserError(
            f"dataset.train_subset asks for {n} training images, but the train split has only "
            f"{len(pool)} with instances; ask for at most {len(pool)} (or a fraction such as "
            "dataset.train_subset=0.5), or use a bigger train split (for shapes: dataset.num_train)."
        )
    order = [int(i) for i in np.random.default_rng(seed).permutation(len(pool))]
    rank = {i: r for r, i in enumerate(order)}
    holds = [_classes(pool[i]) for i in range(len(pool))]
    frequency: dict = {}
    for cs in holds:
        for c in cs:
            frequency[c] = frequency.get(c, 0) + 1
    uncovered, cover = set(frequency), []
    while uncovered:
        rarest = min(uncovered, key=lambda c: (frequency[c], str(c)))
        best = max((i for i in order if rarest in holds[i]),
                   key=lambda i: (len(holds[i] & uncovered), -rank[i]))
        cover.append(best)
        uncovered -= holds[best]
    if len(cover) > n:
        names = f" ({', '.join(map(str, class_names))})" if class_names else ""
        raise UserError(
            f"dataset.train_subset asks for {n} training image(s), but keeping all "
            f"{len(frequency)} classes of the train split{names} present takes {len(cover)} "
            f"images with this seed; ask for at least dataset.train_subset={len(cover)}."
        )
    chosen = set(cover)
    for i in order:
        if len(chosen) == n:
            break
        chosen.add(i)
    return [pool[i] for i in sorted(chosen)]


def restrict_train_split(splits, value: Any, seed: int):
    """`splits` with its train split replaced by the seeded subset `value` asks for, published
    in Detectron2's catalogs under its own name; unchanged when `value` asks for everything."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    if not value:
        return splits
    full = DatasetCatalog.get(splits.train)
    available = len(eligible(full))
    chosen = select(full, subset_size(value, available), seed, splits.class_names)
    name = f"{splits.train}_subset{len(chosen)}_seed{seed}"
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: list(chosen))
    MetadataCatalog.get(name).set(**{k: v for k, v in MetadataCatalog.get(splits.train).as_dict().items()
                                     if k != "name"})
    return replace(splits, train=name, train_images=len(chosen), train_images_available=available)


def training_data(splits, cfg) -> dict:
    """What the run record states about the training data: images used (and available)."""
    from detectron2.data import DatasetCatalog

    used, available = splits.train_images, splits.train_images_available
    if used is None:  # the whole split: count what the train loader will keep
        used = available = len(eligible(DatasetCatalog.get(splits.train)))
    return {"train_images": used, "train_images_available": available,
            "train_subset": cfg.get("train_subset", 0) or 0, "subset_seed": cfg.get("subset_seed", 0)}
