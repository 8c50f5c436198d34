"""`peftseg export`: the written ONNX / TorchScript file, run by its own runtime, matches PyTorch for
every family and method; a model that is broken or cannot be compared is refused; a file that failed
parity never looks deployable; outputs never replace other outputs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from peftseg.checkpoint import export as ex
from peftseg.checkpoint.load import load_model
from peftseg.checkpoint.merge import fold_tuner_layers, merge_checkpoint
from peftseg.errors import UserError

from helpers import cli_in_process, make_run, run_in_process, ulps

# Exported vs PyTorch, in float32 ulps (helpers.ulps) of what is compared: the file runs every layer
# through another runtime's kernels (ONNX Runtime / TorchScript, constants folded), so each of the
# network's ~100 reductions may round differently (measured on x86: boxes <= 8 ulps of the image
# side, scores and mask probabilities <= 30 ulps of the largest one). A bug moves them by 1e-2 or more.
# Boxes are pixels of an S-px image: a coordinate's error is ulps of S, not of 1 px.
BOX_ULPS = 64
# Scores / mask probabilities come out of a sigmoid or softmax, which turns the logits' absolute error
# into relative error: ~|logit| times more ulps than the logits carry.
PROB_ULPS = 256

FAMILIES = {"vitdet": "vitdet_tiny", "swin": "swin_tiny", "mask2former": "m2f_tiny", "maskdino": "maskdino_tiny",
            "seem": "seem_tiny"}
# the query families' boxes come from their masks (seem, mask2former: around them; maskdino: its
# anchors), and under checkpoints of random trained tensors their masks may cover the whole image on
# every image, so a box frozen by tracing would still match: those train for a few iterations
# instead, after which their masks (and boxes) follow the image
TRAINED = {"seem", "maskdino", "mask2former"}


def _pytorch_outputs(checkpoint, images):
    """The checkpoint's model, loaded and merged independently of the export, on `images`."""
    model = fold_tuner_layers(load_model(str(checkpoint), []).model)
    adapter = ex.tracing_adapter(model, images[0])
    with torch.no_grad():
        return [[t.numpy() for t in adapter(image)] for image in images]


def _check_written(result, checkpoint, runtime):
    record = json.loads(result.parity_path.read_text())
    assert result.ok and record["status"] == "ok" and record["problems"] == []
    assert record["within_tolerance"] is True and record["classes_equal"] is True
    assert record["compared_detections"] >= ex.MIN_COMPARED
    side = record["input"]["shape"][-1]
    # scores and mask probabilities are at most 1: ulps of 1 (the record keeps no reference values)
    assert record["max_abs_diff"]["scores"] <= ulps(1.0, PROB_ULPS)
    assert record["max_abs_diff"]["boxes"] <= ulps(side, BOX_ULPS)
    if record["binary_masks"]:  # query families: pixels at the threshold may flip, few of them
        assert record["mask_pixels"]["differing"] <= record["mask_pixels"]["allowed"]
        assert record["mask_pixels"]["allowed"] == int(ex.BINARY_MASK_PIXELS * record["mask_pixels"]["compared"])
    else:
        assert record["max_abs_diff"]["masks"] <= ulps(1.0, PROB_ULPS)
    assert len(record["images"]) == 3 and all(i["detections_exported"] > 0 for i in record["images"])
    assert record["export_seconds"] > 0
    # fresh images, the file read back from disk, against a PyTorch model loaded on its own
    images = ex.example_images(side, 2, seed=99)
    refs = [dict(zip(record["outputs"], out)) for out in _pytorch_outputs(checkpoint, images)]
    # the comparison can see a value frozen by tracing: the boxes differ from image to image
    assert refs[0]["boxes"].shape != refs[1]["boxes"].shape or not np.array_equal(refs[0]["boxes"], refs[1]["boxes"])
    run = runtime(result.path)
    for image, ref in zip(images, refs):
        got = dict(zip(record["outputs"], run(image)))
        assert len(ref["scores"]) == len(got["scores"]) > 0
        np.testing.assert_array_equal(ref["classes"], got["classes"])
        np.testing.assert_allclose(got["scores"], ref["scores"], atol=ulps(ref["scores"], PROB_ULPS), rtol=0)
        box_scale = np.abs(ref["boxes"]).max(initial=side)  # maskdino's boxes may overhang the image
        np.testing.assert_allclose(got["boxes"], ref["boxes"], atol=ulps(box_scale, BOX_ULPS), rtol=0)
        if record["binary_masks"]:
            assert np.count_nonzero(got["masks"] != ref["masks"]) <= ex.BINARY_MASK_PIXELS * ref["masks"].size
        else:
            np.testing.assert_allclose(got["masks"], ref["masks"], atol=ulps(ref["masks"], PROB_ULPS), rtol=0)
    assert not list(result.path.parent.glob(".*.tmp"))  # atomic writes leave no temp file
    assert not ex.failed_path(result.path, record["format"]).exists()


