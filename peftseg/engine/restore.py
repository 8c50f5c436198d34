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
_OVERRIDABLE = ("dataset", "train.device", "train.num_workers")


@dataclass
class Restored:
    model: nn.Module
    cfg: DictConfig
    splits: DatasetSplits
    source: Path  # the checkpoint file


def split_command_args(argv: list[str], own: tuple[str, ...]) -> tuple[dict[str, str], list[str]]:
    """The command's own `key=value` options (checkpoint=, output=) and the rest, which are
    Hydra overrides of the checkpoint's config."""
    options, overrides = {}, []
    for arg in argv:
        key, eq, value = arg.partition("=")
        if eq and key in own:
            options[key] = value
        else:
            overrides.append(arg)
    if "checkpoint" not in options:
        raise UserError("no checkpoint given; pass checkpoint=<run dir or model_*.pth> (see --help).")
    return options, overrides


def _parse(overrides: list[str]):
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException as e:
        raise UserError(f"cannot read the overrides {overrides}: {e}") from None
    for o in parsed:
        key = o.key_or_group
        if o.is_sweep_override() or not (key == "dataset" or key.startswith(("dataset.", *_OVERRIDABLE[1:]))):
            raise UserError(
                f"{o.input_line!r} cannot be set here; the model and method come from the checkpoint, and "
                f"this command takes checkpoint=, output= and single overrides of: dataset=<name>, "
                f"dataset.<key>, {', '.join(_OVERRIDABLE[1:])} (see --help)."
            )
    return parsed


def compose_for_checkpoint(saved: dict, overrides: list[str]) -> DictConfig:
    """The checkpoint's config, typed by the registered schemas, with Hydra-style overrides
    applied (`dataset=<name>` composes that dataset's yaml, as `peftseg train` would), then
    validated like a training config."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl

    from peftseg.config import TrainConfig, validate
    from peftseg.registry import DATASETS, FAMILIES, METHODS

    parsed = _parse(overrides)
    schema = {
        "model": FAMILIES.get(saved["model"]["family"]).config,
        "method": METHODS.get(saved["method"]["name"]).config,
        "dataset": DATASETS.get(saved["dataset"]["name"]).config,
        "train": TrainConfig,
    }
    try:
        cfg = OmegaConf.create({g: OmegaConf.merge(OmegaConf.structured(cls), saved[g]) for g, cls in schema.items()})
        chosen = [o for o in parsed if o.key_or_group == "dataset"]
        if chosen:
            from peftseg.config import compose_config

            cfg.dataset = compose_config([o.input_line for o in chosen]).dataset
        ConfigLoaderImpl._apply_overrides_to_config([o for o in parsed if o.key_or_group != "dataset"], cfg)
    except OmegaConfBaseException as e:
        raise UserError(f"the overrides {overrides} do not fit the checkpoint's config: {e}") from None
    validate(cfg)
    return cfg


def restore(checkpoint: str, overrides: list[str]) -> Restored:
    from peftseg.engine.run import build_for_run  # run.py imports the trainer; keep this light

    source, data = read_checkpoint(checkpoint)
    meta = data["peftseg"]
    cfg = compose_for_checkpoint(meta["config"], overrides)
    splits = register_dataset(cfg.dataset)
    if list(splits.class_names) != list(meta["class_names"]):
        raise UserError(
            f"the checkpoint was trained on classes {meta['class_names']} but dataset "
            f"{cfg.dataset.name!r} has {list(splits.class_names)}; evaluate on a dataset with the same "
            "categories in the same order."
        )
    model = build_for_run(cfg, len(splits.class_names), splits.class_names)
    PeftCheckpointer(model, meta={}).load_peft(source, meta["config"])
    return Restored(model=model, cfg=cfg, splits=splits, source=source)
