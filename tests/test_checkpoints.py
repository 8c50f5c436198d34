"""PEFT-only checkpoints: size, contents, resume, `peftseg eval`, `peftseg merge`."""

import json

import pytest
import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import records_under
from helpers import cli_in_process, run_in_process, ulps
from detectron2.utils.env import seed_all_rng
from peftseg.config import compose_config
from peftseg.checkpoint.load import load_model
from peftseg.engine.run import run
from peftseg.errors import UserError
from peftseg.checkpoint.merge import merge_and_unload
from peftseg.models import build_model
from peftseg.models._weights import load_weights

SHORT = ("train.max_iter=6", "train.warmup_iters=0", "train.checkpoint_period=3", "train.log_period=1",
         "model.score_thresh_test=0.0")


@pytest.fixture(scope="module")
def cli(tmp_path_factory, shapes_cache):
    """`peftseg` commands from one work dir, in-process (the CLI's own paths are tested elsewhere)."""
    work = tmp_path_factory.mktemp("ckpt")

    def _run(*args):
        return cli_in_process(*args, cwd=work, cache=shapes_cache)

    _run.work, _run.cache = work, shapes_cache
    return _run


def _train(cli, name: str, *overrides: str):
    """A run of SHORT + `overrides` in the work dir's `name` (as `hydra.run.dir=name`), in-process."""
    run_dir = cli.work / name
    run_dir.mkdir()
    return run_in_process(run_dir, cli.cache, *SHORT, *overrides)


@pytest.fixture(scope="module")
def lora_run(cli):
    record = _train(cli, "lora", "method.targets=[attn_qkv,mlp]")
    assert record.status == "ok", record.error
    return cli.work / "lora"


