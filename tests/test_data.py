import json
import os
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from omegaconf import OmegaConf
from PIL import Image

from peftseg.data import register_splits
from peftseg.data.coco import CocoDatasetConfig, CocoFormatDatasetConfig
from peftseg.data.shapes import ShapesDatasetConfig
from peftseg.data.shapes import BG_MAX, CLASSES, generate_split, write_coco_layout
from peftseg.errors import UserError

# pycocotools' decode trips a numpy 2 deprecation on every call; it is not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

CONF = Path(__file__).resolve().parent.parent / "conf"
SMALL = dict(num_train=6, num_val=3, image_size=64)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("PEFTSEG_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def coco_root(tmp_path) -> Path:
    return Path(write_coco_layout(str(tmp_path / "coco"), num_train=4, num_val=2, image_size=64))


def _decode(poly, size) -> np.ndarray:
    return mask_util.decode(mask_util.merge(mask_util.frPyObjects(poly, size, size))).astype(bool)


def _error(cfg) -> str:
    with pytest.raises(UserError) as e:
        register_splits(cfg)
    msg = str(e.value)
    assert "\n" not in msg  # one paragraph
    return msg


# --- the generator -------------------------------------------------------------------------


def test_json_masks_equal_painted_pixels(tmp_path):
    size = 96
    json_path = generate_split(str(tmp_path), "train", 20, size, 4, seed=3)
    coco = json.loads(Path(json_path).read_text())
    assert [c["id"] for c in coco["categories"]] == [1, 2, 3]
    assert len(coco["images"]) == 20
    by_image = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    assert all(1 <= len(anns) <= 4 for anns in by_image.values()) and len(by_image) == 20
    for im in coco["images"]:
        img = np.asarray(Image.open(tmp_path / "train" / im["file_name"]))
        assert img.shape == (size, size, 3)
        union = np.zeros((size, size), dtype=int)
        for ann in by_image[im["id"]]:
            mask = _decode(ann["segmentation"], size)
            assert mask.any() and ann["iscrowd"] == 0 and ann["category_id"] in (1, 2, 3)
            assert ann["area"] == mask.sum()
            ys, xs = np.nonzero(mask)
            x0, y0 = xs.min(), ys.min()
            assert ann["bbox"] == [x0, y0, xs.max() - x0 + 1, ys.max() - y0 + 1]
            # The painted instance is one colour over exactly its mask...
            assert len(np.unique(img[mask], axis=0)) == 1
            union += mask
        # ...and the foreground (brighter than any background pixel) is exactly the masks.
        assert union.max() == 1
        np.testing.assert_array_equal(img.max(axis=2) > BG_MAX, union.astype(bool))
    sizes = [max(a["bbox"][2:]) / size for a in coco["annotations"]]
    assert min(sizes) < 0.3 and max(sizes) > 0.3


def test_downstream_domain_has_other_classes_sizes_and_palette_with_exact_masks(tmp_path):
    size = 96
    json_path = generate_split(str(tmp_path), "train", 12, size, 4, seed=1, domain="downstream")
    coco = json.loads(Path(json_path).read_text())
    assert [c["name"] for c in coco["categories"]] == ["pentagon", "hexagon", "star"]
    for im in coco["images"]:
        img = np.asarray(Image.open(tmp_path / "train" / im["file_name"]))
        union = np.zeros((size, size), dtype=bool)
        for ann in (a for a in coco["annotations"] if a["image_id"] == im["id"]):
            mask = _decode(ann["segmentation"], size)
            assert len(np.unique(img[mask], axis=0)) == 1
            union |= mask
        # inverted palette: light background, so the dark pixels are exactly the shapes
        np.testing.assert_array_equal(img.min(axis=2) < 255 - BG_MAX, union)
    sizes = [max(a["bbox"][2:]) / size for a in coco["annotations"]]
    assert max(sizes) <= 0.36
    with pytest.raises(UserError, match="dataset.domain=<name>"):
        generate_split(str(tmp_path / "x"), "train", 2, size, 2, seed=1, domain="moon")


def test_generation_is_deterministic_and_splits_differ(tmp_path):
    def gen(d, split, seed):
        p = generate_split(str(tmp_path / d), split, 5, 48, 3, seed=seed)
        pngs = sorted((tmp_path / d / split).glob("*.png"))
        return Path(p).read_text(), np.stack([np.asarray(Image.open(f)) for f in pngs])

    a_json, a_px = gen("a", "train", 7)
    b_json, b_px = gen("b", "train", 7)
    assert a_json == b_json
    np.testing.assert_array_equal(a_px, b_px)
    assert not np.array_equal(a_px, gen("c", "train", 8)[1])
    assert not np.array_equal(a_px, gen("d", "val", 7)[1])


def test_write_coco_layout(coco_root):
    for split, n in (("train2017", 4), ("val2017", 2)):
        coco = json.loads((coco_root / "annotations" / f"instances_{split}.json").read_text())
        assert len(coco["images"]) == n
        assert all((coco_root / split / im["file_name"]).is_file() for im in coco["images"])


# --- shapes registration and cache ---------------------------------------------------------


def data_dir(splits) -> Path:
    """Where a registered dataset's files are: the folder of its train json."""
    return Path(MetadataCatalog.get(splits.train).json_file).parent


def test_shapes_registers_in_detectron2_catalogs():
    splits = register_splits(ShapesDatasetConfig(**SMALL))
    assert splits.class_names == CLASSES
    train = DatasetCatalog.get(splits.train)
    assert len(train) == 6 and len(DatasetCatalog.get(splits.val)) == 3
    coco = json.loads((data_dir(splits) / "train.json").read_text())
    cats = {a["id"]: a["category_id"] for a in coco["annotations"]}
    for rec in train:
        assert os.path.isfile(rec["file_name"]) and rec["annotations"]
        for obj in rec["annotations"]:
            assert obj["segmentation"] and obj["category_id"] in (0, 1, 2)
    # Detectron2 maps json ids 1..3 to contiguous 0..2.
    got = sorted(o["category_id"] for r in train for o in r["annotations"])
    assert got == sorted(c - 1 for c in cats.values())
    for name in (splits.train, splits.val):
        meta = MetadataCatalog.get(name)
        assert meta.thing_classes == list(CLASSES)
        assert meta.evaluator_type == "coco"
        assert os.path.isfile(meta.json_file) and os.path.isdir(meta.image_root)
        assert meta.thing_dataset_id_to_contiguous_id == {1: 0, 2: 1, 3: 2}


def test_shapes_cache_is_reused_and_keyed_by_params(cache):
    cfg = OmegaConf.structured(ShapesDatasetConfig(**SMALL))
    first = register_splits(cfg)
    root = data_dir(first)  # read now: a later registration under the same names republishes them
    assert root.parent == cache / "shapes"
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    second = register_splits(cfg)  # same process, same names: must not raise
    assert second == first
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == stamps
    other = register_splits(ShapesDatasetConfig(**{**SMALL, "seed": 1}))
    other_root = data_dir(other)
    assert other_root != root
    built = sorted(p.name for p in (cache / "shapes").iterdir())
    assert built == sorted([root.name, other_root.name])  # and no temp dirs left behind
    elsewhere = cache.parent / "elsewhere"
    explicit = register_splits(ShapesDatasetConfig(**SMALL, cache_dir=str(elsewhere)))
    assert data_dir(explicit).parent == elsewhere / "shapes"


def test_shapes_damaged_cache_is_rebuilt():
    root = data_dir(register_splits(ShapesDatasetConfig(**SMALL)))
    (root / "val" / "000002.png").unlink()
    register_splits(ShapesDatasetConfig(**SMALL))
    assert (root / "val" / "000002.png").is_file()


def test_shapes_unwritable_cache(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    msg = _error(ShapesDatasetConfig(**SMALL, cache_dir=str(blocker)))
    assert "dataset.cache_dir=" in msg and "PEFTSEG_CACHE" in msg


# --- coco and coco_format ------------------------------------------------------------------


def test_coco_layout_registers_via_root_and_env(coco_root, monkeypatch):
    splits = register_splits(CocoDatasetConfig(root=str(coco_root)))
    assert splits.class_names == CLASSES and data_dir(splits).parent == coco_root  # annotations/ under it
    assert len(DatasetCatalog.get(splits.train)) == 4
    assert len(DatasetCatalog.get(splits.val)) == 2
    val_json = coco_root / "annotations" / "instances_val2017.json"
    assert MetadataCatalog.get(splits.val).json_file == str(val_json)
    monkeypatch.setenv("DETECTRON2_DATASETS", str(coco_root.parent))
    assert data_dir(register_splits(OmegaConf.structured(CocoDatasetConfig()))).parent == coco_root


def _coco_format(root: Path, **over) -> CocoFormatDatasetConfig:
    paths = dict(
        train_json=str(root / "annotations" / "instances_train2017.json"),
        train_images=str(root / "train2017"),
        val_json=str(root / "annotations" / "instances_val2017.json"),
        val_images=str(root / "val2017"),
    )
    return CocoFormatDatasetConfig(**{**paths, **over})


def test_reregistering_with_other_paths_replaces(coco_root, tmp_path):
    first = register_splits(_coco_format(coco_root))
    assert len(DatasetCatalog.get(first.train)) == 4
    other = Path(write_coco_layout(tmp_path / "other", num_train=3, num_val=1, image_size=64))
    second = register_splits(_coco_format(other))
    assert second.train == first.train
    assert len(DatasetCatalog.get(second.train)) == 3
    assert MetadataCatalog.get(second.train).image_root == str(other / "train2017")


def test_coco_missing_root_names_env_and_layout(tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "nowhere"))
    msg = _error(CocoDatasetConfig())
    for text in ("DETECTRON2_DATASETS", "dataset.root=", str(tmp_path / "nowhere" / "coco"),
                 "instances_{train2017,val2017}.json"):
        assert text in msg
    monkeypatch.delenv("DETECTRON2_DATASETS")
    monkeypatch.chdir(tmp_path)  # Detectron2's default is datasets/, relative to the cwd
    msg = _error(CocoDatasetConfig())
    assert "DETECTRON2_DATASETS is unset" in msg and str(tmp_path / "datasets" / "coco") in msg
    assert str(tmp_path / "x") in _error(CocoDatasetConfig(root=str(tmp_path / "x")))


def test_coco_missing_annotation_file(coco_root):
    (coco_root / "annotations" / "instances_val2017.json").unlink()
    msg = _error(CocoDatasetConfig(root=str(coco_root)))
    assert "instances_val2017.json" in msg and "does not exist" in msg and "dataset.root=" in msg


def test_invalid_json_gives_position(coco_root):
    (coco_root / "annotations" / "instances_train2017.json").write_text('{"images": [}\n')
    msg = _error(_coco_format(coco_root))
    assert "not valid JSON" in msg and "line 1 column 13" in msg and "dataset.train_json=" in msg


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda c: c.pop("annotations"), "lacks the key(s) 'annotations'"),
        (lambda c: c.update(categories=[]), "'categories' list is empty"),
        (lambda c: c.update(images={}), "'images' is not a list"),
    ],
)
def test_not_coco_instances_format(coco_root, mutate, expected):
    path = coco_root / "annotations" / "instances_val2017.json"
    coco = json.loads(path.read_text())
    mutate(coco)
    path.write_text(json.dumps(coco))
    msg = _error(_coco_format(coco_root))
    assert expected in msg and "not in COCO instances format" in msg and "dataset.val_json=" in msg


