"""Task variants on one frozen base (checkpoint=[a,b,c]): each variant is its checkpoint loaded
alone, run through the same checks, class handling, outputs and records as one checkpoint."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console

from peftseg.checkpoint.load import load_model
from peftseg.checkpoint.variants import load_variants, variant_names
from peftseg.errors import UserError
from peftseg.params import count_parameters

from helpers import CLASSES, cli_in_process, make_run

# every family task variants serve, at its CPU size
FAMILY_PRESETS = ("vitdet_tiny", "swin_tiny", "m2f_tiny", "maskdino_tiny", "seem_tiny")
OTHER_CLASSES = ["apple", "banana", "cherry"]  # a run on other data: seem classifies by these names


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("variants")
    return [
        # both also in the neck's convs (detectron2 Conv2d: the update before their LN), lora_b in the mask head's
        make_run(root / "lora_a", "method=lora", "method.targets=[attn_qkv,attn_proj,neck_conv]", noise_seed=1),
        make_run(root / "lora_b", "method=lora", "method.targets=[attn_proj,mlp,neck_conv,mask_head_conv]",
                 "method.rank=2", noise_seed=2),
        make_run(root / "adapter", "method=adapter", noise_seed=3),
        make_run(root / "side", "method=side", noise_seed=4),  # attached modules + hooks of its own
        make_run(root / "bitfit", "method=bitfit", noise_seed=5),  # trains base tensors (biases) only
    ]


@pytest.fixture(scope="module")
def vset(runs):
    return load_variants([str(r) for r in runs], [])


def _inputs():
    g = torch.Generator().manual_seed(0)
    return [{"image": (torch.rand(3, 128, 128, generator=g) * 255).to(torch.uint8), "height": 128, "width": 128}
            for _ in range(2)]


def _outputs(model, inputs):
    with torch.no_grad():
        return [o["instances"] for o in model(inputs)]


def test_each_variant_computes_exactly_what_it_computes_alone(vset):
    """Two LoRA variants (peft adapters in the same Linears and convs), adapters, a side path, bitfit."""
    assert [v.name for v in vset] == ["lora_a", "lora_b", "adapter", "side", "bitfit"]
    inputs = _inputs()
    shared = {v.name: _outputs(vset.activate(v), inputs) for v in vset}
    for v in reversed(vset.variants):  # switching back and forth changes nothing either
        alone = _outputs(load_model(str(v.source), []).model, inputs)
        again = _outputs(vset.activate(v), inputs)
        for ref, got, got_again in zip(alone, shared[v.name], again):
            assert len(ref) > 0
            for field in ("scores", "pred_classes", "pred_masks"):
                assert torch.equal(getattr(ref, field), getattr(got, field)), (v.name, field)
                assert torch.equal(getattr(ref, field), getattr(got_again, field)), (v.name, field)
            assert torch.equal(ref.pred_boxes.tensor, got.pred_boxes.tensor), v.name
        assert vset.param_counts(v) == count_parameters(load_model(str(v.source), []).model), v.name
    # the variants do differ: the switch is what makes each one's outputs
    scores = [shared[v.name][0].scores for v in vset]
    assert all(not torch.equal(x, y) for i, x in enumerate(scores) for y in scores[i + 1:])
    # two LoRA adapters in the same peft layers (qkv only in lora_a, proj/mlp in both)
    proj = vset.model.get_submodule("backbone.net.blocks.0.attn.proj")
    assert set(proj.lora_A) == {"variant0", "variant1"}
    # and two in the same convs, which switch as the Linears do
    conv = vset.model.get_submodule("backbone.simfp_4.1")
    assert set(conv.lora_A) == {"variant0", "variant1"} and conv.lora_A["variant1"].out_channels == 2
    assert set(vset.model.get_submodule("roi_heads.mask_head.mask_fcn1").lora_A) == {"variant1"}


def test_memory_is_the_base_once_plus_measured_deltas(vset, runs):
    mem = vset.memory()
    lora_a = vset.get("lora_a")
    alone_bytes = sum(t.numel() * t.element_size() for t in load_model(str(runs[0]), []).model.state_dict().values())
    assert mem["separate"]["lora_a"] == alone_bytes  # a separate model, measured tensor by tensor
    assert mem["variants"]["lora_a"] == lora_a.added_bytes + lora_a.swapped_bytes > 0
    assert mem["shared_total"] == mem["base"] + sum(mem["variants"].values())
    # every tensor resident in the shared model is counted: the model's own + the inactive variants' kept ones
    vset.activate(None)
    seen = {}
    for t in vset.model.state_dict().values():
        seen[t.data_ptr()] = t.numel() * t.element_size()
    for v in vset:
        for t in v.swapped.values():
            seen[t.data_ptr()] = t.numel() * t.element_size()
        for child in v.children.values():
            for t in child.state_dict().values():
                seen[t.data_ptr()] = t.numel() * t.element_size()
    assert sum(seen.values()) == mem["shared_total"]


def test_a_checkpoint_of_another_base_is_refused_by_name(runs, tmp_path):
    other = make_run(tmp_path / "other_seed", "method=lora", "train.seed=7", noise_seed=4)
    with pytest.raises(UserError, match=r"other_seed.*other frozen base weights"):
        load_variants([str(runs[0]), str(other)], [])
    with pytest.raises(UserError, match="another model"):
        load_variants([str(runs[0]), str(make_run(tmp_path / "wider", "method=lora", "model=vitdet_tiny",
                                                   "model.image_size=96", noise_seed=5))], [])


def test_predict_writes_each_variant_to_its_folder(runs, tmp_path):
    from peftseg.cli.predict import main

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)).save(images / "a.png")
    console = Console(file=io.StringIO(), width=200)
    out = tmp_path / "pred"
    assert main([f"checkpoint=[{runs[0]},{runs[2]}]", f"input={images}", f"output={out}", "score_thresh=0"],
                console) == 0
    for name in ("lora_a", "adapter"):
        assert (out / name / "a.png").is_file() and (out / name / "predictions.json").is_file()
    text = console.file.getvalue()
    assert "base (once)" in text and "+ lora_a (lora)" in text and "+ adapter (adapter)" in text


@pytest.fixture(scope="module")
def family_sets(tmp_path_factory):
    """Per model preset (built on first use, shared by the tests): three runs on one base, a LoRA
    run, a bottleneck-adapter run and a LoRA run on other classes, and their VariantSet."""
    built = {}

    def get(preset: str):
        if preset not in built:
            root = tmp_path_factory.mktemp(preset)
            model = f"model={preset}"
            runs = [make_run(root / "lora", model, "method=lora", noise_seed=1),
                    make_run(root / "adapter", model, "method=adapter", noise_seed=2),
                    make_run(root / "other_classes", model, "method=lora", "method.rank=2", noise_seed=3,
                             classes=OTHER_CLASSES)]
            built[preset] = runs, load_variants([str(r) for r in runs], [])
        return built[preset]

    return get


def _image(tmp_path: Path) -> Path:
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(images / "a.png")
    return images


@pytest.mark.parametrize("preset", FAMILY_PRESETS)
def test_every_family_variant_is_its_checkpoint_loaded_alone(family_sets, preset):
    """Outputs bit for bit, parameter accounting and classes: seem's variant on other classes
    classifies with its own class names' text embeddings, not the first variant's."""
    runs, vset = family_sets(preset)
    g = torch.Generator().manual_seed(0)
    inputs = [{"image": (torch.rand(3, 96, 96, generator=g) * 255).to(torch.uint8), "height": 96, "width": 96}]
    shared = {v.name: _outputs(vset.activate(v), inputs)[0] for v in vset}
    for v in reversed(vset.variants):  # another order than loading: each switch sets everything it owns
        alone = load_model(str(v.source), [])
        ref, got = _outputs(alone.model, inputs)[0], _outputs(vset.activate(v), inputs)[0]
        assert len(ref) > 0, (preset, v.name)
        for field in ("scores", "pred_classes", "pred_masks"):
            assert torch.equal(getattr(ref, field), getattr(got, field)), (preset, v.name, field)
            assert torch.equal(getattr(ref, field), getattr(shared[v.name], field)), (preset, v.name, field)
        assert torch.equal(ref.pred_boxes.tensor, got.pred_boxes.tensor), (preset, v.name)
        assert vset.param_counts(v) == count_parameters(alone.model), (preset, v.name)
        loaded = vset.loaded(v)
        assert (loaded.class_names, loaded.source, loaded.kind) == (alone.class_names, alone.source, alone.kind)
    assert vset.get("other_classes").class_names == OTHER_CLASSES
    scores = [shared[v.name].scores for v in vset]  # the variants do differ
    assert all(not torch.equal(x, y) for i, x in enumerate(scores) for y in scores[i + 1:]), preset


def test_predict_variants_of_other_classes_write_what_each_checkpoint_writes_alone(family_sets, tmp_path):
    """seem, variants of other class names: each variant's predictions.json equals a single
    predict's of its checkpoint, labels and scores (its own class names' text embeddings)."""
    from peftseg.cli.predict import main

    runs, _ = family_sets("seem_tiny")
    images = _image(tmp_path)
    console = Console(file=io.StringIO(), width=200)
    # a threshold that keeps a few of the 50 detections: the Visualizer draws each one, slowly
    assert main([f"checkpoint=[{runs[2]},{runs[0]}]", f"input={images}", f"output={tmp_path / 'shared'}",
                 "score_thresh=0.2"], console) == 0
    for run, classes in ((runs[2], OTHER_CLASSES), (runs[0], CLASSES)):
        alone = tmp_path / f"alone_{run.name}"
        assert main([f"checkpoint={run}", f"input={images}", f"output={alone}", "score_thresh=0.2"], console) == 0
        got = json.loads((tmp_path / "shared" / run.name / "predictions.json").read_text())
        want = json.loads((alone / "predictions.json").read_text())
        assert got == want and len(want) > 0, run.name
        assert {d["category_name"] for d in got} <= set(classes)


def _blind_run(run: Path, run_dir: Path) -> Path:
    """`run` with its background logit raised by 100: it detects nothing, so COCOeval has no AP."""
    from peftseg.checkpoint.files import FINAL, PeftCheckpointer, read_checkpoint_file

    _, data = read_checkpoint_file(run)
    loaded = load_model(str(run), [])
    with torch.no_grad():
        loaded.model.roi_heads.box_predictor.cls_score.bias[-1] += 100.0
    meta = {k: data["peftseg"][k] for k in ("config", "class_names")}
    run_dir.mkdir()
    PeftCheckpointer(loaded.model, save_dir=str(run_dir), meta=meta).save(FINAL)
    return run_dir


def test_eval_variants_record_as_eval_of_each_and_refuse_a_variant_without_result(runs, tmp_path, shapes_cache):
    """Each variant's eval.json is the record `peftseg eval` writes for its checkpoint alone; a
    variant that detects nothing (NaN AP) is recorded as failed, shown as no result, and exits 2."""
    blind = _blind_run(runs[0], tmp_path / "blind")
    out = tmp_path / "ev"
    proc = cli_in_process("eval", f"checkpoint=[{runs[0]},{blind}]", f"output={out}", cwd=tmp_path,
                          cache=shapes_cache)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert ("error: 1 of 2 variants gave no result (blind): recorded as failed in their eval.json; the other "
            "variants' records are ok. [blind] evaluating ") in proc.stderr
    assert "segm.AP = NaN" in proc.stderr and f"The reason is in {out / 'blind' / 'eval.json'}." in proc.stderr
    assert "nan" not in proc.stdout.lower()  # no table of NaNs shown as a result
    failed = json.loads((out / "blind" / "eval.json").read_text())
    assert failed["status"] == "failed" and "segm.AP = NaN" in failed["error"]
    assert failed["metrics"]["segm"]["AP"] is None
    alone = cli_in_process("eval", f"checkpoint={runs[0]}", f"output={tmp_path / 'alone'}", cwd=tmp_path,
                           cache=shapes_cache)
    assert alone.returncode == 0, alone.stdout + alone.stderr
    ok = json.loads((out / "lora_a" / "eval.json").read_text())
    assert ok == json.loads((tmp_path / "alone" / "eval.json").read_text())  # same fields, numbers, status
    assert ok["status"] == "ok" and ok["metrics"]["segm"]["AP"] is not None
    single_blind = cli_in_process("eval", f"checkpoint={blind}", f"output={tmp_path / 'blind_alone'}", cwd=tmp_path,
                                  cache=shapes_cache)
    assert single_blind.returncode == 2 and "segm.AP = NaN" in single_blind.stderr
    assert json.loads((tmp_path / "blind_alone" / "eval.json").read_text()) == failed
    assert json.loads((out / "memory.json").read_text())["variants"].keys() == {"lora_a", "blind"}


def test_variant_outputs_are_refused_where_one_checkpoint_s_are(runs, tmp_path, shapes_cache):
    images = _image(tmp_path)
    before = sorted(images.rglob("*"))
    proc = cli_in_process("predict", f"checkpoint=[{runs[0]},{runs[1]}]", f"input={images}", f"output={images}",
                          cwd=tmp_path, cache=shapes_cache)
    assert proc.returncode == 2
    assert f"error: output={images} is the input itself; writing there would overwrite it." in proc.stderr
    assert sorted(images.rglob("*")) == before  # nothing written among the inputs
    inside = images / "pred"
    proc = cli_in_process("predict", f"checkpoint=[{runs[0]},{runs[1]}]", f"input={images}", f"output={inside}",
                          cwd=tmp_path, cache=shapes_cache)
    assert proc.returncode == 2 and f"is inside the input folder {images}" in proc.stderr
    a_file = tmp_path / "results.txt"
    a_file.write_text("mine")
    for command in (("eval",), ("predict", f"input={images}")):
        proc = cli_in_process(*command, f"checkpoint=[{runs[0]},{runs[1]}]", f"output={a_file}", cwd=tmp_path,
                              cache=shapes_cache)
        assert proc.returncode == 2, proc.stderr
        assert f"error: output={a_file} is a file; this command writes several files, so give a folder" in proc.stderr
        assert "Traceback" not in proc.stderr
    assert a_file.read_text() == "mine"
    # classes= is checked against each checkpoint's own classes, as for one checkpoint
    proc = cli_in_process("predict", f"checkpoint=[{runs[0]},{runs[1]}]", f"input={images}",
                          f"output={tmp_path / 'pred'}", "classes=[cat,dog,cow]", cwd=tmp_path, cache=shapes_cache)
    assert proc.returncode == 2
    assert (f"error: classes=['cat', 'dog', 'cow'] was given, but {runs[0] / 'model_final.safetensors'} is a PEFT "
            "checkpoint that predicts ['circle', 'square', 'triangle']") in proc.stderr
    assert not (tmp_path / "pred").exists()


def test_variant_folders_are_distinct_whatever_the_run_dirs_are_called():
    same_time = [Path(f"/r/{p}/outputs/2026-01-01/12-00-00/model_final.safetensors") for p in ("A", "B")]
    assert variant_names(same_time) == ["A_outputs_2026-01-01_12-00-00", "B_outputs_2026-01-01_12-00-00"]
    assert variant_names([Path("/r/p/x/m.safetensors"), Path("/r/q/x/m.safetensors"),
                          Path("/r/r/x-1/m.safetensors")]) == ["p_x", "q_x", "r_x-1"]
    one_run = [Path("/r/run/model_final.safetensors"), Path("/r/run/model_0000099.pth")]
    assert variant_names(one_run) == ["run_model_final", "run_model_0000099"]
    # joined names that meet, and a name taken by a file written beside the folders, are numbered
    assert variant_names([Path("/p/q/d/m.pth"), Path("/z/q/d/m.pth"), Path("/p_q/d/m.pth")]) == \
        ["p_q_d", "z_q_d", "p_q_d-2"]
    assert variant_names([Path("/r/memory.json/m.pth"), Path("/r/x/m.pth")], ("memory.json",)) == \
        ["memory.json-2", "x"]


def test_predict_with_runs_of_one_name_writes_each_to_its_own_folder(tmp_path):
    from peftseg.cli.predict import main

    stamp = Path("outputs/2026-01-01/12-00-00")
    runs = [make_run(tmp_path / parent / stamp, "method=lora", noise_seed=seed) for parent, seed in (("A", 1), ("B", 2))]
    images = _image(tmp_path)
    out = tmp_path / "pred"
    assert main([f"checkpoint=[{runs[0]},{runs[1]}]", f"input={images}", f"output={out}", "score_thresh=0"],
                Console(file=io.StringIO(), width=200)) == 0
    folders = sorted(p.name for p in out.iterdir())
    assert folders == ["A_outputs_2026-01-01_12-00-00", "B_outputs_2026-01-01_12-00-00"]
    a, b = (json.loads((out / f / "predictions.json").read_text()) for f in folders)
    assert a and b and a != b  # each variant's own predictions, neither overwritten


@pytest.fixture(scope="module")
def own_kind_runs(tmp_path_factory):
    """Variants whose methods hang modules of their own on the base or train its tensors: Monas
    (with dropout, off in a loaded model), adapters + LoRA in one run, and every tensor (full)."""
    root = tmp_path_factory.mktemp("own_kinds")
    return [make_run(root / "mona", "method=mona", noise_seed=1),
            make_run(root / "adapter_lora", "method=adapter_lora", noise_seed=2),
            make_run(root / "full", "method=full", noise_seed=3),
            make_run(root / "lora", "method=lora", noise_seed=4)]


def test_own_modules_and_trained_base_tensors_switch_exactly(own_kind_runs):
    from peftseg.methods._attached import attached_modules

    vset = load_variants([str(r) for r in own_kind_runs], [])
    bare = vset.activate(None)
    assert attached_modules(bare) == {}  # no variant's modules (or hooks) on the bare base
    inputs = _inputs()
    for v in [*vset.variants, *reversed(vset.variants)]:
        alone = load_model(str(v.source), []).model
        ref, got = _outputs(alone, inputs), _outputs(vset.activate(v), inputs)
        for r, g in zip(ref, got):
            assert len(r) > 0, v.name
            for field in ("scores", "pred_classes", "pred_masks"):
                assert torch.equal(getattr(r, field), getattr(g, field)), (v.name, field)
        assert vset.param_counts(v) == count_parameters(alone), v.name
        # what trains is switched too: the active variant's parameters, as in its model alone
        assert sum(p.numel() for p in vset.model.parameters() if p.requires_grad) == \
            count_parameters(alone).trainable, v.name
    assert set(vset.get("mona").children) == {f"backbone.net.blocks.{i}.peft_mona" for i in range(4)}
    # full trains every tensor: each variant's own copy is swapped in, the base's copy of those
    # that all variants train (the task layers) is released
    assert vset.get("full").swapped_bytes > vset.get("lora").swapped_bytes > 0


def test_eval_variants_refuse_a_folder_holding_another_s_files_and_leave_them(runs, tmp_path, shapes_cache):
    variants = f"checkpoint=[{runs[0]},{runs[1]}]"
    out = tmp_path / "ev"
    (out / "lora_b").mkdir(parents=True)
    theirs = out / "lora_b" / "eval.json"
    theirs.write_text('{"mine": 1}')
    proc = cli_in_process("eval", variants, f"output={out}", cwd=tmp_path, cache=shapes_cache)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"error: output={theirs} already exists and is not this command's own earlier output" in proc.stderr
    assert theirs.read_text() == '{"mine": 1}'
    assert [p for p in out.rglob("*") if p.is_file()] == [theirs]  # refused before any variant was evaluated
    # a memory.json it did not write, beside the variants' folders
    other = tmp_path / "ev2"
    other.mkdir()
    (other / "memory.json").write_text("notes")
    proc = cli_in_process("eval", variants, f"output={other}", cwd=tmp_path, cache=shapes_cache)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"error: output={other / 'memory.json'} already exists and is not this command's own earlier output" \
        in proc.stderr
    assert (other / "memory.json").read_text() == "notes"
    assert [p for p in other.rglob("*") if p.is_file()] == [other / "memory.json"]
    assert "Traceback" not in proc.stderr


def test_eval_variant_with_non_finite_metrics_is_recorded_failed_not_ok(runs, tmp_path, shapes_cache, monkeypatch):
    """inf from the evaluator: the variant's eval.json says failed (never ok), the others' ok, and a
    rerun into the same folder replaces the command's own records."""
    import peftseg.engine.evaluate as engine_evaluate

    def evaluate(model, dataset, image_size, out_dir, num_workers):
        ap = float("inf") if Path(out_dir).name == "lora_b" else 12.5
        return {"segm": {"AP": ap, "AP50": 20.0, "AP75": 10.0}, "bbox": {"AP": 11.0, "AP50": 19.0, "AP75": 9.0}}

    monkeypatch.setattr(engine_evaluate, "evaluate", evaluate)
    out = tmp_path / "ev"
    for _ in range(2):
        proc = cli_in_process("eval", f"checkpoint=[{runs[0]},{runs[1]}]", f"output={out}", cwd=tmp_path,
                              cache=shapes_cache)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert "1 of 2 variants gave no result (lora_b)" in proc.stderr and "segm.AP = inf" in proc.stderr
        failed = json.loads((out / "lora_b" / "eval.json").read_text())
        assert failed["status"] == "failed" and "segm.AP = inf" in failed["error"]
        ok = json.loads((out / "lora_a" / "eval.json").read_text())
        assert ok["status"] == "ok" and ok["metrics"]["segm"]["AP"] == 12.5
        memory = json.loads((out / "memory.json").read_text())
        assert memory["variants"].keys() == {"lora_a", "lora_b"}
        assert memory["checkpoint_paths"] == [str(r.resolve() / "model_final.safetensors") for r in runs[:2]]


