"""AdaLoRA: parameters in closed form, a budget schedule tied to train.max_iter, the rank
allocator running in the training loop (ranks pruned to the target budget), the final ranks in
the run record, the report and both checkpoint forms, and the orthogonality penalty in the loss."""

import copy
import io
import json

import pytest
import torch
from rich.console import Console

from helpers import _in, preset, run_in_process, ulps
from peftseg.errors import UserError
from peftseg.methods import apply_method
from peftseg.params import count_parameters
from peftseg.registry import METHODS

RANK, TARGET = 4, 2  # 8 adapted layers on vitdet_tiny (qkv and proj of 4 blocks): 32 ranks -> 16


def adalora(**overrides):
    return preset("method", "adalora", METHODS.get("adalora").config, **overrides)


def test_each_linear_trains_rank_times_in_plus_out_plus_rank_at_init(base, model):
    layers = [(m.in_features, m.out_features) for b in base.backbone.net.blocks for m in (b.attn.qkv, b.attn.proj)]
    r = 12
    model = apply_method(model, adalora(rank=r, total_step=100))
    # A (r × in), B (out × r) and the singular values E (r); peft's ranknum is a buffer
    assert count_parameters(model).by_group["peft"]["trainable"] == sum(r * (i + o) + r for i, o in layers)


def test_the_schedule_length_is_train_max_iter_and_must_leave_steps_to_prune():
    from peftseg.config import compose_config, validate

    assert preset("method", "adalora").total_step == 1000  # train=default's max_iter
    assert compose_config(["method=adalora", "train=smoke"]).method.total_step == 60
    with pytest.raises(UserError, match=r"method\.tinit \+ method\.tfinal < train\.max_iter, but 30 \+ 30 >= 60"):
        validate(compose_config(["method=adalora", "train=smoke", "method.tinit=30", "method.tfinal=30"]))
    with pytest.raises(UserError, match=r"method\.target_rank=16 is above method\.rank=12"):
        validate(compose_config(["method=adalora", "method.target_rank=16"]))


def test_a_schedule_of_another_length_than_the_run_is_refused(model):
    from peftseg.engine.rank_budget import rank_budget_hook

    model = apply_method(model, adalora(total_step=50))
    with pytest.raises(UserError, match=r"method\.total_step=50 but train\.max_iter=60"):
        rank_budget_hook(model, 60)
    assert rank_budget_hook(model, 50) is not None


@pytest.fixture(scope="module")
def ada_run(tmp_path_factory, shapes_cache):
    """A 6-step AdaLoRA run: 1 warm-up step at the full budget, pruning over steps 2-3, the
    final budget from step 4 (= 6 - tfinal) on. Returns (study folder, run folder, record)."""
    study = tmp_path_factory.mktemp("adalora_study")
    run_dir = study / "ada"
    run_dir.mkdir()
    record = run_in_process(run_dir, shapes_cache, "method=adalora", "train.max_iter=6", "train.warmup_iters=0",
                            f"method.rank={RANK}", f"method.target_rank={TARGET}", "method.tinit=1", "method.tfinal=2",
                            "train.log_period=1", "model.score_thresh_test=0.0", "train.num_workers=0")
    assert record.status == "ok", record.error
    return study, run_dir, record


def test_the_allocator_prunes_to_the_target_and_the_record_holds_each_layers_rank(ada_run):
    from peftseg.results import read_record

    _, run_dir, record = ada_run
    budget = read_record(run_dir).rank_budget  # as written to results.json
    assert budget == record.rank_budget
    assert budget["initial_total"] == 8 * RANK and budget["target_total"] == 8 * TARGET
    final = budget["final"]
    assert len(final) == 8 and all(0 <= r <= RANK for r in final.values())
    # the final allocation keeps the target budget exactly (ties at the threshold aside: fewer)
    assert sum(final.values()) == budget["final_total"] <= budget["target_total"] < budget["initial_total"]
    assert len(set(final.values())) > 1, "the budget was not reallocated between layers"
    # the orthogonality penalty joined the loss, every step
    steps = [json.loads(line) for line in (run_dir / "metrics.json").read_text().splitlines()]
    penalties = [s["loss_adalora_orth"] for s in steps if "loss_adalora_orth" in s]
    assert len(penalties) == 6 and all(0 < p < float("inf") for p in penalties)