def test_missing_images_are_named_and_counted(coco_root):
    (coco_root / "train2017" / "000002.png").unlink()
    (coco_root / "train2017" / "000004.png").unlink()
    msg = _error(_coco_format(coco_root))
    assert "2 of 4 images" in msg and "000002.png, 000004.png" in msg
    assert "train" in msg and "dataset.train_images=" in msg


def test_missing_image_dir(coco_root):
    msg = _error(_coco_format(coco_root, val_images=str(coco_root / "nope")))
    assert str(coco_root / "nope") in msg and "dataset.val_images=" in msg


def test_coco_format_unset_values_name_the_overrides(coco_root):
    msg = _error(CocoFormatDatasetConfig())
    for key in ("train_json", "train_images", "val_json", "val_images"):
        assert f"dataset.{key}=" in msg
    cfg = OmegaConf.structured(CocoFormatDatasetConfig(train_json="a.json", train_images="imgs"))
    msg = _error(cfg)
    assert "dataset.val_json=" in msg and "dataset.train_json=" not in msg


def test_split_categories_must_match(coco_root):
    path = coco_root / "annotations" / "instances_val2017.json"
    coco = json.loads(path.read_text())
    coco["categories"][0]["name"] = "disc"
    path.write_text(json.dumps(coco))
    assert "different categories" in _error(_coco_format(coco_root))


