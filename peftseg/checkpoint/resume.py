"""What a resumed run is: the interrupted run's own config, and what may change on the way.

`train.resume=<run dir or model_*.pth>` continues a run as Detectron2's `--resume` does: the
config comes from the checkpoint (the run's resolved config, saved in every checkpoint), so
the overrides of the first run need not be repeated. A setting given anew on the command
line is applied only when it cannot change what the remaining steps compute (where the run
runs, how often it logs, evaluates or saves, where the data is cached); any other one
(learning rate, schedule, batch, seed, data, model, method) is refused with the setting
named, because the optimizer and scheduler states in the checkpoint were made with the old
value and a record showing the new one would describe a run that never happened.

A finished run (its final checkpoint, or a periodic one at the end of its schedule) is
refused too: there is nothing left to train, and restarting would put trained weights under
a fresh optimizer while recording an ordinary run.

Two entry points share one set of rules: `resumed_config` (the CLI: composes the config the
resumed run uses) and `check_resumable` (the trainer: refuses any checkpoint/config pair
that breaks the rules, whoever built the config).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from peftseg.checkpoint.files import FINAL, read_checkpoint
from peftseg.dotted import flatten
from peftseg.errors import UserError
from peftseg.registry import GROUPS

# Settings a resumed run may change: none of them changes the numbers the remaining steps
# compute (devices and process layout change float rounding at most; the data position and
# RNG states in the checkpoint keep the batches the same). Everything else is fixed.
APPLICABLE = frozenset({
    "train.resume", "train.device", "train.num_workers", "train.threads", "train.progress", "train.log_period",
    "train.eval_period", "train.checkpoint_period", "train.timing_warmup_iters",
    "train.activation_checkpointing", "train.checkpoint_parts", "train.num_gpus", "train.num_machines", "train.machine_rank",
    "train.dist_url", "train.find_unused_parameters",
    "model.weights",  # where the base weights are read from; the base fingerprint checks they are the same
    "dataset.cache_dir", "dataset.root",  # where the data lies; the class names are compared
})


def _saved_config(source: Path, data: dict) -> dict:
    meta = data.get("peftseg") or {}
    config = meta.get("config")
    if not isinstance(config, dict) or any(not isinstance(config.get(g), dict) for g in GROUPS):
        raise UserError(f"checkpoint {source} carries no run config, so there is no run to continue; "
                        "start a new run instead (without train.resume).")
    return config


def _finished(source: Path, data: dict, max_iter: int) -> str | None:
    """Why the checkpoint ends its schedule, or None when steps are left."""
    iteration = data.get("iteration")
    if source.stem == FINAL or not isinstance(iteration, int):
        return f"{source.name} is the final checkpoint of a finished run"
    if iteration + 1 >= max_iter:
        return f"{source.name} was saved after iteration {iteration}, the last of its train.max_iter={max_iter}"
    return None


def _refuse_finished(source: Path, why: str) -> UserError:
    return UserError(
        f"train.resume={source}: {why}, so nothing is left to train (resuming would restart a finished "
        f"schedule on trained weights). Evaluate it with `peftseg eval checkpoint={source}`, or to train for "
        "longer start a new run with a larger train.max_iter."
    )


def check_resumable(source: Path, data: dict, config: dict, class_names: list[str]) -> None:
    """Refuse resuming `data` (a run checkpoint read by read_checkpoint) into a run configured
    as `config` (resolved) with `class_names`: finished, a setting that differs, other classes."""
    saved = _saved_config(source, data)
    why = _finished(source, data, int(saved["train"].get("max_iter", 0)))
    if why:
        raise _refuse_finished(source, why)
    mine = flatten({g: config[g] for g in GROUPS})
    theirs = flatten({g: saved[g] for g in GROUPS})
    # keys a checkpoint of an earlier version does not have took their (then only) default
    changed = sorted(k for k in theirs.keys() & mine.keys() if k not in APPLICABLE and theirs[k] != mine[k])
    if changed:
        shown = "; ".join(f"{k}={mine[k]!r} (the checkpoint's run: {theirs[k]!r})" for k in changed[:4])
        raise UserError(
            f"train.resume={source} continues a run as it was configured, but {shown} differs. The "
            "checkpoint's optimizer, schedule and weights were made with its values, so the run would not "
            "be the one recorded. Drop the override(s) to continue the run (its settings are taken from the "
            "checkpoint: no need to repeat them), or start a new run without train.resume. Settings that may "
            f"change on resume: {', '.join(sorted(APPLICABLE))}."
        )
    saved_names = (data.get("peftseg") or {}).get("class_names")
    if saved_names is not None and list(saved_names) != list(class_names):
        raise UserError(
            f"train.resume={source}: the checkpoint's model predicts classes {list(saved_names)} but dataset "
            f"{config['dataset'].get('name')!r} has {list(class_names)}; resume on the dataset it was trained on "
            "(same categories, same order)."
        )


def _overridden_keys(overrides: list[str]) -> list[tuple[str, bool]]:
    """(key, is_group_choice) of each override the user gave (Hydra syntax, as in `.hydra/overrides.yaml`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    out = []
    for o in OverridesParser.create().parse_overrides(list(overrides)):
        key = o.key_or_group
        out.append((key, key in GROUPS))
    return out


def resumed_config(composed: DictConfig, overrides: list[str]) -> DictConfig:
    """The config a run with `train.resume` runs: the checkpoint's own, with the settings given
    anew in `overrides` (the command line's) applied — or refused, by check_resumable's rules.
    Groups outside model/method/dataset/train (objective, tracking) come from `composed`."""
    from peftseg.config import typed_group

    source, data = read_checkpoint(composed.train.resume)
    saved = _saved_config(source, data)
    why = _finished(source, data, int(saved["train"].get("max_iter", 0)))
    if why:
        raise _refuse_finished(source, why)
    try:
        out = composed.copy()
        for group in GROUPS:
            out[group] = typed_group(group, saved[group])
    except (OmegaConfBaseException, KeyError) as e:
        raise UserError(f"checkpoint {source}: its saved config does not fit this peftseg version ({e}); "
                        "start a new run instead.") from None
    for key, is_group in _overridden_keys(overrides):
        if is_group:
            if composed[key].get("name") != saved[key].get("name"):
                raise UserError(
                    f"train.resume={source} continues a run of {key}={saved[key].get('name')}, but "
                    f"{key}={composed[key].get('name')} was given; a checkpoint only continues with its own {key}. "
                    f"Drop {key}=… (the run's settings come from the checkpoint), or start a new run without "
                    "train.resume."
                )
            continue
        if key.split(".", 1)[0] not in GROUPS:
            continue
        value = OmegaConf.select(composed, key)
        try:
            OmegaConf.update(out, key, value.copy() if isinstance(value, DictConfig) else value, merge=False)
        except OmegaConfBaseException as e:
            raise UserError(f"{key} does not fit the checkpoint's config ({e}).") from None
    out.train.resume = composed.train.resume
    # the settings now (the dataset's class names are compared when the trainer has the data)
    names = list((data.get("peftseg") or {}).get("class_names") or [])
    check_resumable(source, data, OmegaConf.to_container(out, resolve=True), names)
    return out


def saved_group_choices(resume: str) -> list[str]:
    """`group=<option>` for each of the checkpoint's model/method/dataset/train choices that is
    an option of conf/: given to Hydra before it composes, so that what it derives from the
    choices (the run dir's `<model>-<method>` name) is the resumed run's, not the defaults'."""
    from peftseg.config import group_options

    source, data = read_checkpoint(resume)
    saved = _saved_config(source, data)
    choices = []
    for group in GROUPS:
        name = saved[group].get("name")
        if isinstance(name, str) and name in group_options(group):
            choices.append(f"{group}={name}")
    return choices
