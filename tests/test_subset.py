"""`dataset.train_subset`: seeded, nested, every class kept, refusals, every dataset kind,
train split only, and the run record's count of training images."""

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from omegaconf import OmegaConf

from helpers import run_in_process
from peftseg.config import compose_config, validate
from peftseg.data import register_splits
from peftseg.data.subset import select, subset_size
from peftseg.errors import UserError


def image(i: int, *classes: int, crowd: bool = False) -> dict:
    return {"image_id": i, "file_name": f"{i}.png",
            "annotations": [{"category_id": c, "iscrowd": int(crowd)} for c in classes]}


def pool() -> list[dict]:
    """100 images: class 0 in most, class 1 in 20, class 2 (rare) in 2, class 3 only in a
    crowd annotation (ignored), and 5 images with no instances (the loader drops them)."""
    dicts = [image(i, 0) for i in range(70)]
    dicts += [image(70 + i, 0, 1) for i in range(10)] + [image(80 + i, 1) for i in range(10)]
    dicts += [image(90, 2), image(91, 1, 2), image(92, 0, 3, crowd=True)]
    dicts += [image(93 + i) for i in range(5)] + [image(98, 0), image(99, 0)]
    return dicts


def ids(dicts) -> list[int]:
    return [d["image_id"] for d in dicts]


def classes(dicts) -> set[int]:
    return {a["category_id"] for d in dicts for a in d["annotations"] if not a["iscrowd"]}


def test_selection_keeps_every_class_is_seeded_and_nested():
    dicts = pool()
    for seed in range(5):
        sizes = [2, 3, 10, 30, 94]
        subsets = [select(dicts, n, seed) for n in sizes]
        for n, s in zip(sizes, subsets):
            assert len(s) == n and classes(s) == {0, 1, 2}
            assert all(classes([d]) for d in s)  # only images the train loader keeps
            assert ids(s) == sorted(ids(s))  # in the split's order
        for small, big in zip(subsets, subsets[1:]):  # more data adds images, never swaps them
            assert set(ids(small)) <= set(ids(big))
    assert ids(select(dicts, 10, 0)) == ids(select(dicts, 10, 0))
    assert ids(select(dicts, 10, 0)) != ids(select(dicts, 10, 1))


def test_one_image_per_class_cover_when_classes_share_images():
    # image 91 holds classes 1 and 2, 70..79 hold 0 and 1: two images can hold all three
    assert len(select(pool(), 2, 0)) == 2


def test_refusals_name_the_fix():
    dicts = pool()
    with pytest.raises(UserError, match=r"keeping all 3 classes .* takes 2 images.*train_subset=2"):
        select(dicts, 1, 0)
    with pytest.raises(UserError, match="only 94 with instances; ask for at most 94"):
        select(dicts, 95, 0)
    for bad in (-1, 2.5, "ten", True, float("nan")):
        with pytest.raises(UserError, match="dataset.train_subset"):
            subset_size(bad, 94)


def test_fractions_round_and_zero_means_everything():
    assert subset_size(0.1, 94) == 9 and subset_size(0.001, 94) == 1 and subset_size(0.5, 3) == 2
    assert subset_size(0, 94) is None and subset_size(30, 94) == 30 and subset_size(30.0, 94) == 30


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTSEG_CACHE", str(tmp_path / "cache"))


def test_shapes_subset_cuts_the_train_split_only(cache):
    cfg = compose_config(["dataset.num_train=40", "dataset.num_val=6", "dataset.train_subset=0.25",
                          "train.seed=7"]).dataset
    splits = register_splits(cfg)
    full = register_splits(OmegaConf.merge(cfg, {"train_subset": 0}))
    train, val = DatasetCatalog.get(splits.train), DatasetCatalog.get(splits.val)
    assert splits.train != full.train and splits.val == full.val and len(val) == 6
    assert (splits.train_images, splits.train_images_available) == (10, 40) and len(train) == 10
    assert classes(train) == classes(DatasetCatalog.get(full.train)) == {0, 1, 2}
    assert set(ids(train)) <= set(ids(DatasetCatalog.get(full.train)))
    meta = MetadataCatalog.get(splits.train)
    assert meta.thing_classes == ["circle", "square", "triangle"] and meta.evaluator_type == "coco"
    # the seed is train.seed's: another seed, another subset
    other = register_splits(compose_config(["dataset.num_train=40", "dataset.num_val=6",
                                             "dataset.train_subset=0.25", "train.seed=8"]).dataset)
    assert ids(DatasetCatalog.get(other.train)) != ids(train)


def test_every_dataset_kind_has_the_knob():
    from peftseg.registry import DATASETS

    for spec in DATASETS:
        fields = spec.config.__dataclass_fields__
        assert "train_subset" in fields and "subset_seed" in fields, spec.name


def test_one_point_zero_is_refused_as_ambiguous_at_compose_time():
    # 0.999 is a fraction (nearly every image), 1 a count (one image): 1.0 could be either
    assert subset_size(0.999, 94) == 94 and subset_size(1, 94) == 1 and subset_size(2.0, 94) == 2
    for override in ("dataset.train_subset=1.0", "dataset.train_subset=1e0"):
        with pytest.raises(UserError) as e:
            validate(compose_config([override]))  # what `peftseg train` does before anything runs
        assert str(e.value) == (
            "dataset.train_subset=1.0 is ambiguous: as a fraction it means the whole train split, as a count "
            "one image; give a count (an integer >= 1) or a fraction < 1: dataset.train_subset=1 trains on one "
            "image, 0.5 on half of the split, and 0 (the default) on all of it.")
    with pytest.raises(UserError, match="is ambiguous"):
        subset_size(1.0, 94)


def test_bad_values_fail_before_training_with_the_fix(cache):
    with pytest.raises(UserError, match=r"train_subset=2\.5 is above 1 but not a whole number"):
        register_splits(compose_config(["dataset.train_subset=2.5"]).dataset)
    with pytest.raises(UserError, match="train_subset asks for 500 training images.*only 200 with instances.*dataset.num_train"):
        register_splits(compose_config(["dataset.train_subset=500"]).dataset)


def test_the_run_record_states_the_images_used(tmp_path, shapes_cache):
    record = run_in_process(tmp_path, shapes_cache, "method=heads", "train.max_iter=2", "train.warmup_iters=0", "dataset.num_train=30",
                            "model.score_thresh_test=0.0",
                            "dataset.num_val=4", "dataset.train_subset=6", "train.seed=1")
    assert record.ok and record.mask_ap is not None
    assert record.config["dataset.train_subset"] == 6 and record.config["dataset.subset_seed"] == 1
    assert record.data == {"train_images": 6, "train_images_available": 30, "train_subset": 6, "subset_seed": 1}
    assert record.train_images == 6
