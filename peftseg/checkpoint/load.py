"""The one checkpoint loader: a trained model from whichever checkpoint a user has, for
`peftseg eval`, `merge`, `predict` (and export); the file is read once.

Three kinds of file arrive:
- a PEFT checkpoint (`model_final.safetensors` of a run, or a periodic `model_*.pth`): the
  run's config and class names are in it; the base is rebuilt and the trained tensors
  loaded (peftseg.checkpoint.files);
- a merged checkpoint (`peftseg merge`): a plain detectron2 state dict of the whole model,
  plus `peftseg_merged` metadata (config and class names) so nothing has to be repeated;
- any other detectron2/PyTorch checkpoint (or one merged before the metadata existed):
  the model comes from Hydra overrides (`model=… model.weights=…`), the classes from
  `classes=[…]` or the dataset override.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch.nn as nn
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from peftseg.checkpoint.files import MERGED_KEY, PeftCheckpointer, checkpoint_file, read_checkpoint_file
from peftseg.checkpoint.provenance import warn_if_libraries_moved
from peftseg.errors import UserError
from peftseg.models import facts_of
from peftseg.registry import GROUPS

log = logging.getLogger(__name__)

# what may change between training and evaluating a checkpoint; the model and the
# method are fixed by the checkpoint itself
_OVERRIDABLE = ("dataset", "train.device", "train.num_workers")


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

    from peftseg.config import check_group_choices, compose_config, validate

    check_group_choices(overrides)
    try:
        cfg = compose_config(overrides)
    except (HydraException, OmegaConfBaseException) as e:
        raise UserError(f"the overrides {' '.join(overrides)} do not compose into a config: {e}") from e
    validate(cfg)  # the same range and choice checks as `peftseg train`
    return cfg


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


# the option name under which a checkpoint's own model, method, dataset and train settings are
# composed (conf/<group>/ holds no yaml of that name, and no registration takes it)
SAVED_OPTION = "_checkpoint"


def compose_for_checkpoint(saved: dict, overrides: list[str]) -> DictConfig:
    """The checkpoint's config, typed by the registered schemas, composed by Hydra with
    `overrides` as `peftseg train` composes a run's (`dataset=<name>` takes that dataset's
    options, `dataset.<key>=…`, `~…` and `+…` as on the command line), then validated like a
    training config."""
    from hydra.core.config_store import ConfigStore
    from hydra.errors import HydraException

    from peftseg.config import check_group_choices, compose_config, typed_group, validate

    parsed = _parse(overrides)
    check_group_choices(overrides)
    try:
        typed = {g: typed_group(g, saved[g]) for g in GROUPS}
    except (OmegaConfBaseException, KeyError) as e:  # a setting it lacks or cannot hold; no family/name
        raise UserError(f"the checkpoint's saved config does not fit this peftseg version ({_first_line(e)}); "
                        "evaluate it with the peftseg version that trained it, or train the run again.") from None
    store = ConfigStore.instance()
    for group, node in typed.items():
        store.store(group=group, name=SAVED_OPTION, node=node)
    chosen = {o.key_or_group for o in parsed if o.key_or_group in GROUPS}  # dataset=<name> replaces its own
    try:
        composed = compose_config([f"{g}={SAVED_OPTION}" for g in GROUPS if g not in chosen] + list(overrides))
    except (HydraException, OmegaConfBaseException) as e:
        if isinstance(e.__cause__, UserError):
            raise e.__cause__ from None
        raise UserError(
            f"the overrides {' '.join(overrides)} do not fit the checkpoint's config: {_first_line(e)}. Give each "
            "as key=value, with a setting the config has and a value of its type (`peftseg train --help "
            "dataset=<name>` lists a dataset's settings)."
        ) from None
    cfg = OmegaConf.create({g: composed[g] for g in GROUPS})
    validate(cfg)
    return cfg


def _first_line(e: Exception) -> str:
    """The gist of an OmegaConf or Hydra refusal: its first line, with its cause's where that says more."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    cause = [line.strip() for line in str(e.__cause__ or "").splitlines() if line.strip()]
    first = (lines[0] if lines else type(e).__name__).rstrip(".")
    return f"{first} ({cause[0].rstrip('.')})" if cause and cause[0] not in first else first


def _class_names(cfg: DictConfig, classes: list[str] | None, splits, where: str) -> list[str]:
    if classes:
        return list(classes)
    if splits is not None:
        return list(splits.class_names)
    raise UserError(
        f"{where} does not say which classes the model predicts; pass them in the model's order, "
        "e.g. classes=[circle,square,triangle], or a dataset whose categories they are (dataset=…)."
    )


@dataclass
class Described:
    """A peftseg run or merged checkpoint, read and checked: what its model is rebuilt from."""
    source: Path
    data: dict  # the file as read_checkpoint_file returned it
    meta: dict  # its "peftseg" (run) or MERGED_KEY (merged) metadata
    merged: bool
    cfg: DictConfig  # the checkpoint's config with the overrides applied, validated
    class_names: list[str]
    splits: object = None  # peftseg.data.DatasetSplits when the caller asked for the dataset


