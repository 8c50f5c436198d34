"""Parameter accounting against closed forms."""

import json
import re

import pytest
import torch.nn as nn

from peftseg.methods import apply_method
from peftseg.methods.full import FullConfig
from peftseg.methods.heads import HeadsConfig
from peftseg.methods.lora import LoraConfig
from peftseg.models import family_of
from peftseg.params import GROUPS, count_parameters



def assert_consistent(c):
    assert c.total == sum(g["total"] for g in c.by_group.values())
    assert c.trainable == sum(g["trainable"] for g in c.by_group.values())
    assert set(c.by_group) == set(GROUPS)
    assert c.ratio == pytest.approx(c.trainable / c.total)
    json.dumps(c.to_dict())


def test_groups_cover_the_whole_model(model):
    c = count_parameters(model)
    assert_consistent(c)
    assert c.total == sum(p.numel() for p in model.parameters())
    assert c.by_group["other"]["total"] == 0 and c.by_group["peft"]["total"] == 0
    assert all(c.by_group[g]["total"] > 0 for g in ("backbone", "neck", "task_heads"))
    assert c.by_group["backbone"]["total"] == sum(p.numel() for p in model.backbone.net.parameters())


def test_full_trains_everything(model):
    c = count_parameters(apply_method(model, FullConfig()))
    assert_consistent(c)
    assert c.trainable == c.total and c.ratio == 1.0


def test_heads_trains_all_but_the_backbone(model):
    c = count_parameters(apply_method(model, HeadsConfig()))
    assert_consistent(c)
    assert c.trainable == c.total - c.by_group["backbone"]["total"]
    assert c.by_group["backbone"]["trainable"] == 0


@pytest.mark.parametrize("rank,targets", [(8, ["attn_qkv", "attn_proj"]), (3, ["attn_qkv", "mlp"])])
def test_lora_adds_r_times_in_plus_out_per_targeted_linear(model, rank, targets):
    before = count_parameters(model)
    family = family_of(model)
    linears = [
        m for n, m in model.named_modules()
        if any(re.fullmatch(family.lora_targets[t], n) for t in targets)
    ]
    assert all(isinstance(m, nn.Linear) for m in linears)
    depth = len(model.backbone.net.blocks)
    per_block = {"attn_qkv": 1, "attn_proj": 1, "mlp": 2}
    assert len(linears) == depth * sum(per_block[t] for t in targets)
    expected = sum(rank * (m.in_features + m.out_features) for m in linears)
    if targets == ["attn_qkv", "attn_proj"]:  # the same by hand: qkv E->3E, proj E->E
        e = model.backbone.net.blocks[0].attn.proj.in_features
        assert expected == depth * rank * ((e + 3 * e) + (e + e))

    c = count_parameters(apply_method(model, LoraConfig(rank=rank, targets=targets)))
    assert_consistent(c)
    assert c.by_group["peft"] == {"total": expected, "trainable": expected}
    assert c.total == before.total + expected
    assert c.by_group["backbone"] == {"total": before.by_group["backbone"]["total"], "trainable": 0}
    neck_heads = before.by_group["neck"]["total"] + before.by_group["task_heads"]["total"]
    assert c.trainable == expected + neck_heads
    assert c.ratio == (expected + neck_heads) / (before.total + expected)


def test_lora_without_heads_trains_only_lora(model):
    c = count_parameters(apply_method(model, LoraConfig(rank=4, train_task_layers=False)))
    assert c.trainable == c.by_group["peft"]["total"] > 0


def test_shared_parameters_count_once():
    tied = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    tied[1].weight = tied[0].weight
    c = count_parameters(tied)
    assert c.total == 16 and c.by_group["other"]["total"] == 16
