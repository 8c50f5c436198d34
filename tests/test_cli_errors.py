"""Bad input: one clear message naming the fix, exit != 0, no `status: ok` record."""

import json

import pytest
from conftest import records_under
from helpers import run_in_process

from peftseg.errors import UserError


def assert_clean_failure(proc, tmp_path, *needles):
    assert proc.returncode != 0
    err = proc.stderr + proc.stdout
    for needle in needles:
        assert needle in err, err
    assert "Traceback" not in proc.stderr
    assert all(r["status"] != "ok" for r in records_under(tmp_path))


@pytest.mark.parametrize(
    "override, needles",
    [
        ("method=foo", ["Unknown method 'foo'", "full", "heads", "lora", "method=<name>"]),
        ("model=vitdet_huge", ["Unknown model 'vitdet_huge'", "vitdet_tiny", "vitdet_b"]),
        ("dataset=voc", ["Unknown dataset 'voc'", "shapes", "coco_format"]),
    ],
)
def test_unknown_group_option(peftseg, tmp_path, override, needles):
    assert_clean_failure(peftseg("train", override), tmp_path, *needles)


def test_mistyped_key_fails_before_building(peftseg, tmp_path):
    proc = peftseg("train", "method.rnk=4")
    assert proc.returncode != 0
    assert "rnk" in proc.stderr
    assert records_under(tmp_path) == []


def test_missing_coco_directory(peftseg, tmp_path):
    proc = peftseg("train", "dataset=coco", "train=smoke", env={"DETECTRON2_DATASETS": str(tmp_path / "nowhere")})
    assert_clean_failure(proc, tmp_path, "DETECTRON2_DATASETS", str(tmp_path / "nowhere"))
    (record,) = records_under(tmp_path / "outputs")
    assert record["status"] == "failed" and "DETECTRON2_DATASETS" in record["error"]["message"]


def assert_failed_run(tmp_path, cache, overrides, *needles):
    """The run refuses with a UserError naming `needles` and records "failed": in-process, for bad
    values found once training starts (the CLI's own rendering of such an error is tested above)."""
    with pytest.raises(UserError) as err:
        run_in_process(tmp_path, cache, *overrides)
    for needle in needles:
        assert needle in str(err.value), str(err.value)
    (record,) = records_under(tmp_path)
    assert record["status"] == "failed" and record["error"]["type"] == "UserError"


def _coco_format_args(tmp_path, json_text=None, drop_image=False):
    from peftseg.data.shapes import write_coco_layout

    root = tmp_path / "data"
    write_coco_layout(root, num_train=4, num_val=2, image_size=64, seed=1)
    train_json = root / "annotations" / "instances_train2017.json"
    if json_text is not None:
        train_json.write_text(json_text)
    if drop_image:
        first = json.loads(train_json.read_text())["images"][0]["file_name"]
        (root / "train2017" / first).unlink()
    return [
        "dataset=coco_format",
        f"dataset.train_json={train_json}", f"dataset.train_images={root / 'train2017'}",
        f"dataset.val_json={root / 'annotations' / 'instances_val2017.json'}",
        f"dataset.val_images={root / 'val2017'}",
    ]


def test_malformed_annotation_json(tmp_path, shapes_cache):
    assert_failed_run(tmp_path, shapes_cache, _coco_format_args(tmp_path, json_text='{"images": [ oops'),
                      "instances_train2017.json")


def test_image_listed_but_absent(tmp_path, shapes_cache):
    assert_failed_run(tmp_path, shapes_cache, _coco_format_args(tmp_path, drop_image=True), "missing")


def test_lora_target_group_matching_nothing(tmp_path, shapes_cache):
    assert_failed_run(tmp_path, shapes_cache, ["method=lora", "method.targets=[attn_qkv,decoder_xattn]"],
                      "decoder_xattn", "attn_qkv", "attn_proj", "mlp")


@pytest.mark.parametrize("rank", ["0", "-2"])
def test_lora_rank_must_be_positive(peftseg, tmp_path, rank):
    proc = peftseg("train", "method=lora", f"method.rank={rank}", "train=smoke")
    assert_clean_failure(proc, tmp_path, "method.rank")
