"""`train.compile=true`: torch.compile (inductor) of the transformer blocks trains the same model
as eager PyTorch, keeps the checkpoint keys, and is refused by name where it cannot run."""

from __future__ import annotations

import pytest
import torch

from peftseg.config import compose_config, validate
from peftseg.engine import compile as comp
from peftseg.errors import UserError

from helpers import shapes_batch

CLASSES = ["circle", "square", "triangle"]


def _losses(cfg, batch, compiled: bool, steps: int = 2):
    """The first `steps` training losses of the run's model, eager or with its blocks compiled."""
    from detectron2.utils.events import EventStorage

    from peftseg.build import build_for_run

    model = build_for_run(cfg, len(CLASSES), CLASSES)
    blocks = comp.compile_blocks(model) if compiled else 0
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    torch.manual_seed(0)
    losses = []
    with EventStorage():
        for _ in range(steps):
            loss = sum(model(batch).values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return losses, model, blocks


# inductor builds C++ kernels on the CPU: this test compiles vitdet_tiny's blocks (forward and
# backward), 30-100 s with an empty inductor cache on 2 busy shared cores, ~10 s with a warm one.
# It is the one test in the suite that runs inductor; everything else here is cheap.
@pytest.mark.skipif(comp.cpp_compiler() is None,
                    reason="no C++ compiler ($CXX, g++, c++, clang++) on PATH: inductor cannot build CPU kernels")
def test_compiled_blocks_train_the_same_losses_and_keep_the_checkpoint_keys(tmp_path):
    cfg = compose_config(["model=vitdet_tiny", "method=lora", "train.compile=true"])
    batch = shapes_batch(tmp_path, n=2)
    eager, eager_model, _ = _losses(cfg, batch, compiled=False)
    compiled, model, blocks = _losses(cfg, batch, compiled=True)
    assert blocks == 4  # vitdet_tiny's ViT blocks, each compiled in place
    assert all(torch.isfinite(torch.tensor(compiled)))
    # the same forward from the same weights, then one SGD step: equal up to float32 reordering
    # in inductor's fused kernels (2e-7 seen on losses of ~3)
    assert compiled == pytest.approx(eager, rel=1e-5, abs=0)
    assert compiled[0] != compiled[1]  # the step changed the weights: a second loss was compared
    # compiled in place: the state_dict (what checkpoints save) has the uncompiled keys
    keys = list(model.state_dict())
    assert keys == list(eager_model.state_dict()) and not any("_orig_mod" in k for k in keys)

    # a family that lists no blocks is refused by name (FamilyMap is frozen: set for this check only)
    from peftseg.models import family_of

    family = family_of(eager_model)
    listed = family.checkpoint_blocks
    try:
        object.__setattr__(family, "checkpoint_blocks", ())
        with pytest.raises(UserError) as e:
            comp.compile_blocks(eager_model)
    finally:
        object.__setattr__(family, "checkpoint_blocks", listed)
    assert "model family 'vitdet' lists none" in str(e.value) and "train.compile=false" in str(e.value)


def test_without_a_cpp_compiler_a_cpu_run_is_refused_and_compile_false_is_never_refused(monkeypatch):
    monkeypatch.setattr(comp, "cpp_compiler", lambda: None)
    with pytest.raises(UserError) as e:
        comp.refuse(compose_config(["train.compile=true"]), "cpu")
    text = str(e.value)
    assert text.startswith("train.compile=true on the CPU needs a C++ compiler")
    assert "Run with train.compile=false" in text
    comp.refuse(compose_config(["train.compile=true"]), "cuda")  # CUDA kernels are Triton's, not C++
    comp.refuse(compose_config(["train.compile=false"]), "cpu")


def test_multi_process_compile_is_refused_at_compose_time():
    with pytest.raises(UserError) as e:
        validate(compose_config(["train.compile=true", "train.num_gpus=2"]))
    assert str(e.value).startswith("train.compile=true is not supported with multi-process training "
                                   "(train.num_gpus=2, train.num_machines=1)")
    assert "train.compile=false" in str(e.value)


def test_every_block_is_compiled_even_where_each_has_its_own_constants():
    """A 12-block ViT whose blocks all differ in a constant (the drop-path rate grows with depth)
    needs one graph per block; past dynamo's default limit of 8 variants the last blocks would run
    eagerly without an error. Counted with a backend that records each graph it is given (no
    inductor: the capture is what is checked)."""
    import torch._dynamo
    import torch._dynamo.config as dynamo_config

    from peftseg.config import compose_config
    from peftseg.models import build_model

    torch._dynamo.reset()
    cfg = compose_config(["model=vitdet_tiny", "model.depth=12", "model.drop_path_rate=0.1",
                          "model.window_block_indexes=[]", "model.image_size=64", "model.pretrain_img_size=64"])
    model = build_model(cfg.model, num_classes=3)
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    with dynamo_config.patch(recompile_limit=8):  # torch's default, whatever ran before; restored after
        assert comp.compile_blocks(model, backend=counting) == 12
        model.train()
        with torch.no_grad():
            model.backbone(torch.rand(1, 3, 64, 64))
    assert len(graphs) == 12
    torch._dynamo.reset()
