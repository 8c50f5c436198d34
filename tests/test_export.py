"""`peftseg export`: the written ONNX / TorchScript file, run by its own runtime, matches PyTorch."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from peftseg.checkpoint import export as ex
from peftseg.checkpoint.load import load_model
from peftseg.checkpoint.merge import fold_tuner_layers
from peftseg.errors import UserError

from helpers import make_run, ulps

# Exported vs PyTorch, in float32 ulps (helpers.ulps) of what is compared: the file runs every layer
# through another runtime's kernels (ONNX Runtime / TorchScript, constants folded), so each of the
# network's ~100 reductions may round differently (measured on x86: boxes <= 8 ulps of the image
# side, scores and mask probabilities <= 30 ulps of the largest one). A bug moves them by 1e-2 or more.
# Boxes are pixels of an S-px image: a coordinate's error is ulps of S, not of 1 px.
BOX_ULPS = 64
# Scores / mask probabilities come out of a sigmoid or softmax, which turns the logits' absolute error
# into relative error: ~|logit| times more ulps than the logits carry.
PROB_ULPS = 256


def _pytorch_outputs(run_dir, image):
    """The run's model, loaded and merged independently of the export, on one image."""
    model = fold_tuner_layers(load_model(str(run_dir), []).model)
    adapter = ex.tracing_adapter(model, image)
    with torch.no_grad():
        return [t.numpy() for t in adapter(image)]


def _check_written(result, run_dir, runtime_outputs):
    record = json.loads(result.parity_path.read_text())
    assert record["within_tolerance"] is True and record["classes_equal"] is True
    side = record["input"]["shape"][-1]
    # scores and mask probabilities are at most 1: ulps of 1 (the record keeps no reference values)
    assert record["max_abs_diff"]["scores"] <= ulps(1.0, PROB_ULPS)
    assert record["max_abs_diff"]["boxes"] <= ulps(side, BOX_ULPS)
    assert record["max_abs_diff"]["masks"] <= ulps(1.0, PROB_ULPS)
    assert len(record["images"]) == 3 and all(i["detections_exported"] > 0 for i in record["images"])
    assert record["export_seconds"] > 0
    # a fresh image, the file read back from disk, against a PyTorch model loaded on its own
    (image,) = ex.example_images(side, 1, seed=99)
    ref = dict(zip(record["outputs"], _pytorch_outputs(run_dir, image)))
    got = dict(zip(record["outputs"], runtime_outputs(result.path, image)))
    assert len(ref["scores"]) == len(got["scores"]) > 0
    np.testing.assert_array_equal(ref["classes"], got["classes"])
    np.testing.assert_allclose(got["scores"], ref["scores"], atol=ulps(ref["scores"], PROB_ULPS), rtol=0)
    box_scale = np.abs(ref["boxes"]).max(initial=side)  # maskdino's boxes may overhang the image
    np.testing.assert_allclose(got["boxes"], ref["boxes"], atol=ulps(box_scale, BOX_ULPS), rtol=0)
    np.testing.assert_allclose(got["masks"], ref["masks"], atol=ulps(ref["masks"], PROB_ULPS), rtol=0)
    assert not list(result.path.parent.glob(".*.tmp"))  # atomic writes leave no temp file


def _onnxruntime(path, image):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": image.numpy()})


def _torchscript(path, image):
    with torch.no_grad():
        return [t.numpy() for t in torch.jit.load(str(path))(image)]


def test_vitdet_lora_to_onnx_folds_lora_and_matches_pytorch(tmp_path):
    import onnx

    run = make_run(tmp_path / "lora", "method=lora", noise_seed=1)
    result = ex.export_checkpoint(str(run), "onnx", None, [])
    assert result.path == run / "model_final.onnx"
    _check_written(result, run, _onnxruntime)
    names = {i.name for i in onnx.load(str(result.path)).graph.initializer}
    assert not any("lora" in n for n in names)  # folded into the weights, no LoRA branch left


def test_maskdino_to_onnx_through_the_pytorch_deformable_attention(tmp_path):
    import onnx

    run = make_run(tmp_path / "md", "model=maskdino_tiny", "method=lora", noise_seed=2)
    result = ex.export_checkpoint(str(run), "onnx", str(tmp_path / "out" / "md.onnx"), [])
    _check_written(result, run, _onnxruntime)
    ops = {n.op_type for n in onnx.load(str(result.path)).graph.node}
    assert "GridSample" in ops  # deformable attention as standard ops, no custom one


def test_vitdet_adapter_to_torchscript_keeps_the_adapters_in_the_graph(tmp_path):
    run = make_run(tmp_path / "adapter", "method=adapter", noise_seed=3)
    result = ex.export_checkpoint(str(run), "torchscript", None, [])
    assert result.path.name == "model_final.torchscript.pt"
    _check_written(result, run, _torchscript)
    # the adapters matter: without them the same base gives other scores
    model = load_model(str(run), []).model
    from peftseg.methods._adapter_layers import remove_adapters

    (image,) = ex.example_images(128, 1, seed=99)
    bare = ex.tracing_adapter(remove_adapters(model), image)
    with torch.no_grad():
        bare_scores = bare(image)[-2].numpy()
    exported_scores = _torchscript(result.path, image)[-2]
    # by more than the parity bound above, so not by rounding
    assert bare_scores.shape != exported_scores.shape or not np.allclose(
        bare_scores, exported_scores, rtol=0, atol=ulps(exported_scores, PROB_ULPS))


def test_an_op_without_an_onnx_form_is_refused_by_name_and_nothing_is_written(tmp_path, monkeypatch):
    run = make_run(tmp_path / "lora", "method=lora", noise_seed=1)

    def refuse(*args, **kwargs):  # what the exporter raises for an op it has no symbolic for
        raise torch.onnx.errors.UnsupportedOperatorError("aten::fancy_op", 17, None)

    monkeypatch.setattr(torch.onnx, "export", refuse)
    with pytest.raises(UserError, match=r"family 'vitdet' cannot be exported to onnx: operator aten::fancy_op"):
        ex.export_checkpoint(str(run), "onnx", None, [])
    assert not list(run.glob("*.onnx*")) and not list(run.glob(".*tmp"))
    with pytest.raises(UserError, match="ends in '.safetensors'; the format follows the suffix"):  # the output guard
        ex.export_checkpoint(str(run), "onnx", str(run / "model_final.safetensors"), [])
    with pytest.raises(UserError, match="format=onnx or format=torchscript"):
        ex.export_checkpoint(str(run), "tflite", None, [])


def test_export_is_a_command_with_help(capsys):
    from peftseg.cli import main

    assert main(["--help"]) == 0 and "export   the model as one ONNX or TorchScript file" in capsys.readouterr().out
    assert main(["export", "--help"]) == 0
    out = capsys.readouterr().out
    assert "format=onnx|torchscript" in out and "scores 1024 ulps, boxes 64 ulps of the image side, masks 1024 ulps" in out
    assert main(["export", "checkpoint=x"]) == 2  # no format: one paragraph, exit 2
    assert "needs format=" in capsys.readouterr().err