def _onnxruntime(path):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda image: session.run(None, {"image": image.numpy()})


def _torchscript(path):
    loaded = torch.jit.load(str(path))

    def run(image):
        with torch.no_grad():
            return [t.numpy() for t in loaded(image)]
    return run


def _exported_program(path):
    program = torch.export.load(str(path)).module()  # the test's own file: unpickling it is safe

    def run(image):
        with torch.no_grad():
            return [t.numpy() for t in program(image)]
    return run


RUNTIMES = {"onnx": _onnxruntime, "pt2": _exported_program, "torchscript": _torchscript}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, shapes_cache):
    """checkpoint(family, method) -> a file to export, built once per module: for lora the run
    merged by `peftseg merge` (LoRA folded into a plain model), else the run's own checkpoint."""
    root = tmp_path_factory.mktemp("export_runs")
    built = {}

    def checkpoint(family, method):
        if (family, method) not in built:
            run = root / f"{family}-{method}"
            overrides = (f"model={FAMILIES[family]}", f"method={method}")
            if family in TRAINED:
                run.mkdir()
                # 4 val images: the run's own evaluation is not what is tested here
                run_in_process(run, shapes_cache, *overrides, "train.max_iter=10", "train.warmup_iters=0",
                               "dataset.num_val=4")
            else:
                make_run(run, *overrides, noise_seed=1 + list(FAMILIES).index(family) * 3 + len(method))
            built[family, method] = (merge_checkpoint(str(run), [], str(root / f"{family}-merged.safetensors"))[1]
                                     if method == "lora" else run / "model_final.safetensors")
        return built[family, method]

    return checkpoint


# detectron2's Swin builds its shifted-window mask by assigning to slices of a zero tensor; where a
# stage's feature map is no larger than one window (swin_tiny's last stage at 128 px: 4 px, window 7)
# those slices are empty, and torch's ONNX shape inference fails on them (at 256 px it exports)
REFUSED = {("swin", "onnx"): "model family 'swin' cannot be exported to onnx: the onnx exporter failed inside torch "
                             "(RuntimeError: minus_one_pos != -1 INTERNAL ASSERT FAILED",
           # Detectron2's RPN keeps the top-k proposals with Python branches on how many there are: a
           # value torch.export does not trace through
           ("vitdet", "pt2"): "model family 'vitdet' cannot be exported to pt2: the pt2 exporter failed inside torch "
                              "(GuardOnDataDependentSymNode: Could not guard on data-dependent expression"}
# one xdist group per family: each family's runs are built once, beside the other families'
# ONNX: the Mask R-CNN families through the TorchScript-based exporter (seconds), the query families
# through the dynamo exporter (~40-90 s a model here), one of them in the suite; the full matrix of
# families x methods x formats is scripts/export_parity.py's (docs/benchmarks)
# TorchScript (deprecated by torch): every family with LoRA folded in, the adapter and side graphs on
# one query family each
CASES = [(family, "lora", "torchscript") for family in FAMILIES]
CASES += [("maskdino", "adapter", "torchscript"), ("mask2former", "side", "torchscript")]
CASES += [("vitdet", method, "onnx") for method in ("lora", "adapter", "side")]
CASES += [("swin", "lora", "onnx"), ("mask2former", "lora", "onnx")]
MATRIX = [pytest.param(family, method, fmt, marks=pytest.mark.xdist_group(f"export-{family}"))
          for family, method, fmt in CASES]
