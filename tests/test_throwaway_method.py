"""The registry is the only place a method's facts live: a method registered here, in the
test, with no other edit anywhere (no yaml under conf/method/ either), shows up in the CLI's
list and help, `method=<name>` composes, validates and trains, its parameters are accounted
as `peft`, get `train.peft_lr`, it honours `method.blocks`, and it takes its place in the
report's order and colours, and `peftseg search` samples it."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
from omegaconf import OmegaConf

from helpers import registered_for_test
from peftseg.config import TrainConfig
from peftseg.engine.optim import build_optimizer
from peftseg.errors import UserError
from peftseg.methods import apply_method
from peftseg.methods.options import PeftOptions
from peftseg.params import count_parameters
from peftseg.registry import METHODS, MethodSpec

NAME = "throwaway_scale"


@dataclass
class ThrowawayConfig(PeftOptions):  # + base_dtype, blocks, train_task_layers
    name: str = NAME
    init: float = 1.0  # starting value of each block's output scale


def apply(model, cfg):
    """One learnable scalar per backbone block (multiplying its output): the smallest method
    that adds parameters, placed per block through the FamilyMap like a real one."""
    from peftseg.methods.options import selected_blocks
    from peftseg.methods.freeze import train_only_added

    added = []
    for name in selected_blocks(model, cfg.blocks):
        block = model.get_submodule(name)
        block.throwaway_scale = nn.Parameter(torch.full((), float(cfg.init)))
        block.register_forward_hook(lambda m, _, out: out * m.throwaway_scale)
        added.append(block.throwaway_scale)
    return train_only_added(model, added, NAME, cfg.train_task_layers)


@pytest.fixture()
def registered():
    from peftseg.search_space import Float

    spec = MethodSpec(NAME, ThrowawayConfig, apply, summary="a learnable output scale per backbone block",
                      adds_parameters=True, block_aware=True, order=35, colour="#123456",
                      search_space=(Float("init", 0.5, 2.0),))
    with registered_for_test(METHODS, spec, "method"):
        yield spec


def test_the_cli_lists_it_and_its_knobs(registered):
    from peftseg.cli.list import list_text, train_help

    assert any(line.split()[:1] == [NAME] and line.endswith("a learnable output scale per backbone block")
               for line in list_text().splitlines())
    text = train_help([f"method={NAME}"])
    assert f"{NAME}*" in text
    assert "method.init=1.0  # starting value of each block's output scale" in text
    assert "method.train_task_layers=True" in text


def test_it_composes_validates_and_trains_without_a_yaml(registered, tmp_path, shapes_cache):
    from helpers import CONF, run_in_process
    from peftseg.config import check_group_choices, compose_config, group_options, validate

    assert not (CONF / "method" / f"{NAME}.yaml").exists()
    assert NAME in group_options("method")
    check_group_choices([f"method={NAME}", f"method={NAME},lora"])  # a single choice and a sweep
    cfg = compose_config([f"method={NAME}", "method.init=0.5", "method.blocks=last:1"])
    validate(cfg)
    assert OmegaConf.get_type(cfg.method) is ThrowawayConfig
    assert (cfg.method.name, cfg.method.init, cfg.method.blocks) == (NAME, 0.5, "last:1")
    with pytest.raises(UserError, match=r"method\.inti is not a setting of method 'throwaway_scale' "
                                        r"\(did you mean method\.init\?\)"):
        validate(compose_config([f"method={NAME}", "+method.inti=2"]))

    record = run_in_process(tmp_path, shapes_cache, f"method={NAME}", "method.blocks=last:1", "train.max_iter=2",
                            "train.warmup_iters=0", "dataset.num_train=4", "dataset.num_val=2", "model.score_thresh_test=0.0")
    assert record.status == "ok", record.error
    assert record.knob("method.name") == NAME and record.knob("method.init") == 1.0
    assert record.params["by_group"]["peft"]["trainable"] == 1  # the one block's scale trained


def test_accounting_learning_rates_and_blocks_follow_the_registration(registered, base):
    cfg = OmegaConf.structured(ThrowawayConfig(blocks="last:1"))
    model = apply_method(copy.deepcopy(base), cfg)
    counts = count_parameters(model)
    assert counts.by_group["peft"]["total"] == counts.by_group["peft"]["trainable"] == 1  # one block: one scalar
    assert counts.by_group["backbone"]["trainable"] == 0
    train = OmegaConf.merge(OmegaConf.structured(TrainConfig), {"base_lr": 1e-3, "peft_lr": 7e-3})
    optimizer = build_optimizer(model, train)
    scale = next(p for n, p in model.named_parameters() if n.endswith("throwaway_scale"))
    lr = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert lr[id(scale)] == pytest.approx(7e-3)
    with pytest.raises(Exception, match="base_dtype=bf16 stores"):
        # not trains_everything: bf16 storage of the frozen base is allowed, unlike for `full`
        METHODS.get("full").config(base_dtype="bf16")
    ThrowawayConfig(base_dtype="bf16")  # allowed: it freezes the base


def test_report_order_and_colour_come_from_the_registration(registered):
    from peftseg.report.collect import group_records
    from peftseg.report.plots import method_colour
    from peftseg.results import Record, RunInfo

    def record(method):
        return Record(run=RunInfo(id=method, dir="", start_time="t"), status="ok",
                      config={"model.name": "m", "dataset.name": "d", "method.name": method})

    (group,) = group_records([record(m) for m in ("adapter", NAME, "lora", "full", "ia3")])
    # order=35: after ia3 (30), before lora (40)
    assert [r.knob("method.name") for r in group.records] == ["full", "ia3", NAME, "lora", "adapter"]
    assert method_colour(NAME) == "#123456"


def test_search_samples_it_and_its_knobs(registered):
    from peftseg.cli import search as search_cli

    plan = search_cli.parse_args([])
    assert NAME in plan.methods
    assert [k.key for k in METHODS.get(NAME).search_space] == ["init"]
