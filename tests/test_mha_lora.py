"""peft's LoRA on nn.MultiheadAttention under the installed peft, and checkpoints made under
the earlier peft that applied the out_proj update twice (tests/data/mha_lora_peft021: a real
seem_tiny run trained under peft 0.21.2, with its predictions; make.py there rebuilds it)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import peft
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from packaging.version import Version
from safetensors import safe_open
from safetensors.torch import save_file

from helpers import cli_in_process, ulps
from peftseg.checkpoint.provenance import adapt_to_installed_peft, mha_out_proj_factors
from peftseg.errors import UserError
from peftseg.methods._mha_pin import pin_multihead_attention_bases

FIXTURE = Path(__file__).resolve().parent / "data" / "mha_lora_peft021"


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


def _lora_block(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    block = peft.inject_adapter_in_model(peft.LoraConfig(r=4, lora_alpha=8, target_modules=["attn"]), _Block())
    pin_multihead_attention_bases(block)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # lora_B starts at zero: give both updates a size
        for name, p in block.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return block


def _closed_form(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """MultiheadAttention with in_proj W + s B A and out_proj W + s B A: each update once."""
    mha = block.attn
    base = mha.get_base_layer()
    out = base.out_proj
    s = mha.scaling["default"]
    w_in = base.in_proj_weight + s * mha.lora_B["default"].weight @ mha.lora_A["default"].weight
    w_out = out.get_base_layer().weight + s * out.lora_B["default"].weight @ out.lora_A["default"].weight
    y, _ = F.multi_head_attention_forward(
        x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1), 16, 2, w_in, base.in_proj_bias, None, None, False,
        0.0, w_out, out.get_base_layer().bias, training=False, need_weights=False)
    return y.transpose(0, 1)


def test_lora_on_multihead_attention_applies_each_update_once_and_keeps_its_base():
    block = _lora_block()
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(3))
    frozen = {n: p for n, p in block.named_parameters() if not p.requires_grad}
    values = {n: p.detach().clone() for n, p in frozen.items()}
    got = block(x)
    want = _closed_form(block, x)
    # the same products and sums in another order (merged weights vs the closed form): a few
    # roundings per dot product of length 16, at the output's size
    torch.testing.assert_close(got, want, rtol=0, atol=ulps(want, 64))
    # the out_proj update counted twice would be far outside that
    assert (got - want).abs().max() < 1e-3 * want.abs().max()
    got.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in block.named_parameters() if "lora_" in n)
    # the frozen base: the same Parameter objects, bit for bit, after forward and backward
    after = {n: p for n, p in block.named_parameters() if not p.requires_grad}
    assert after.keys() == frozen.keys()
    assert all(after[n] is frozen[n] and torch.equal(after[n], values[n]) for n in frozen)


def test_merging_lora_on_multihead_attention_gives_the_unmerged_model():
    block = _lora_block(seed=5).eval()
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        unmerged = block(x)
        block.attn = block.attn.unload_and_optionally_merge_module(merge=True, safe_merge=True, adapter_names=None)
        merged = block(x)
    assert type(block.attn) is nn.MultiheadAttention
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=ulps(unmerged, 64))  # see the test above


def _fixture_run(tmp_path: Path, *, record: bool = True, meta_versions: bool = True) -> Path:
    """A copy of the peft 0.21.2 run (commands may write beside a checkpoint: never into tests/data)."""
    run = tmp_path / "run021"
    run.mkdir(parents=True)
    if record:
        shutil.copy(FIXTURE / "results.json", run / "results.json")
    with safe_open(str(FIXTURE / "model_final.safetensors"), framework="pt") as f:
        tensors, header = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())
    if not meta_versions:  # as peftseg wrote checkpoints before they carried their versions
        meta = json.loads(header["peftseg"])
        meta.pop("versions")
        header["peftseg"] = json.dumps(meta)
    save_file(tensors, str(run / "model_final.safetensors"), metadata=header)
    return run


def _predictions() -> dict[str, torch.Tensor]:
    with safe_open(str(FIXTURE / "predictions.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _predict(model, ref):
    images = [ref[f"{i}.image"] for i in range(2)]
    with torch.no_grad():
        return model([{"image": im, "height": im.shape[1], "width": im.shape[2]} for im in images])


def _max_differences(outputs, ref) -> dict[str, float]:
    diff = {"scores": 0.0, "boxes": 0.0, "mask_pixels": 0.0}
    for i, out in enumerate(outputs):
        inst = out["instances"]
        assert torch.equal(inst.pred_classes, ref[f"{i}.classes"])
        diff["scores"] = max(diff["scores"], (inst.scores - ref[f"{i}.scores"]).abs().max().item())
        diff["boxes"] = max(diff["boxes"], (inst.pred_boxes.tensor - ref[f"{i}.boxes"]).abs().max().item())
        masks = inst.pred_masks[ref[f"{i}.top"]].to(torch.uint8)
        diff["mask_pixels"] = max(diff["mask_pixels"], (masks != ref[f"{i}.masks"]).float().mean().item())
    return diff


@pytest.mark.skipif(Version(peft.__version__) < Version("0.22"), reason="the fixture is of peft 0.21.2's semantics")
def test_a_checkpoint_trained_under_peft_0_21_is_converted_and_predicts_as_it_did(tmp_path, caplog):
    from peftseg.checkpoint.load import load_model

    ref = _predictions()
    run = _fixture_run(tmp_path)
    with caplog.at_level(logging.WARNING):
        loaded = load_model(str(run), [])
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    converted = [m for m in lines if "out_proj lora_B tensors are scaled by 2" in m]
    assert len(converted) == 1 and "trained under peft 0.21.2" in converted[0], lines
    assert sum(f"peft 0.21.2 -> {peft.__version__}" in m for m in lines) == 1, lines  # the version warning
    diff = _max_differences(_predict(loaded.model, ref), ref)
    # W + dW + dW (peft 0.21.2) and W + 2 dW (converted) round differently; that difference goes
    # through three decoder layers and softmaxes: a few hundred float32 ulps at the size compared
    assert diff["scores"] <= ulps(1.0, 512), diff  # scores are probabilities: size 1
    assert diff["boxes"] <= ulps(128, 512), diff  # boxes are pixels of a 128 px image
    assert diff["mask_pixels"] <= 1 / 128**2 * 4, diff  # a few pixels of a 128x128 mask may flip at the threshold

    # without the conversion (the record claiming today's peft) the model is another one
    record = json.loads((run / "results.json").read_text())
    unconverted = _fixture_run(tmp_path / "b")
    with safe_open(str(unconverted / "model_final.safetensors"), framework="pt") as f:
        tensors, header = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())
    meta = json.loads(header["peftseg"])
    meta["versions"]["peft"] = peft.__version__
    header["peftseg"] = json.dumps(meta)
    save_file(tensors, str(unconverted / "model_final.safetensors"), metadata=header)
    assert record["versions"]["peft"] == "0.21.2"
    other = load_model(str(unconverted), [])
    wrong = _predict(other.model, ref)
    assert max((o["instances"].scores - ref[f"{i}.scores"]).abs().max().item() for i, o in enumerate(wrong)) \
        > 1000 * max(diff["scores"], ulps(1.0, 1))


@pytest.mark.skipif(Version(peft.__version__) < Version("0.22"), reason="the fixture is of peft 0.21.2's semantics")
def test_merge_of_a_peft_0_21_checkpoint_writes_the_model_it_trained(tmp_path, shapes_cache, caplog):
    from peftseg.checkpoint.load import load_model

    run = _fixture_run(tmp_path)
    out = tmp_path / "merged.safetensors"
    with caplog.at_level(logging.WARNING):
        proc = cli_in_process("merge", f"checkpoint={run}", f"output={out}", cwd=tmp_path, cache=shapes_cache)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    warned = [r for r in caplog.records if f"peft 0.21.2 -> {peft.__version__}" in r.getMessage()]
    assert len(warned) == 1, caplog.text
    ref = _predictions()
    merged = load_model(str(out), [])
    assert merged.kind == "merged"
    diff = _max_differences(_predict(merged.model, ref), ref)
    assert diff["scores"] <= ulps(1.0, 512) and diff["boxes"] <= ulps(128, 512), diff  # as converted, above


def test_a_checkpoint_with_multihead_attention_lora_and_no_peft_version_is_refused(tmp_path):
    from peftseg.checkpoint.load import load_model

    run = _fixture_run(tmp_path, record=False, meta_versions=False)
    with pytest.raises(UserError, match=r"records no peft version.*put the run's results.json back"):
        load_model(str(run), [])


def test_resuming_across_the_out_proj_change_is_refused_by_name(tmp_path):
    with safe_open(str(FIXTURE / "model_final.safetensors"), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["peftseg"])
    keys = mha_out_proj_factors(tensors)
    assert len(keys) == 6  # three decoder layers, self and cross attention
    if Version(peft.__version__) < Version("0.22"):
        assert adapt_to_installed_peft(tensors, meta, tmp_path / "x") is tensors
        return
    with pytest.raises(UserError, match=rf"trained under peft 0.21.2, and the installed peft {peft.__version__}.*"
                                        r"cannot be resumed exactly.*peft==0.21.2"):
        adapt_to_installed_peft(tensors, meta, tmp_path / "x", resuming=True)
    converted = adapt_to_installed_peft(tensors, meta, tmp_path / "x")
    assert all(torch.equal(converted[k], 2 * tensors[k]) for k in keys)
    assert all(converted[k] is tensors[k] for k in tensors if k not in keys)