# pt2 (torch.export takes ~30-70 s a model here): one query family (seem, the quickest), with LoRA
# folded in, and one Mask R-CNN family, refused; the full matrix is scripts/export_parity.py's
# (docs/benchmarks/export_parity_pt2.json)
MATRIX += [pytest.param("seem", "lora", "pt2", marks=pytest.mark.xdist_group("export-seem")),
           pytest.param("vitdet", "lora", "pt2", marks=pytest.mark.xdist_group("export-vitdet"))]


@pytest.mark.parametrize("family, method, fmt", MATRIX)
def test_every_family_and_method_exports_with_parity(family, method, fmt, checkpoints, tmp_path):
    source = checkpoints(family, method)
    out = tmp_path / f"out{ex.FORMATS[fmt]}"
    if (family, fmt) in REFUSED:
        with pytest.raises(UserError) as e:
            ex.export_checkpoint(str(source), fmt, str(out), [])
        assert str(e.value).startswith(REFUSED[family, fmt]) and str(e.value).endswith(
            "Nothing was written; export another format, or serve this model with PyTorch (`peftseg predict`).")
        assert not list(tmp_path.iterdir())
        return
    result = ex.export_checkpoint(str(source), fmt, str(out), [])
    _check_written(result, source, RUNTIMES[fmt])
    assert result.parity["checkpoint_kind"] == ("merged" if method == "lora" else "peft")
    if fmt == "onnx":
        import onnx

        # torch.export captures the query families (dynamo exporter); detectron2's RPN it cannot
        assert result.parity["onnx_exporter"] == ("torchscript" if family in ("vitdet", "swin") else "dynamo")
        assert result.parity["opset"] == (ex.OPSET if family in ("vitdet", "swin") else ex.ONNX_OPSET)
        if family == "vitdet":
            assert "RPN" in result.parity["onnx_exporter_why"]

        graph = onnx.load(str(result.path)).graph
        # LoRA is folded into the weights: no LoRA branch is left (adapters and side paths stay)
        assert not any("lora" in i.name for i in graph.initializer)
        if family == "maskdino":
            assert "GridSample" in {n.op_type for n in graph.node}  # deformable attention as standard ops
    if fmt == "pt2":
        program = torch.export.load(str(result.path))
        assert result.parity["opset"] is None and result.parity["deprecated"] is None
        assert program.state_dict and not any("lora" in k for k in program.state_dict)  # folded in


def test_a_run_dir_exports_beside_its_checkpoint_with_the_adapters_in_the_graph(tmp_path):
    from peftseg.methods._adapter_layers import remove_adapters

    run = make_run(tmp_path / "adapter", "method=adapter", noise_seed=3)
    result = ex.export_checkpoint(str(run), "torchscript", None, [])
    assert result.path == run / "model_final.torchscript.pt" and result.parity_path.is_file()
    # the adapters matter: without them the same base gives other scores
    (image,) = ex.example_images(128, 1, seed=99)
    bare = ex.tracing_adapter(remove_adapters(load_model(str(run), []).model), image)
    with torch.no_grad():
        bare_scores = bare(image)[-2].numpy()
    exported_scores = _torchscript(result.path)(image)[-2]
    # by more than the parity bound above, so not by rounding
    assert bare_scores.shape != exported_scores.shape or not np.allclose(
        bare_scores, exported_scores, rtol=0, atol=ulps(exported_scores, PROB_ULPS))


def _copy_with(source, dest, change):
    """A copy of the merged file `source` at `dest` with its tensors changed by `change(state)`."""
    with safe_open(str(source), "pt") as f:
        meta = f.metadata()
    state = load_file(str(source))
    change(state)
    save_file(state, str(dest), metadata=meta)
    return dest