def test_variants_of_lora_on_multihead_attention_and_bitfit_share_its_nested_peft_layers(tmp_path, monkeypatch):
    """peft's LoRA on nn.MultiheadAttention wraps the attention and, inside it, out_proj: two such
    variants and a bitfit variant (which trains the biases inside them) are each their checkpoint
    loaded alone."""
    import peft

    import peftseg.checkpoint.provenance as provenance

    # the checkpoints are made under the installed peft (make_run records no versions)
    monkeypatch.setattr(provenance, "recorded_versions", lambda meta, source: {"peft": peft.__version__})
    model = "model=m2f_tiny"
    runs = [make_run(tmp_path / "mha", model, "method=lora", "method.targets=[decoder_cross_attn]", noise_seed=1),
            make_run(tmp_path / "bitfit", model, "method=bitfit", noise_seed=2),
            make_run(tmp_path / "mha_r2", model, "method=lora", "method.targets=[decoder_cross_attn]", "method.rank=2",
                     noise_seed=3)]
    vset = load_variants([str(r) for r in runs], [])
    g = torch.Generator().manual_seed(0)
    inputs = [{"image": (torch.rand(3, 96, 96, generator=g) * 255).to(torch.uint8), "height": 96, "width": 96}]
    for v in reversed(vset.variants):
        alone = load_model(str(v.source), []).model
        ref, got = _outputs(alone, inputs)[0], _outputs(vset.activate(v), inputs)[0]
        assert len(ref) > 0, v.name
        for field in ("scores", "pred_classes", "pred_masks"):
            assert torch.equal(getattr(ref, field), getattr(got, field)), (v.name, field)
        assert vset.param_counts(v) == count_parameters(alone), v.name