def describe(source: Path, data: dict, overrides: list[str], *, classes: list[str] | None = None,
             need_dataset: bool = False) -> Described:
    """The checks every command applies to a checkpoint that records its model (a run's or a
    merged one) before a model is built from it: its metadata, the library versions it was made
    with, `classes=` against the classes it records, the overrides, and (`need_dataset`) the
    dataset's classes against the model's. One place, so that one checkpoint and each entry of
    checkpoint=[…] are checked alike."""
    from peftseg.data import register_splits

    merged = MERGED_KEY in data
    meta = data[MERGED_KEY] if merged else data["peftseg"]
    _check_metadata(meta, source, merged)
    warn_if_libraries_moved(meta, source)
    if classes is not None and list(classes) != list(meta["class_names"]):
        raise UserError(
            f"classes={list(classes)} was given, but {source} is a {'merged' if merged else 'PEFT'} checkpoint that "
            f"predicts {list(meta['class_names'])} (in that order), which it records itself. Leave classes= out: "
            "it is only for plain checkpoints, which do not record their classes."
        )
    # the checkpoint's config, typed and validated; only dataset/device overrides pass
    cfg = compose_for_checkpoint(meta["config"], overrides)
    names = list(meta["class_names"])
    splits = None
    if need_dataset:
        splits = register_splits(cfg.dataset)
        found = list(splits.class_names)
        if found != names:
            raise UserError(
                f"checkpoint {source} predicts classes {names} but dataset {cfg.dataset.name!r} has "
                f"{found}; evaluate on a dataset with the same categories in the same order."
            )
    return Described(source=source, data=data, meta=meta, merged=merged, cfg=cfg, class_names=names, splits=splits)


def load_model(checkpoint: str | None, overrides: list[str], *, classes: list[str] | None = None,
               need_dataset: bool = False) -> Loaded:
    """Build the model a checkpoint (or `model.weights=` override) describes, weights loaded,
    in eval mode on the CPU. `need_dataset`: the caller evaluates, so the dataset must exist
    and its classes must be the model's."""
    from peftseg.data import register_splits
    from peftseg.build import build_for_run  # run.py imports the trainer: import when used
    from peftseg.models import build_model

    splits = None

    source, data, unreadable = None, {}, None
    if checkpoint:
        source = checkpoint_file(checkpoint)
        try:
            source, data = read_checkpoint_file(source)
        except UserError as e:  # perhaps a pickled detectron2 model-zoo .pkl: load_weights reads those
            unreadable = e
    if "peftseg" in data or MERGED_KEY in data:
        d = describe(source, data, overrides, classes=classes, need_dataset=need_dataset)
        cfg, names, splits = d.cfg, d.class_names, d.splits
        if d.merged:
            cfg.model.weights = ""  # every tensor comes from the merged file
            model = build_model(cfg.model, len(names), names)
            _load_whole(model, data["model"], source)
            kind = "merged"
        else:
            model = build_for_run(cfg, len(names), names)
            PeftCheckpointer(model, meta={}).load_peft(source, d.meta["config"], data)
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
            splits = register_splits(cfg.dataset)
        names = _class_names(cfg, classes, splits, "a plain checkpoint")
        model = build_model(cfg.model, len(names), names)
        _require_whole_model(model, cfg.model.name)
        kind = "plain"
    return Loaded(model=model.eval(), cfg=cfg, class_names=names, source=source, kind=kind, splits=splits)


def _load_whole(model: nn.Module, state: dict, source: Path) -> None:
    """A merged file holds every tensor of the plain model: load strictly, or say what differs."""
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a tensor of another shape (e.g. class names edited in the metadata)
        first = str(e).split("\n")[1].strip() if "\n" in str(e) else str(e)
        raise UserError(
            f"merged checkpoint {source} does not fit the model its metadata names ({first}); the file's tensors "
            "or its metadata (config, class_names) were edited — merge the run again with "
            "`peftseg merge checkpoint=<run dir>`."
        ) from None
    if result.missing_keys or result.unexpected_keys:
        raise UserError(
            f"merged checkpoint {source} does not fit the model its metadata names: missing "
            f"{result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}; it was edited or written by "
            "another peftseg version — merge the run again with `peftseg merge checkpoint=<run dir>`."
        )


def _require_whole_model(model: nn.Module, preset: str) -> None:
    """A plain checkpoint used for inference must fill the whole model: training may start from a
    backbone-only file (the heads then train), but predict/eval would run random heads."""
    facts = facts_of(model)
    report = facts.weights if facts is not None else None
    missing = [k for k in getattr(report, "missing", ()) if not k.endswith("num_batches_tracked")]
    if missing:
        parts = sorted({k.split(".")[0] for k in missing})
        raise UserError(
            f"{getattr(report, 'source', 'the checkpoint')} does not hold the whole {preset} model: "
            f"{len(missing)} tensors did not load (in {', '.join(parts)}; e.g. {missing[0]}), so those parts would "
            "predict from random initialisation. Give a checkpoint of this model trained for these classes (a "
            "run's directory or model_final file, or a `peftseg merge` output), or the preset it was trained as."
        )


def _check_metadata(meta, source: Path, merged: bool) -> None:
    """The metadata a PEFT or merged checkpoint rebuilds its model from: a config and class names."""
    what = "merged" if merged else "PEFT"
    problem = None
    if not isinstance(meta, dict):
        problem = f"its metadata is a {type(meta).__name__}, not an object"
    elif not isinstance(meta.get("config"), dict) or not all(
            isinstance(meta["config"].get(g), dict) for g in GROUPS):
        problem = "its metadata has no config (model, method, dataset and train)"
    elif not (isinstance(meta.get("class_names"), list) and meta["class_names"]
              and all(isinstance(n, str) for n in meta["class_names"])):
        problem = "its metadata has no list of class names"
    if problem:
        raise UserError(
            f"{what} checkpoint {source} cannot be rebuilt: {problem}; the file was edited or written by another "
            "tool. Use the run's own model_final file, or merge the run again with `peftseg merge checkpoint=<run dir>`."
        )