def test_a_model_with_nan_weights_is_refused_by_tensor_name_and_nothing_is_written(checkpoints, tmp_path, shapes_cache):
    def nan_backbone(state):
        for k in state:
            if k.startswith("backbone."):
                state[k] = torch.full_like(state[k], float("nan"))

    broken = _copy_with(checkpoints("vitdet", "lora"), tmp_path / "broken.safetensors", nan_backbone)
    n_backbone = sum(1 for k in load_file(str(broken)) if k.startswith("backbone."))
    with pytest.raises(UserError) as e:
        ex.export_checkpoint(str(broken), "onnx", None, [])
    text = str(e.value)
    assert text.startswith(f"{broken} holds NaN or infinite values in {n_backbone} of its ")
    assert "backbone.simfp_3.0.weight (18432 NaN of 18432 values)" in text
    assert f"and {n_backbone - 5} more. A model with non-finite weights computes nothing meaningful" in text
    proc = cli_in_process("export", f"checkpoint={broken}", "format=torchscript", cwd=tmp_path, cache=shapes_cache)
    assert proc.returncode == 2 and "holds NaN or infinite values" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.safetensors"]

    def inf_one(state):
        state["roi_heads.box_predictor.cls_score.weight"][0, 0] = float("inf")

    one = _copy_with(checkpoints("vitdet", "lora"), tmp_path / "one.safetensors", inf_one)
    with pytest.raises(UserError, match=r"in 1 of its \d+ tensors: roi_heads.box_predictor.cls_score.weight "
                                        r"\(1 inf of \d+ values\)\. A model"):
        ex.export_checkpoint(str(one), "onnx", None, [])


def test_finite_weights_whose_outputs_overflow_are_refused(tmp_path):
    def huge(state):  # finite, but the class logits overflow to inf and the softmax gives NaN
        state["sem_seg_head.predictor.class_embed"] *= 3e38

    run = make_run(tmp_path / "seem", "model=seem_tiny", "method=lora", noise_seed=1)
    merged = merge_checkpoint(str(run), [], str(tmp_path / "merged.safetensors"))[1]
    source = _copy_with(merged, tmp_path / "huge.safetensors", huge)
    with pytest.raises(UserError) as e:
        ex.export_checkpoint(str(source), "onnx", None, [])
    assert str(e.value) == (
        f"seem_tiny + lora from {source} gives NaN or infinite outputs in PyTorch itself (scores on image 0, scores on "
        "image 1, scores on image 2) on the 3 parity images (seeded coloured discs over noise, 128 px), so there is "
        "nothing correct to export; nothing was written. Its weights are finite, so the values overflow inside the "
        "network: export the checkpoint of a run that trained stably.")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["huge.safetensors", "merged.safetensors", "seem"]


def test_a_model_that_detects_too_little_to_compare_is_refused(checkpoints, tmp_path):
    # a plain checkpoint (the merged tensors without peftseg's metadata) run with a score threshold
    # no detection reaches: 0 vs 0 detections would compare nothing
    plain = tmp_path / "plain.pth"
    torch.save({"model": load_file(str(checkpoints("vitdet", "lora")))}, plain)
    overrides = ["model=vitdet_tiny", "model.score_thresh_test=0.999"]
    with pytest.raises(UserError) as e:
        ex.export_checkpoint(str(plain), "onnx", None, overrides, classes=["circle", "square", "triangle"])
    assert "finds 0 detections (0 + 0 + 0) on the 3 parity images (seeded coloured discs over noise, 128 px), " \
           f"fewer than the {ex.MIN_COMPARED} that the parity check needs" in str(e.value)
    assert "give images=<folder> with a few images of what it was trained on" in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.pth"]


