"""A trained model for inference, from whichever checkpoint a user has.

Three kinds of file reach `peftseg predict` and `peftseg eval`:
- a PEFT checkpoint (`model_final.pth` of a run): the run's config and class names are in
  it; the base is rebuilt and the trained tensors loaded (engine/checkpoint.py);
- a merged checkpoint (`peftseg merge`): a plain detectron2 state dict of the whole model,
  plus `peftseg_merged` metadata (config and class names) so nothing has to be repeated;
- any other detectron2/PyTorch checkpoint (or one merged before the metadata existed):
  the model comes from Hydra overrides (`model=… model.weights=…`), the classes from
  `classes=[…]` or the dataset override.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch.nn as nn
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from peftseg.engine.checkpoint import PeftCheckpointer, checkpoint_file
from peftseg.errors import UserError

log = logging.getLogger(__name__)

MERGED_KEY = "peftseg_merged"  # metadata key `peftseg merge` writes next to "model"


@dataclass
class Loaded:
    model: nn.Module
    cfg: DictConfig  # model, method, dataset, train as the model was built
    class_names: list[str]
    source: Path | None  # the checkpoint file (None: weights from model.weights only)
    kind: str  # "peft" | "merged" | "plain"
    splits: object = None  # peftseg.data.DatasetSplits when the caller asked for the dataset


def compose(overrides: list[str]) -> DictConfig:
    """The project's config composed by Hydra from `overrides`, as `peftseg train` would."""
    from hydra.errors import HydraException

    from peftseg.cli import check_group_choices
    from peftseg.config import compose_config, validate

    check_group_choices(overrides)
    try:
        cfg = compose_config(overrides)
    except (HydraException, OmegaConfBaseException) as e:
        raise UserError(f"the overrides {' '.join(overrides)} do not compose into a config: {e}") from e
    validate(cfg)  # the same range and choice checks as `peftseg train`
    return cfg


def _read(path: Path) -> dict:
    """The checkpoint as a dict ("model" + metadata keys), read without running code."""
    from peftseg.safe_load import load_any, load_safetensors

    if path.suffix == ".safetensors":
        tensors, header = load_safetensors(path, "checkpoint")
        data = {"model": tensors}
        for key in ("peftseg", MERGED_KEY):  # metadata of run checkpoints and merged files
            if key in header:
                try:
                    data[key] = json.loads(header[key])
                except ValueError as e:
                    raise UserError(f"{path}: its {key!r} metadata is not JSON ({e}); the file was edited or "
                                    "damaged — write it again with peftseg.") from None
        return data
    data = load_any(path, "checkpoint")  # weights_only / arrays-only: a checkpoint is data
    if not isinstance(data, dict):
        raise UserError(f"{path} holds a {type(data).__name__}, not a checkpoint dict; give a detectron2/PyTorch "
                        "checkpoint (a dict with a 'model' state dict).")
    return data


def _class_names(cfg: DictConfig, classes: list[str] | None, splits, where: str) -> list[str]:
    if classes:
        return list(classes)
    if splits is not None:
        return list(splits.class_names)
    raise UserError(
        f"{where} does not say which classes the model predicts; pass them in the model's order, "
        "e.g. classes=[circle,square,triangle], or a dataset whose categories they are (dataset=…)."
    )


def load_model(checkpoint: str | None, overrides: list[str], *, classes: list[str] | None = None,
               need_dataset: bool = False) -> Loaded:
    """Build the model a checkpoint (or `model.weights=` override) describes, weights loaded,
    in eval mode on the CPU. `need_dataset`: the caller evaluates, so the dataset must exist
    and its classes must be the model's."""
    from peftseg.data import register_dataset
    from peftseg.engine.run import build_for_run  # run.py imports the trainer: import when used
    from peftseg.models import build_model

    splits = None

    source, data, unreadable = None, {}, None
    if checkpoint:
        source = checkpoint_file(checkpoint)
        try:
            data = _read(source)
        except UserError as e:  # perhaps a pickled detectron2 model-zoo .pkl: load_weights reads those
            unreadable = e
    if "peftseg" in data or MERGED_KEY in data:
        from peftseg.engine.restore import compose_for_checkpoint

        merged = MERGED_KEY in data
        meta = data[MERGED_KEY] if merged else data["peftseg"]
        # the checkpoint's config, typed and validated; only dataset/device overrides pass
        cfg = compose_for_checkpoint(meta["config"], overrides)
        names = list(meta["class_names"])
        if need_dataset:
            splits = register_dataset(cfg.dataset)
            found = list(splits.class_names)
            if found != names:
                raise UserError(
                    f"checkpoint {source} predicts classes {names} but dataset {cfg.dataset.name!r} has "
                    f"{found}; evaluate on a dataset with the same categories in the same order."
                )
        if merged:
            cfg.model.weights = ""  # every tensor comes from the merged file
            model = build_model(cfg.model, len(names), names)
            _load_whole(model, data["model"], source)
            kind = "merged"
        else:
            model = build_for_run(cfg, len(names), names)
            PeftCheckpointer(model, meta={}).load_peft(source, meta["config"])
            kind = "peft"
    else:
        model_given = any(o.split("=", 1)[0].lstrip("+") == "model" for o in overrides)
        if not model_given and unreadable is not None:
            raise unreadable
        if not model_given:
            what = f"{source} is a plain checkpoint (no peftseg metadata)" if source else "no checkpoint was given"
            raise UserError(
                f"{what}, so the model it fits must be named: add model=<preset> (see `peftseg train --help`) "
                "and the classes (classes=[a,b,…] or dataset=…), e.g. "
                f"model=vitdet_b {'checkpoint=' + str(source) if source else 'model.weights=<file>'} classes=[cat,dog]."
            )
        cfg = compose([o for o in overrides if not o.startswith("checkpoint=")])
        if source is not None:
            cfg.model.weights = str(source)
        if not cfg.model.weights:
            raise UserError("give the weights to use: checkpoint=<file> or model.weights=<file>.")
        if need_dataset:
            splits = register_dataset(cfg.dataset)
        names = _class_names(cfg, classes, splits, "a plain checkpoint")
        model = build_model(cfg.model, len(names), names)
        kind = "plain"
    return Loaded(model=model.eval(), cfg=cfg, class_names=names, source=source, kind=kind, splits=splits)


def _load_whole(model: nn.Module, state: dict, source: Path) -> None:
    """A merged file holds every tensor of the plain model: load strictly, or say what differs."""
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise UserError(
            f"merged checkpoint {source} does not fit the model its metadata names: missing "
            f"{result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}; it was edited or written by "
            "another peftseg version — merge the run again with `peftseg merge checkpoint=<run dir>`."
        )


def merged_metadata(cfg: DictConfig, class_names: list[str], source: Path) -> dict:
    """What `peftseg merge` stores beside the state dict, so eval/predict need no overrides."""
    return {"config": OmegaConf.to_container(cfg, resolve=True), "class_names": list(class_names),
            "merged_from": str(source)}