def test_checkpoints_load_back_with_the_final_ranks(ada_run, shapes_cache):
    """peftseg's checkpoint keeps the initial shapes with the pruned singular values zero; the
    peft export is cut to the final ranks and peft's loader resizes the layers to them. Both give
    the model that trained, and it merges into the same model."""
    from detectron2.utils.env import seed_all_rng
    from peft import PeftModel
    from safetensors.torch import load_file

    from peftseg.checkpoint.load import load_model
    from peftseg.checkpoint.merge import merge_and_unload
    from peftseg.config import compose_config
    from peftseg.models import build_model

    _, run_dir, record = ada_run
    final = record.rank_budget["final"]
    with _in(run_dir, shapes_cache):
        loaded = load_model(str(run_dir), []).model
    kept = {n.removesuffix(".lora_E.default"): int((p != 0).sum()) for n, p in loaded.named_parameters() if "lora_E" in n}
    assert kept == final

    export = run_dir / "peft"
    cut = load_file(str(export / "adapter_model.safetensors"))
    layers = dict(loaded.named_modules())
    assert sum(t.numel() for t in cut.values()) == sum(
        r * (layers[n].in_features + layers[n].out_features + 1) for n, r in final.items())
    seed_all_rng(0)  # the base as the run built it (train.seed=0)
    plain = build_model(compose_config(["method=adalora"]).model, num_classes=3).eval()
    plain.load_state_dict(load_file(str(export / "trained_outside_peft.safetensors")), strict=False)
    by_peft = PeftModel.from_pretrained(plain, str(export)).eval()
    peft_layers = dict(by_peft.base_model.model.named_modules())
    assert {n: peft_layers[n].lora_A["default"].shape[0] for n in final} == final

    x = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = loaded.backbone(x)
        got = by_peft.base_model.model.backbone(x)
        merged = merge_and_unload(copy.deepcopy(loaded)).backbone(x)
    for k in want:
        # the cut layers sum fewer (zero) terms, the merged ones fold B·E·A into W: a few roundings
        # per adapted layer (measured <= 4 ulps); 32 ulps of the feature's max over the 4 blocks
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=ulps(want[k], 32))
        torch.testing.assert_close(merged[k], want[k], rtol=0, atol=ulps(want[k], 32))


def test_the_report_shows_the_budget(ada_run):
    from peftseg.report import build_report

    study, _, record = ada_run
    out = io.StringIO()
    build_report(study, None, Console(file=out, width=200))
    b = record.rank_budget
    line = (f"AdaLoRA budget of ada: initial total rank {b['initial_total']} → final {b['final_total']} "
            f"(target {b['target_total']}) over 8 layers")
    assert line in out.getvalue()
    assert line in (study / "report.md").read_text()


def test_an_adalora_run_refuses_to_resume(model):
    """The allocator's state is not in the checkpoint: a resumed run would restart the schedule."""
    from types import SimpleNamespace

    from peftseg.engine.rank_budget import rank_budget_hook

    hook = rank_budget_hook(apply_method(model, adalora(total_step=20)), 20)
    hook.trainer = SimpleNamespace(start_iter=0)
    hook.before_train()  # a fresh run starts
    hook.trainer = SimpleNamespace(start_iter=7)
    with pytest.raises(UserError, match="an AdaLoRA run cannot be resumed"):
        hook.before_train()


def test_a_step_with_overflowed_gradients_is_not_scored(model):
    """fp16 training skips a step whose gradients overflowed; the allocator must not average them in."""
    from types import SimpleNamespace

    from peftseg.engine.rank_budget import rank_budget_hook

    model = apply_method(model, adalora(total_step=20))
    hook = rank_budget_hook(model, 20)
    hook.trainer = SimpleNamespace(iter=3, start_iter=0)
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in params:
        p.grad = torch.ones_like(p)
    params[0].grad[0] = float("inf")
    hook.after_step()
    allocator = hook._tuner.rankallocator
    assert allocator.exp_avg_ipt == {}
    params[0].grad[0] = 1.0
    hook.after_step()
    assert allocator.exp_avg_ipt and all(torch.isfinite(v).all() for v in allocator.exp_avg_ipt.values())
