"""The runs a report is about: records under a folder, grouped by model and data (AP is only
comparable on the same images and classes), the knobs that tell a group's runs apart, each
run's baseline, and the Pareto front of trainable % against mask AP."""

from __future__ import annotations

import json
import math
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from peftseg.errors import UserError
from peftseg.finite import as_shown, as_stored, finite_or_none, result_problems
from peftseg.registry import METHODS
from peftseg.results import FILENAME, Record, read_record


@dataclass
class Group:
    model: str
    dataset: str
    data: tuple = ()  # data_identity() of every run in the group
    label: str = ""  # the dataset as titles show it: its name, and what tells it from a same-named group's
    records: list[Record] = field(default_factory=list)
    knobs: list[str] = field(default_factory=list)  # config keys shown as columns
    baseline_note: str | None = None
    timing_note: str | None = None  # step-time ratios of runs that did not share machine and time

    @property
    def title(self) -> str:
        return f"{self.model} · {self.label or self.dataset}"


def find_records(root: Path, console: Console | None = None) -> list[Path]:
    """Every results.json under `root`, following symlinked folders (a folder of links to runs
    kept elsewhere; Path.rglob does not follow them), each real file once however many links lead
    to it, a link back up the tree (a loop) entered once. A link to nothing is one warning line."""
    found: dict[str, Path] = {}  # real path -> the path it was found under
    entered: set[str] = set()
    pending = [Path(root)]
    while pending:
        folder = pending.pop()
        real = os.path.realpath(folder)
        if real in entered:
            continue
        entered.add(real)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)  # the same path wins every time
        except OSError as exc:
            if console:
                console.print(f"[yellow]skipping {folder}: cannot be listed ({exc.strerror or exc})[/]", highlight=False)
            continue
        for entry in entries:
            path = Path(entry.path)
            if entry.is_symlink() and not path.exists():
                if console:
                    console.print(f"[yellow]skipping {path}: a symbolic link to {os.readlink(path)}, which does not "
                                  "exist (a moved or deleted run?)[/]", highlight=False)
            elif entry.is_dir():  # follows links
                pending.append(path)
            elif entry.name == FILENAME and entry.is_file():
                found.setdefault(os.path.realpath(path), path)
    return sorted(found.values())