def test_final_checkpoint_holds_only_the_trainable_part(lora_run):
    record = json.loads((lora_run / "results.json").read_text())
    final = lora_run / "model_final.safetensors"
    with safe_open(str(final), framework="pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()["peftseg"])
    trainable = record["params"]["trainable"]
    assert sum(v.numel() for k, v in saved.items() if v.is_floating_point()) == trainable
    assert set(meta["trainable"]) == set(saved) and meta["config"]["method"]["name"] == "lora"
    assert not any(k.startswith("backbone.net.") and "lora_" not in k for k in saved)  # no frozen weight
    assert final.stat().st_size <= 1.05 * 4 * trainable + 64 * 1024
    assert record["efficiency"]["checkpoint_bytes"] == final.stat().st_size
    assert oct(final.stat().st_mode & 0o777) != oct(0o600)  # a normal file, not mkstemp's mode
    periodic = torch.load(lora_run / "model_0000002.pth", map_location="cpu", weights_only=True)
    assert periodic["iteration"] == 2 and "optimizer" in periodic and "scheduler" in periodic
    assert periodic["resume"]["samples_seen"] == 3 * 4 and len(periodic["resume"]["rng"]) == 1


def test_peft_export_loads_with_peft_from_pretrained(lora_run, shapes_cache, monkeypatch):
    """peft's own loader, on a plain base model, gives the outputs of the trained run."""
    monkeypatch.setenv("PEFTSEG_CACHE", str(shapes_cache))
    export = lora_run / "peft"
    config = json.loads((export / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8
    r = load_model(str(lora_run), [], need_dataset=True)
    trained = r.model.eval()
    seed_all_rng(r.cfg.train.seed)  # the frozen base exactly as build_for_run makes it, before the method
    base = build_model(r.cfg.model, num_classes=len(r.splits.class_names))
    base.load_state_dict(load_file(str(export / "trained_outside_peft.safetensors")), strict=False)
    model = PeftModel.from_pretrained(base, str(export)).eval()
    x = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(0)) * 255
    inputs = [{"image": i, "height": 128, "width": 128} for i in x]
    with torch.no_grad():
        want = trained(inputs)
        got = model(inputs)
    for a, b in zip(want, got):
        # same weights, same peft layers: only kernel blocking may differ, a few ulps per layer; a
        # softmax score's error is the logits' (up to ~10x larger) relative to the score: 64 ulps of it
        torch.testing.assert_close(a["instances"].scores, b["instances"].scores, rtol=0,
                                   atol=ulps(a["instances"].scores, 64))
        torch.testing.assert_close(a["instances"].pred_masks, b["instances"].pred_masks)


def test_a_final_pth_of_an_earlier_version_still_loads(lora_run, tmp_path, shapes_cache, monkeypatch):
    monkeypatch.setenv("PEFTSEG_CACHE", str(shapes_cache))
    with safe_open(str(lora_run / "model_final.safetensors"), framework="pt") as f:
        old = {"model": {k: f.get_tensor(k) for k in f.keys()}, "peftseg": json.loads(f.metadata()["peftseg"])}
    torch.save(old, tmp_path / "model_final.pth")
    new_state = load_model(str(lora_run), [], need_dataset=True).model.state_dict()
    old_state = load_model(str(tmp_path), [], need_dataset=True).model.state_dict()
    assert all(torch.equal(new_state[k], old_state[k]) for k in new_state)


def test_eval_reproduces_the_recorded_ap(cli, lora_run):
    proc = cli("eval", f"checkpoint={lora_run}", "output=reeval")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    again = json.loads((cli.work / "reeval" / "eval.json").read_text())
    record = json.loads((lora_run / "results.json").read_text())
    assert again["metrics"]["segm"] == record["metrics"]["segm"]
    assert again["metrics"]["bbox"] == record["metrics"]["bbox"]
    assert again["params"]["trainable"] == record["params"]["trainable"]
    peft = record["params"]["by_group"]["peft"]["trainable"]
    assert peft > 0 and f"{peft / 1e3:.2f}K / {peft / 1e3:.2f}K" in proc.stdout  # the per-group rows
    assert "PEFT modules included" in " ".join(proc.stdout.split())


def test_resume_continues_from_the_saved_iteration(cli, lora_run):
    record = _train(cli, "resumed", "method.targets=[attn_qkv,mlp]", f"train.resume={lora_run / 'model_0000002.pth'}")
    assert record.status == "ok", record.error
    iterations = [json.loads(line)["iteration"] for line in (cli.work / "resumed" / "metrics.json").read_text().splitlines()
                  if "total_loss" in line]
    assert iterations and min(iterations) == 3 and max(iterations) == 5
    (saved,) = records_under(cli.work / "resumed")
    assert saved["status"] == "ok"


TARGETS = "method.targets=[attn_qkv,mlp]"


@pytest.mark.parametrize("override,needle", [
    (("method=heads",), "different method (method.name: checkpoint 'lora' vs this run 'heads')"),
    ((TARGETS, "method.rank=4"), "method.rank: checkpoint 8 vs this run 4"),
    ((TARGETS, "model.depth=2", "model.window_block_indexes=[0]"), "different model"),  # [0, 2] names no block 2
    ((TARGETS, "train.seed=5"), "different frozen base weights"),
])
def test_resume_refuses_a_checkpoint_of_another_setup(lora_run, override, needle, tmp_path, shapes_cache,
                                                       monkeypatch):
    # in-process: the CLI's exit status and rendering of a UserError are tested in test_cli_errors
    monkeypatch.setenv("PEFTSEG_CACHE", str(shapes_cache))
    cfg = compose_config(["train=smoke", *SHORT, *override, f"train.resume={lora_run}/model_0000002.pth"])
    with pytest.raises(UserError) as refused:
        run(cfg, tmp_path, "bad")
    assert needle in " ".join(str(refused.value).split())
    (record,) = records_under(tmp_path)
    assert record["status"] == "failed" and needle in " ".join(record["error"]["message"].split())


def test_eval_of_a_plain_checkpoint_asks_for_the_model_it_fits(cli, lora_run, tmp_path):
    plain = tmp_path / "plain.pth"
    torch.save({"model": {"w": torch.zeros(2)}}, plain)
    proc = cli("eval", f"checkpoint={plain}")
    assert proc.returncode == 2 and "plain checkpoint (no peftseg metadata)" in proc.stderr
    assert "add model=<preset>" in " ".join(proc.stderr.split())
    proc = cli("eval", f"checkpoint={tmp_path / 'nowhere'}")
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    proc = cli("eval", f"checkpoint={lora_run}", "method.rank=2")
    assert proc.returncode == 2 and "'method.rank=2' cannot be set here" in " ".join(proc.stderr.split())


def test_merged_lora_matches_unmerged_and_loads_as_plain_detectron2(cli, lora_run, shapes_cache, monkeypatch):
    monkeypatch.setenv("PEFTSEG_CACHE", str(shapes_cache))
    proc = cli("merge", f"checkpoint={lora_run}", "output=merged.pth")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r = load_model(str(lora_run), [], need_dataset=True)
    model = r.model.eval()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 128, 128, generator=g) * 255
    with torch.no_grad():
        unmerged = model.backbone(model.preprocess_image([{"image": i} for i in x]).tensor)
        merged_model = merge_and_unload(model)
        merged = merged_model.backbone(merged_model.preprocess_image([{"image": i} for i in x]).tensor)
    assert not any(isinstance(m, BaseTunerLayer) for m in merged_model.modules())
    assert not any("lora_" in n for n in merged_model.state_dict())
    for k in unmerged:
        # merging rounds each folded weight once and turns x@W + x@BA into one matmul: a few ulps per
        # adapted layer (measured <= 4 over the 4 blocks); 32 ulps of the feature's max
        torch.testing.assert_close(merged[k], unmerged[k], rtol=0, atol=ulps(unmerged[k], 32))
    # the written file is a plain detectron2 checkpoint: a fresh base takes every tensor of it
    fresh = load_model(str(lora_run), [], need_dataset=True).model
    fresh = merge_and_unload(fresh)  # same module tree, merged weights to be overwritten
    for p in fresh.parameters():
        torch.nn.init.zeros_(p)
    report = load_weights(fresh, str(cli.work / "merged.pth"))
    assert not report.missing and not report.unexpected and not report.shape_mismatch
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), merged_model.state_dict().values()))