def test_parity_on_the_users_images(checkpoints, tmp_path, shapes_cache):
    from PIL import Image

    folder = tmp_path / "mine"
    folder.mkdir()
    for i, image in enumerate(ex.example_images(96, 2, seed=7)):  # 96 px: resized to the input's 128
        Image.fromarray(image.permute(1, 2, 0).round().byte().numpy()).save(folder / f"{i}.png")
    source = checkpoints("vitdet", "lora")
    proc = cli_in_process("export", f"checkpoint={source}", "format=torchscript", f"output={tmp_path / 'v.pt'}",
                          f"images={folder}", cwd=tmp_path, cache=shapes_cache)
    assert proc.returncode == 0, proc.stderr
    assert "parity on 2 images (100 detections compared)" in proc.stdout
    record = json.loads((tmp_path / "v.pt.parity.json").read_text())
    assert record["parity_images"] == [str(folder / "0.png"), str(folder / "1.png")] and record["status"] == "ok"
    (folder / "2.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match=r"images= .*2.png cannot be used: not a readable image"):
        ex.export_checkpoint(str(source), "onnx", str(tmp_path / "w.onnx"), [], images=sorted(folder.iterdir()))
    proc = cli_in_process("export", f"checkpoint={source}", "format=onnx", f"images={tmp_path / 'none'}",
                          cwd=tmp_path, cache=shapes_cache)
    assert proc.returncode == 2 and f"images={tmp_path / 'none'} names no image" in proc.stderr


def test_the_verdict_needs_compared_detections_equal_classes_and_finite_values():
    base = {"same_detection_count": True, "compared_detections": 30, "min_compared_detections": 10,
            "classes_equal": True, "nonfinite_exported": [], "images": [],
            "max_abs_diff": {"scores": 0.0, "boxes": 0.0, "masks": 0.0}, "tolerance": ex.tolerance_for(128)}
    assert ex.parity_problems(base) == []
    # 0 vs 0 detections compare nothing, however small the differences
    assert ex.parity_problems({**base, "compared_detections": 0}) == [
        "only 0 detections were compared (at least 10 are needed)"]
    assert ex.parity_problems({**base, "nonfinite_exported": ["boxes"], "max_abs_diff": {**base["max_abs_diff"], "boxes": None}}) == [
        "the exported file gives NaN or inf boxes where PyTorch's are finite"]
    assert ex.parity_problems({**base, "classes_equal": False}) == ["the classes differ"]
    # binary masks: a flipped pixel is a difference of 1, judged by how many flip, not by ulps
    binary = {**base, "binary_masks": True, "max_abs_diff": {**base["max_abs_diff"], "masks": 1.0},
              "mask_pixels": {"differing": 2, "compared": 2457600, "allowed": 24}}
    assert ex.parity_problems(binary) == []
    assert ex.parity_problems({**binary, "mask_pixels": {**binary["mask_pixels"], "differing": 25}}) == [
        "25 of the 2457600 binary mask pixels differ (at most 24 may: those whose logit is within rounding of the "
        "threshold)"]
    assert ex.parity_problems({**base, "max_abs_diff": {**base["max_abs_diff"], "masks": 1.0}}) == [
        "max abs differences over the tolerance: masks 1 > 0.000122"]  # probabilities: ulps
    assert ex.parity_problems({**base, "same_detection_count": False, "images": [
        {"detections_pytorch": 50, "detections_exported": 0}]}) == [
        "the exported file finds other numbers of detections than PyTorch (50 vs 0)"]


def test_an_exported_nan_is_a_failure_not_a_zero_difference(checkpoints):
    source = checkpoints("vitdet", "lora")
    model = fold_tuner_layers(load_model(str(source), []).model)
    images = ex.example_images(128, 3, seed=0)
    adapter = ex.tracing_adapter(model, images[0])
    with torch.no_grad():
        names = ex._output_names(adapter, adapter(images[0]))
    refs = ex.reference_outputs(adapter, names, images, "m")

    def nan_boxes(image):  # PyTorch's own outputs, but boxes NaN: max() would have dropped them
        ref = next(r for r, i in zip(refs, images) if i is image)
        return [np.full_like(ref[n], np.nan) if n == "boxes" else ref[n] for n in names]

    parity = ex.check_parity(refs, nan_boxes, images)
    assert parity["max_abs_diff"] == {"scores": 0.0, "boxes": None, "masks": 0.0}
    assert parity["within_tolerance"] is False and parity["problems"] == [
        "the exported file gives NaN or inf boxes where PyTorch's are finite"]


def test_a_failed_parity_leaves_no_file_that_looks_deployable(checkpoints, tmp_path, shapes_cache, monkeypatch):
    source = shutil.copy(checkpoints("vitdet", "lora"), tmp_path / "v1.safetensors")
    good = ex.export_checkpoint(str(source), "onnx", None, [])
    assert good.ok and good.path == tmp_path / "v1.onnx"
    real_runner = ex._runner

    def shifted(payload, fmt):  # a graph whose boxes are 3 px off (as seem's were)
        run = real_runner(payload, fmt)
        return lambda image: [o + 3 if i == 0 else o for i, o in enumerate(run(image))]

    monkeypatch.setattr(ex, "_runner", shifted)
    proc = cli_in_process("export", f"checkpoint={source}", "format=onnx", cwd=tmp_path, cache=shapes_cache)
    assert proc.returncode == 1
    failed = tmp_path / "v1.FAILED-parity.onnx"
    assert ("the exported file does not match PyTorch: max abs differences over the tolerance: boxes 3 > 0.000977 "
            "(tolerance scores 0.000122, boxes 0.000977, masks 0.000122). It was written as "
            f"{failed}, not as {tmp_path / 'v1.onnx'}, so that it is not deployed by mistake") in " ".join(proc.stderr.split())
    assert (f"removed this checkpoint's earlier onnx export {tmp_path / 'v1.onnx'} and its record: the same export "
            "fails parity now") in proc.stdout
    # the verified file of before is gone too: the only file is the one named as failed, with its record
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "v1.FAILED-parity.onnx", "v1.FAILED-parity.onnx.parity.json", "v1.safetensors"]
    record = json.loads((tmp_path / "v1.FAILED-parity.onnx.parity.json").read_text())
    assert record["status"] == "failed" and record["within_tolerance"] is False and record["file"] == str(failed)
    assert abs(record["max_abs_diff"]["boxes"] - 3) <= ulps(128, BOX_ULPS)  # the shift, plus the runtime's rounding
    # a passing export again: the verified file comes back and the failed one goes
    monkeypatch.setattr(ex, "_runner", real_runner)
    proc = cli_in_process("export", f"checkpoint={source}", "format=onnx", cwd=tmp_path, cache=shapes_cache)
    assert proc.returncode == 0
    assert f"removed this checkpoint's earlier failed onnx export {failed} and its record: superseded" in proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v1.onnx", "v1.onnx.parity.json", "v1.safetensors"]


