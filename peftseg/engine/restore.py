"""Rebuild a trained run from its PEFT checkpoint: base model + method + trained tensors."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch.nn as nn
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from peftseg.data import DatasetSplits, register_dataset
from peftseg.engine.checkpoint import PeftCheckpointer, read_checkpoint
from peftseg.errors import UserError

# what may change between training and evaluating a checkpoint; the model and the
# method are fixed by the checkpoint itself
_OVERRIDABLE = ("dataset.", "train.device", "train.num_workers")


@dataclass
class Restored:
    model: nn.Module
    cfg: DictConfig
    splits: DatasetSplits
    source: Path  # the checkpoint file


def parse_args(argv: list[str], allowed: tuple[str, ...]) -> tuple[dict[str, str], list[str]]:
    """Split `key=value` arguments into the command's own options and config overrides."""
    options, overrides = {}, []
    for arg in argv:
        key, eq, value = arg.partition("=")
        if not eq:
            raise UserError(f"argument {arg!r} is not key=value; write e.g. checkpoint=outputs/<date>/<time>.")
        if key in allowed:
            options[key] = value
        elif key.startswith(_OVERRIDABLE):
            overrides.append(arg)
        else:
            raise UserError(
                f"{key!r} cannot be set here; this command takes {', '.join(allowed)} and overrides of "
                f"{', '.join(_OVERRIDABLE)} (the model and method come from the checkpoint)."
            )
    if "checkpoint" not in options:
        raise UserError("no checkpoint given; pass checkpoint=<run dir or model_*.pth>.")
    return options, overrides


def restore(checkpoint: str, overrides: list[str]) -> Restored:
    from peftseg.engine.run import build_for_run  # run.py imports the trainer; keep this light

    source, data = read_checkpoint(checkpoint)
    meta = data["peftseg"]
    cfg = OmegaConf.create(meta["config"])
    OmegaConf.set_struct(cfg, True)
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
    except OmegaConfBaseException as e:
        raise UserError(f"override {overrides} does not fit the checkpoint's config: {e}") from e
    splits = register_dataset(cfg.dataset)
    if list(splits.class_names) != list(meta["class_names"]):
        raise UserError(
            f"the checkpoint was trained on classes {meta['class_names']} but dataset "
            f"{cfg.dataset.name!r} has {list(splits.class_names)}; evaluate on a dataset with the same "
            "categories in the same order."
        )
    model = build_for_run(cfg, len(splits.class_names))
    PeftCheckpointer(model, meta={}).load_peft(source, meta["config"])
    return Restored(model=model, cfg=cfg, splits=splits, source=source)