def test_unknown_name_lists_known():
    msg = _error(ShapesDatasetConfig(name="shapez"))
    assert "dataset 'shapez' is not known; the datasets are: cityscapes, coco, coco_format, shapes, zerowaste." in msg


# --- the yaml files compose against the schemas --------------------------------------------


def test_dataset_yamls_compose_with_schemas(coco_root):
    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.errors import ConfigCompositionException

    cs = ConfigStore.instance()
    for name, node in (("shapes", ShapesDatasetConfig), ("coco", CocoDatasetConfig),
                       ("coco_format", CocoFormatDatasetConfig)):
        cs.store(group="schema/dataset", name=name, node=node)
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        shapes = compose(overrides=["+dataset=shapes", "dataset.num_train=6", "dataset.num_val=3",
                                    "dataset.image_size=64"]).dataset
        assert OmegaConf.get_type(shapes) is ShapesDatasetConfig
        assert register_splits(shapes).class_names == CLASSES
        coco = compose(overrides=["+dataset=coco", f"dataset.root={coco_root}"]).dataset
        assert data_dir(register_splits(coco)).parent == coco_root
        fmt = compose(overrides=["+dataset=coco_format", "dataset.val_json=v.json"]).dataset
        msg = _error(fmt)
        assert "dataset.train_json=" in msg and "dataset.val_json=" not in msg
        with pytest.raises(ConfigCompositionException):
            compose(overrides=["+dataset=shapes", "dataset.num_trian=3"])