def test_outputs_are_distinct_and_never_replace_another_output(checkpoints, tmp_path, shapes_cache):
    merged = checkpoints("vitdet", "lora")
    v12 = shutil.copy(merged, tmp_path / "v1.2.safetensors")
    v13 = shutil.copy(merged, tmp_path / "v1.3.safetensors")
    assert ex.default_output(v12, "onnx") == tmp_path / "v1.2.onnx"  # the whole stem
    assert ex.default_output(v12, "torchscript") == tmp_path / "v1.2.torchscript.pt"
    first = ex.export_checkpoint(str(v12), "onnx", None, [])
    second = ex.export_checkpoint(str(v13), "onnx", None, [])
    assert (first.path, second.path) == (tmp_path / "v1.2.onnx", tmp_path / "v1.3.onnx")
    assert json.loads(first.parity_path.read_text())["checkpoint"] == str(v12)
    # this command's own earlier output of the same checkpoint and format: replaced, and said so
    proc = cli_in_process("export", "checkpoint=v1.2.safetensors", "format=onnx", cwd=tmp_path, cache=shapes_cache)
    assert proc.returncode == 0
    assert f"replacing this command's own earlier onnx export of {v12}: v1.2.onnx" in proc.stdout
    # another checkpoint's output: refused, naming both
    with pytest.raises(UserError) as e:
        ex.export_checkpoint(str(v13), "onnx", str(tmp_path / "v1.2.onnx"), [])
    assert str(e.value) == (
        f"output={tmp_path / 'v1.2.onnx'} already exists as this command's output for other inputs (its record "
        f"v1.2.onnx.parity.json says checkpoint '{v12}' there, '{v13}' now); writing there would replace it. Give "
        "another output=, or remove the file and its record yourself if they may go.")
    # the same path with other bytes (the checkpoint was replaced since): refused too
    def nudge(state):
        state["roi_heads.box_predictor.cls_score.bias"] += 1

    _copy_with(merged, v12, nudge)
    with pytest.raises(UserError, match=r"its record v1.2.onnx.parity.json says checkpoint_sha256 '[0-9a-f]{64}' there, "
                                        r"'[0-9a-f]{64}' now\); writing there would replace it"):
        ex.export_checkpoint(str(v12), "onnx", None, [])
    # a file this command did not write: refused, untouched
    mine = tmp_path / "mine.onnx"
    mine.write_bytes(b"a graph of my own")
    with pytest.raises(UserError, match=r"mine.onnx already exists and is not this command's own earlier output "
                                        r"\(there is no readable record mine.onnx.parity.json beside it\)"):
        ex.export_checkpoint(str(v13), "onnx", str(mine), [])
    assert mine.read_bytes() == b"a graph of my own"


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
    with pytest.raises(UserError, match=r"choose format=onnx, format=pt2 or format=torchscript \(deprecated by torch\)"):
        ex.export_checkpoint(str(run), "tflite", None, [])
    # pt2 has the same output guard: its suffix, never an input
    with pytest.raises(UserError, match="ends in '.onnx'; the format follows the suffix"):
        ex.export_checkpoint(str(run), "pt2", str(tmp_path / "m.onnx"), [])


