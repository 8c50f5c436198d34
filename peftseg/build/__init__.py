"""The model as a run builds it: family + preset + method, seeded, with activation
checkpointing when asked, and the device it runs on. Below `checkpoint/`, so that loading a
checkpoint rebuilds its model without importing the training loop."""

from __future__ import annotations

import os

import torch
from detectron2.utils.env import seed_all_rng
from omegaconf import DictConfig

from peftseg.build.activation_checkpointing import enable_activation_checkpointing
from peftseg.errors import UserError
from peftseg.methods import apply_method
from peftseg.models import build_model, facts_of


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        if torch.version.cuda:  # a CUDA build that finds no GPU: reinstalling torch won't help
            fix = (f"This torch is a CUDA {torch.version.cuda} build, but no GPU is visible to it: check "
                   "`nvidia-smi`, the driver, and CUDA_VISIBLE_DEVICES (currently "
                   f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')!r}).")
        else:
            fix = "This torch is a CPU-only build; install a CUDA build of torch to train on a GPU."
        raise UserError(
            f"train.device={name} was asked for but torch sees no CUDA device on this machine. {fix} "
            "Or run with train.device=cpu (or train.device=auto)."
        )
    return torch.device(name)  # the value was checked against its choices at compose time


def build_for_run(cfg: DictConfig, num_classes: int, class_names=None, calibration=None) -> torch.nn.Module:
    """The model as a run trains it. Seeded first: a randomly initialised base must come
    out identical when `peftseg eval`/`merge`/resume rebuild it around a PEFT checkpoint.
    `class_names`: the dataset's, for a family that classifies by name (seem).
    `calibration(model)`: the run's training batches (an iterable), for a method whose start is
    computed from data (LoRA's method.init=eva|corda); None where no training follows."""
    seed_all_rng(cfg.train.seed)
    model = build_model(cfg.model, num_classes=num_classes, class_names=class_names)
    facts = facts_of(model)
    facts.calibration = (lambda: calibration(model)) if calibration is not None else None
    try:
        model = apply_method(model, cfg.method)
    finally:
        facts.calibration = None  # the loader is not the model's to keep
    if cfg.train.optimizer == "lorafa":
        from peftseg.methods._lora_factors import freeze_lora_a

        freeze_lora_a(model)
    if cfg.train.activation_checkpointing:
        facts_of(model).checkpointed_blocks = len(
            enable_activation_checkpointing(model, tuple(cfg.train.checkpoint_parts)))
    return model
