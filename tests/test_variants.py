"""Task variants on one frozen base (checkpoint=[a,b,c]): outputs equal to loading each alone."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console

from peftseg.checkpoint.load import load_model
from peftseg.checkpoint.variants import load_variants
from peftseg.errors import UserError

from helpers import make_run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("variants")
    return [
        make_run(root / "lora_a", "method=lora", noise_seed=1),
        make_run(root / "lora_b", "method=lora", "method.targets=[attn_proj,mlp]", "method.rank=2", noise_seed=2),
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
    """Two LoRA variants (peft adapters in the same layers), adapters, a side path, bitfit."""
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
    # the variants do differ: the switch is what makes each one's outputs
    scores = [shared[v.name][0].scores for v in vset]
    assert all(not torch.equal(x, y) for i, x in enumerate(scores) for y in scores[i + 1:])
    # two LoRA adapters in the same peft layers (qkv only in lora_a, proj/mlp in both)
    proj = vset.model.get_submodule("backbone.net.blocks.0.attn.proj")
    assert set(proj.lora_A) == {"variant0", "variant1"}


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
