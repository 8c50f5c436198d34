"""After real optimizer steps: frozen parameters are bit-identical, trainable ones moved."""

import copy

import pytest
import torch
from detectron2.utils.events import EventStorage
from omegaconf import OmegaConf

from helpers import shapes_batch
from peftseg.config import SCHEMAS
from peftseg.engine.optim import build_optimizer
from peftseg.methods import METHODS, apply_method
from helpers import preset

TRAIN = OmegaConf.create({"base_lr": 1e-3, "weight_decay": 0.05, "optimizer": "adamw", "momentum": 0.9,
                          "peft_lr": None, "heads_lr": None})


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    return shapes_batch(tmp_path_factory.mktemp("steps"), n=2)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_frozen_stay_bit_identical_and_trainable_move(base, batch, name):
    model = apply_method(copy.deepcopy(base), preset("method", name, SCHEMAS["method"][name]))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and (name == "full") == (len(trainable) == len(before))
    optimizer = build_optimizer(model, TRAIN)
    model.train()
    torch.manual_seed(0)
    with EventStorage():  # detectron2's heads log sampling stats to it
        for _ in range(3):  # zero-initialised factors get a gradient from step 2 on
            loss = sum(model(batch).values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    for n, p in model.named_parameters():
        if n in trainable:
            assert not torch.equal(p, before[n]), f"{name}: trainable {n} did not change"
        else:
            assert torch.equal(p, before[n]), f"{name}: frozen {n} changed"