def test_merged_checkpoint_evaluates_without_overrides_and_plain_needs_the_model(cli, lora_run, tmp_path):
    from peftseg.checkpoint.load import load_model

    proc = cli("merge", f"checkpoint={lora_run}", "output=merged_for_eval.pth")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    merged = cli.work / "merged_for_eval.pth"
    proc = cli("eval", f"checkpoint={merged}", "output=merged_eval")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    again = json.loads((cli.work / "merged_eval" / "eval.json").read_text())
    record = json.loads((lora_run / "results.json").read_text())
    assert again["checkpoint_kind"] == "merged"
    # merging moves float rounding around (32 ulps of the features above), so AP may move in the last digits:
    # a score within rounding of another flips their rank, a mask pixel within rounding of 0.5 flips; abs=0.5
    # AP points is such a flip on this small val set, not a tolerance on float error
    assert again["metrics"]["segm"]["AP"] == pytest.approx(record["metrics"]["segm"]["AP"], abs=0.5)
    assert again["params"]["total"] < record["params"]["total"]  # no LoRA factors left
    # the same weights without metadata: a plain checkpoint, the model and classes named by hand
    plain = tmp_path / "plain.pth"
    torch.save({"model": torch.load(merged, weights_only=True)["model"]}, plain)
    loaded = load_model(str(plain), ["model=vitdet_tiny"], classes=["circle", "square", "triangle"])
    assert loaded.kind == "plain" and loaded.class_names == ["circle", "square", "triangle"]
    reference = load_model(str(merged), [])
    for (name, a), (_, b) in zip(loaded.model.state_dict().items(), reference.model.state_dict().items()):
        assert torch.equal(a, b), name


def test_the_one_loader_reads_a_checkpoint_file_once(lora_run, shapes_cache, monkeypatch):
    """eval, merge and predict load through checkpoint.load.load_model, which reads the file
    once and hands the tensors on (load_peft used to read it a second time)."""
    import peftseg.checkpoint.files as files

    monkeypatch.setenv("PEFTSEG_CACHE", str(shapes_cache))
    reads = []
    real = files.load_safetensors
    monkeypatch.setattr(files, "load_safetensors", lambda *a, **k: reads.append(a[0]) or real(*a, **k))
    loaded = load_model(str(lora_run), [])
    assert loaded.kind == "peft" and len(reads) == 1, reads
