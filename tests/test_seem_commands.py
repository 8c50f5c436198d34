"""`peftseg eval`, `merge`, `predict` and `visualize` on a seem run: one 2-step LoRA run of
seem_tiny (decoder and pixel-decoder attention: peft's LoRA on nn.MultiheadAttention), made
in-process and shared by the module; the commands run in-process too (cli_in_process). The
run's own final evaluation is what `visualize` draws and what `eval` must reproduce."""

import json

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from helpers import cli_in_process, run_in_process

LORA = ("model=seem_tiny", "method=lora", "method.targets=[decoder_attn,pixel_decoder_attn]",
        "train.max_iter=2", "train.warmup_iters=0", "train.num_workers=0",
        "dataset.num_val=8")  # every eval below runs seem_tiny over the val set: 8 images, not 50


@pytest.fixture(scope="module")
def seem_run(tmp_path_factory, shapes_cache):
    work = tmp_path_factory.mktemp("seem_lora")
    record = run_in_process(work, shapes_cache, *LORA)
    assert record.status == "ok", record.error
    return work


def _cli(run_dir, shapes_cache, *args):
    proc = cli_in_process(*args, cwd=run_dir.parent, cache=shapes_cache)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def _record(run_dir) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def test_eval_reproduces_the_recorded_ap(seem_run, shapes_cache):
    _cli(seem_run, shapes_cache, "eval", f"checkpoint={seem_run}", f"output={seem_run.parent / 'reeval'}")
    again = json.loads((seem_run.parent / "reeval" / "eval.json").read_text())
    record = _record(seem_run)
    assert np.isfinite(record["metrics"]["segm"]["AP"])
    assert again["metrics"]["segm"] == record["metrics"]["segm"]
    assert again["params"] == record["params"]
    assert record["params"]["by_group"]["text"]["trainable"] == 0  # the language encoder stays frozen


def test_merge_folds_the_multihead_attention_lora_into_a_plain_seem(seem_run, shapes_cache):
    merged = seem_run.parent / "merged.pth"
    _cli(seem_run, shapes_cache, "merge", f"checkpoint={seem_run}", f"output={merged}")
    state = torch.load(merged, weights_only=True)["model"]
    assert not any("lora_" in k or "base_layer" in k for k in state)  # official key names again
    attn = "sem_seg_head.predictor.transformer_cross_attention_layers.0.multihead_attn.in_proj_weight"
    with safe_open(str(seem_run / "model_final.safetensors"), framework="pt") as f:
        trained = {k: f.get_tensor(k) for k in f.keys()}
    a, b = (trained[attn.replace("in_proj_weight", f"lora_{x}.default.weight")] for x in "AB")
    assert state[attn].shape == (3 * 64, 64) and torch.linalg.matrix_rank(b @ a) > 0
    # the merged model evaluates to the run's AP (merging only moves float rounding)
    _cli(seem_run, shapes_cache, "eval", f"checkpoint={merged}", f"output={seem_run.parent / 'merged_eval'}")
    again = json.loads((seem_run.parent / "merged_eval" / "eval.json").read_text())
    record = _record(seem_run)
    assert again["checkpoint_kind"] == "merged"
    # AP may move in the last digits: a score within rounding of another flips their rank, a mask pixel
    # within rounding of the threshold flips; abs=0.5 AP points is such a flip here, not a float tolerance
    assert again["metrics"]["segm"]["AP"] == pytest.approx(record["metrics"]["segm"]["AP"], abs=0.5)
    assert again["params"]["total"] == record["params"]["total"] - record["params"]["by_group"]["peft"]["total"]


def test_predict_writes_masks_in_the_dataset_classes(seem_run, shapes_cache, tmp_path):
    image = sorted(shapes_cache.rglob("val/*.png"))[0]
    out = tmp_path / "pred"
    _cli(seem_run, shapes_cache, "predict", f"checkpoint={seem_run}", f"input={image}", f"output={out}",
         "score_thresh=0.0")
    detections = json.loads((out / "predictions.json").read_text())
    # top-k over queries x classes: seem_tiny keeps test_topk_per_image=50 per image
    assert 0 < len(detections) <= 50
    for det in detections:
        assert det["category_id"] in (1, 2, 3) and 0.0 <= det["score"] <= 1.0
        assert mask_util.decode(det["segmentation"]).shape == (128, 128)
    assert Image.open(out / image.name).size == Image.open(image).size == (128, 128)  # the input's own size


def test_visualize_draws_the_runs_predictions(seem_run, shapes_cache, tmp_path):
    out = tmp_path / "vis"
    _cli(seem_run, shapes_cache, "visualize", str(seem_run), "n=2", "score_thresh=0.0", f"output={out}")
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 2
    image = np.asarray(Image.open(pngs[0]).convert("RGB"))
    h, w, _ = image.shape
    assert w > 2 * 512 and h > 512 and image[:, : w // 2].std() > 10 and image[:, w // 2:].std() > 10