def load_records(root: Path, console: Console | None = None, paths: list[Path] | None = None) -> list[Record]:
    """The records under `root` (`paths`: the files find_records found there, when already known)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(
            f"{root} is not a directory. Give `peftseg report` the folder of a sweep or of runs "
            "(e.g. peftseg report multirun/2024-05-01/12-00-00); it reads every results.json under it."
        )
    paths = find_records(root, console) if paths is None else paths
    if not paths:
        raise UserError(
            f"No {FILENAME} under {root}. Point `peftseg report` at a folder that `peftseg train` "
            "wrote into (outputs/… for single runs, multirun/… for sweeps), or run a sweep first, "
            "e.g. peftseg train -m method=full,heads,lora."
        )
    records = []
    for path in paths:
        try:
            record = read_record(path)
        except (OSError, ValueError) as exc:  # a hand-edited or foreign file: skip, say so
            if console:
                console.print(f"[yellow]skipping {path}: {exc}[/]", highlight=False)
            continue
        record.run.dir = record.run.dir or str(path.parent)
        if record.ok:
            _refuse_invalid(record, path, console)
        else:  # a failed or pruned record's numbers are shown too: COCOeval's -1 as the null it means
            record.metrics = as_stored(record.metrics)
        records.append(record)
    if not records:
        raise UserError(f"None of the {len(paths)} {FILENAME} files under {root} could be read; "
                        "see the messages above, and re-run the runs they belong to.")
    return records


def _refuse_invalid(record: Record, path: Path, console: Console | None) -> None:
    """peftseg.finite's rule (finite numbers inside their ranges) on records written elsewhere
    (an older peftseg, a hand edit, another tool): one recorded "ok" whose numbers are not a
    result becomes an "invalid" row with the reason, its offending numbers blank, so it is
    never an ok row, a baseline or a point of the Pareto front. COCOeval's -1 in an entry it
    may leave undefined (APs, AP-<class>) is shown as the null it stands for."""
    problems = result_problems(record.metrics, record.params, record.efficiency)
    if not problems:
        record.metrics = as_shown("metrics", record.metrics)
        return
    record.status = "invalid"
    record.error = {"type": "InvalidResult", "traceback": None,
                    "message": f"recorded ok, but its numbers are not a result: {'; '.join(problems)}"}
    record.metrics, record.params, record.efficiency = (
        as_shown("metrics", record.metrics), as_shown("params", record.params),
        as_shown("efficiency", record.efficiency))
    if console:
        from rich.markup import escape

        console.print(f"[yellow]{escape(str(path))}: {escape(record.error['message'])}; shown as invalid, "
                      "not as a result[/]", highlight=False)


def _hashable(value) -> str:
    return json.dumps(value, sort_keys=True)


def _sort_value(value):
    # Numbers sort numerically (ranks 4 < 8 < 16), everything else by its text.
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, value, "")
    return (1, 0, _hashable(value))


# --- grouping and knobs -----------------------------------------------------------------

DASH = "—"  # an empty or undefined cell, in every table


def knob_text(value) -> str:
    if value is None:
        return DASH
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    if isinstance(value, str) and "/" in value:
        return Path(value).name  # a weights path: its file name tells runs apart
    return str(value)


# settings that say where a run's files and data were and how it logged, not what it trained or
# measured: a column of them would tell runs apart by something no result depends on
NO_COLUMN = frozenset({"train.resume", "train.num_workers", "train.progress", "train.log_period",
                       "train.checkpoint_period", "train.timing_warmup_iters", "train.dist_url",
                       "train.machine_rank", "dataset.cache_dir"})


def varying_knobs(records: list[Record]) -> list[str]:
    """Config keys worth a column: a method's keys that differ among that method's runs,
    and other (non-name) keys that differ across the group, except those of NO_COLUMN."""
    keys: list[str] = []
    by_method: dict[str, list[Record]] = {}
    for r in records:
        by_method.setdefault(r.knob("method.name"), []).append(r)
    for runs in by_method.values():
        for key in dict.fromkeys(k for r in runs for k in r.config):
            if key.startswith("method.") and key != "method.name" and key not in keys:
                if len({_hashable(r.knob(key)) for r in runs}) > 1:
                    keys.append(key)
    for key in dict.fromkeys(k for r in records for k in r.config):
        if key.startswith("method.") or key.endswith(".name") or key in keys or key in NO_COLUMN:
            continue
        if len({_hashable(r.knob(key)) for r in records}) > 1:
            keys.append(key)
    return keys


def method_rank(name) -> tuple:
    # the registry's order: baselines first, then methods by their usual footprint; a name
    # this install does not know (a record from a newer peftseg) goes last
    order = METHODS.names()
    return (order.index(name), "") if name in order else (len(order), str(name))


# dataset.* knobs that do not change which images and labels a run sees (where a cache lives)
NOT_DATA = frozenset({"dataset.cache_dir"})
# the training subset: a data-efficiency sweep stays one group (a line per method over the sizes),
# but a baseline must have trained on the same subset
SUBSET = ("dataset.train_subset", "dataset.subset_seed")


def data_identity(record: Record, subset: bool = False) -> tuple:
    """The data a run trained and was evaluated on, as (key, value) pairs: every dataset.* knob
    (name, domain, sizes, seed, paths, splits) but NOT_DATA, and the subset only if asked.
    Runs of `dataset=shapes` with two domains are two datasets (other images, other classes)."""
    keys = sorted(k for k in record.config if k.startswith("dataset.") and k not in NOT_DATA and k not in SUBSET)
    pairs = [(k, _hashable(record.knob(k))) for k in keys]
    if subset and record.knob("dataset.train_subset"):  # the seed picks the images of a subset only
        pairs += [(k, _hashable(record.knob(k))) for k in SUBSET]
    return tuple(pairs)


def _labels(groups: list[Group]) -> None:
    """A group's dataset label: its name, plus the knobs whose values tell it from the groups of
    the same model and dataset name (`shapes (domain=downstream, num_train=50)`)."""
    for g in groups:
        twins = [o for o in groups if (o.model, o.dataset) == (g.model, g.dataset)]
        keys = dict.fromkeys(k for o in twins for k, _ in o.data)
        differ = [k for k in keys if len({dict(o.data).get(k) for o in twins}) > 1]
        shown = ", ".join(f"{k.removeprefix('dataset.')}={knob_text(g.records[0].knob(k))}" for k in differ)
        g.label = f"{g.dataset} ({shown})" if shown else g.dataset


def group_records(records: list[Record]) -> list[Group]:
    """One group per model and data identity: AP, ΔAP and the front only compare runs on the
    same images and classes (a run on another domain is another experiment)."""
    groups: dict[tuple, Group] = {}
    for r in records:
        model, dataset, data = str(r.knob("model.name")), str(r.knob("dataset.name")), data_identity(r)
        groups.setdefault((model, dataset, data), Group(model, dataset, data)).records.append(r)
    _labels(list(groups.values()))
    for g in groups.values():
        g.knobs = varying_knobs(g.records)
        g.records.sort(key=lambda r: (
            method_rank(r.knob("method.name")),
            [_sort_value(r.knob(k)) for k in g.knobs],
            str(r.run.id),
        ))
    return [groups[k] for k in sorted(groups, key=lambda k: (k[0], groups[k].label))]


# --- baseline ---------------------------------------------------------------------------

def same_footing(record: Record, base: Record) -> bool:
    """Whether `base` can be `record`'s baseline: the same model at the same image size, trained
    and evaluated on the same data, training subset included (a 10-image LoRA run against the
    10-image full run, never against one trained on 300)."""
    return (record.knob("model.name") == base.knob("model.name")
            and _hashable(record.knob("model.image_size")) == _hashable(base.knob("model.image_size"))
            and data_identity(record, subset=True) == data_identity(base, subset=True))


def find_baseline(record: Record, group: Group, method: str) -> Record | None:
    """The group's ok `method` run on the same footing as `record` (same_footing) closest to it
    in config (most equal config values); None when there is none."""
    candidates = [r for r in group.records
                  if r.knob("method.name") == method and r.ok and r.mask_ap is not None and same_footing(record, r)]
    if not candidates:
        return None
    own = record.config

    def shared(r):
        other = r.config
        return sum(_hashable(other.get(k)) == _hashable(v) for k, v in own.items() if not k.startswith("method."))

    return max(candidates, key=shared)  # max keeps the first (sorted) one on ties


def unmatched_note(runs: list[Record], method: str) -> str:
    """One line: the ok runs that have no `method` run on the same footing, so their ΔAP and
    ratios show a dash instead of a comparison with a run on other data."""
    def which(r: Record) -> str:
        keys = ("model.image_size", *(SUBSET if r.knob("dataset.train_subset") else ()))
        shown = ", ".join(f"{k.split('.')[-1]}={r.knob(k)}" for k in keys if r.knob(k) is not None)
        return f"{r.run.id}" + (f" ({shown})" if shown else "")

    names = ", ".join(which(r) for r in runs[:3]) + (f" and {len(runs) - 3} more" if len(runs) > 3 else "")
    return (f"{len(runs)} run(s) have no successful `{method}` run at the same image size and training subset: "
            f"{names}; their ΔAP and ratios show {DASH}, not a comparison with other data.")


def timing_note(group: Group, extras: dict[int, dict]) -> str | None:
    """A caveat for the group's step-time ratios: each run timed itself, alone, at its own time
    (and maybe on another machine), so a ratio also carries the difference in machine load."""
    timed = [r for r in group.records if extras.get(id(r), {}).get("baseline.step_time_ratio") is not None]
    if len(timed) < 2:
        return None
    hosts = sorted({r.run.host for r in timed if r.run.host})
    where = f" on {len(hosts)} machines ({', '.join(hosts)})" if len(hosts) > 1 else ""
    return (f"step-time ratios compare runs timed one after another{where}, not side by side: machine load "
            "and clocks differ between them. For ratios to publish, measure the methods in one process with "
            "scripts/benchmark.py.")


def _ratio_of(a, b) -> float | None:
    if a is None or b is None or not b:
        return None
    return finite_or_none(a / b)  # two huge or tiny finite numbers can still divide to inf


def baseline_numbers(record: Record, base: Record | None) -> dict:
    if base is None or not record.ok:
        return {}
    same_mem = record.eff("peak_memory_kind") == base.eff("peak_memory_kind")
    ap, base_ap = record.mask_ap, base.mask_ap
    return {
        "baseline.run_id": base.run.id,
        "baseline.delta_mask_AP": None if ap is None or base_ap is None else finite_or_none(ap - base_ap),
        "baseline.step_time_ratio": _ratio_of(record.eff("mean_step_time_s"), base.eff("mean_step_time_s")),
        "baseline.peak_memory_ratio": _ratio_of(record.eff("peak_memory_bytes"), base.eff("peak_memory_bytes"))
        if same_mem else None,
    }


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats: the best AP at that trainable % or less."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def plottable(r: Record) -> bool:
    ap, rt = r.mask_ap, r.trainable_ratio
    return (r.ok and ap is not None and math.isfinite(ap) and rt is not None and math.isfinite(rt)
            and 0 < rt <= 1)


def training_set_size(r: Record):
    """What the front compares runs within: the images the run trained on (its record), else
    its dataset.train_subset (a record from before the number was recorded)."""
    return r.train_images if r.train_images is not None else _hashable(r.knob("dataset.train_subset") or 0)


def fronts_by_size(runs: list[Record]) -> list[list[int]]:
    """Indices into `runs` (plottable ones) of the Pareto front among the runs of each training-set
    size, left to right: a 10-image run is never dominated by a 300-image one. A size with a
    single run has no front (nothing to compare it with)."""
    sizes: dict = {}
    for i, r in enumerate(runs):
        sizes.setdefault(training_set_size(r), []).append(i)
    fronts = []
    for members in sizes.values():
        if len(members) >= 2:
            front = pareto_front([(runs[i].trainable_ratio, runs[i].mask_ap) for i in members])
            fronts.append([members[j] for j in front])
    return fronts


def front_ids(group: Group) -> set[int]:
    """id() of the group's runs on the Pareto front of trainable % (lower) vs mask AP (higher),
    among the runs of their training-set size."""
    runs = [r for r in group.records if plottable(r)]
    return {id(runs[i]) for front in fronts_by_size(runs) for i in front}


def _run_overrides(record: Record) -> list[str] | None:
    """The command-line overrides a run was started with (Hydra's .hydra/overrides.yaml)."""
    path = Path(record.run.dir or "") / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return None
    from omegaconf import OmegaConf

    return [str(o) for o in OmegaConf.load(path)]


def baseline_command(root: Path, group: Group, baseline: str) -> str:
    """The exact `peftseg train` that adds the missing baseline run to this folder: a member's
    own overrides with the method swapped, its record written under `root`."""
    for r in group.records:
        overrides = _run_overrides(r)
        if overrides is not None:
            break
    else:
        overrides = [f"model={group.model}", f"dataset={group.dataset}"]
    kept = [o for o in overrides if not o.lstrip("+~").startswith(("method", "hydra.run.dir", "hydra.sweep"))]
    words = [f"method={baseline}", *kept, f"hydra.run.dir={Path(root) / ('baseline_' + baseline)}"]
    return "peftseg train " + " ".join(shlex.quote(w) for w in words)