def test_export_is_a_command_with_help_and_the_readme_commands_use_its_suffixes(capsys):
    import re
    from pathlib import Path

    from peftseg.cli import main

    assert main(["--help"]) == 0 and "export   the model as one ONNX, PyTorch 2 (.pt2) or TorchScript file" in capsys.readouterr().out
    assert main(["export", "--help"]) == 0
    out = capsys.readouterr().out
    assert "format=onnx|pt2|torchscript" in out and "format=torchscript is deprecated by torch" in out and "scores 1024 ulps, boxes 64 ulps of the image side, masks 1024 ulps" in out
    assert f"fewer than\n{ex.MIN_COMPARED} detections" in out and "<name>.FAILED-parity<suffix>" in out
    assert main(["export", "checkpoint=x"]) == 2  # no format: one paragraph, exit 2
    assert "needs format=" in capsys.readouterr().err
    # the README's export commands name outputs the command writes (.onnx for onnx, .pt2, .pt for torchscript)
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    commands = re.findall(r"peftseg export [^\n`]*format=(\w+)[^\n`]*output=(\S+)", readme)
    assert commands and all(Path(o).suffix == {"onnx": ".onnx", "pt2": ".pt2", "torchscript": ".pt"}[f] for f, o in commands)


def test_export_says_each_step_on_stderr_and_keeps_stdout_for_what_it_wrote(tmp_path, shapes_cache):
    from PIL import Image

    run = make_run(tmp_path / "lora", "method=lora", noise_seed=5)
    images = tmp_path / "images"
    images.mkdir()
    for i, image in enumerate(ex.example_images(128, 2, seed=3)):
        Image.fromarray(image.permute(1, 2, 0).round().byte().numpy()).save(images / f"{i}.png")
    (images / "labels.csv").write_text("file,label\n")
    proc = cli_in_process("export", f"checkpoint={run}", "format=torchscript", f"images={images}", cwd=tmp_path,
                          cache=shapes_cache)
    assert proc.returncode == 0, proc.stderr
    # not a terminal here: one line per step, as it starts, in order
    steps = [line for line in proc.stderr.splitlines() if line.startswith("export: ")]
    assert steps == [f"export: loading {run}", "export: running PyTorch on 2 parity images",
                     "export: tracing the model and writing it as TorchScript (deprecated by torch)",
                     "export: parity check: the file in torch.jit.load vs PyTorch on 2 images"]
    assert "export:" not in proc.stdout and "exported vitdet_tiny + lora" in proc.stdout
    assert "note: format=torchscript is deprecated: TorchScript is deprecated by torch" in proc.stdout
    assert "format=pt2 is its successor" in proc.stdout
    assert f"skipped labels.csv in {images}: not an image" in proc.stdout
