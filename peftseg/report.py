"""`peftseg report DIR`: every results.json under DIR as one table, report.csv and pareto.png.

Rows are grouped by model and dataset, since AP is only comparable within one of those.
Next to each method the table shows its knobs that vary within the group (rank, targets,
adapters_per_block, …), so the members of a sweep tell apart; report.csv has every
flattened config value and number of every run.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from peftseg.errors import UserError
from peftseg.registry import METHODS
from peftseg.results import FILENAME, Record, read_record, write_atomic
from peftseg.summary import fmt_bytes, fmt_num

CSV_NAME = "report.csv"
PLOT_NAME = "pareto.png"
MD_NAME = "report.md"
DASH = "—"
CONFIG_GROUPS = ("model", "method", "dataset", "train")


@dataclass
class Group:
    model: str
    dataset: str
    records: list[Record] = field(default_factory=list)
    knobs: list[str] = field(default_factory=list)  # config keys shown as columns
    baseline_note: str | None = None


def load_records(root: Path, console: Console | None = None) -> list[Record]:
    root = Path(root)
    if not root.is_dir():
        raise UserError(
            f"{root} is not a directory. Give `peftseg report` the folder of a sweep or of runs "
            "(e.g. peftseg report multirun/2024-05-01/12-00-00); it reads every results.json under it."
        )
    paths = sorted(root.rglob(FILENAME))
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
        records.append(record)
    if not records:
        raise UserError(f"None of the {len(paths)} {FILENAME} files under {root} could be read; "
                        "see the messages above, and re-run the runs they belong to.")
    return records


# --- reading numbers out of a record ----------------------------------------------------

def cfg(record: Record, key: str):
    return record.knob(key)


def mask_ap(record: Record) -> float | None:
    return record.mask_ap


def box_ap(record: Record) -> float | None:
    return record.box_ap


def ratio(record: Record) -> float | None:
    return record.trainable_ratio


def eff(record: Record, key: str):
    return record.eff(key)


def _hashable(value) -> str:
    return json.dumps(value, sort_keys=True)


def _sort_value(value):
    # Numbers sort numerically (ranks 4 < 8 < 16), everything else by its text.
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, value, "")
    return (1, 0, _hashable(value))


# --- grouping and knobs -----------------------------------------------------------------

def varying_knobs(records: list[Record]) -> list[str]:
    """Config keys worth a column: a method's keys that differ among that method's runs,
    and other (non-name) keys that differ across the group."""
    keys: list[str] = []
    by_method: dict[str, list[Record]] = {}
    for r in records:
        by_method.setdefault(cfg(r, "method.name"), []).append(r)
    for runs in by_method.values():
        for key in dict.fromkeys(k for r in runs for k in r.config):
            if key.startswith("method.") and key != "method.name" and key not in keys:
                if len({_hashable(cfg(r, key)) for r in runs}) > 1:
                    keys.append(key)
    for key in dict.fromkeys(k for r in records for k in r.config):
        if key.startswith("method.") or key.endswith(".name") or key in keys:
            continue
        if len({_hashable(cfg(r, key)) for r in records}) > 1:
            keys.append(key)
    return keys


def _method_rank(name) -> tuple:
    # the registry's order: baselines first, then methods by their usual footprint; a name
    # this install does not know (a record from a newer peftseg) goes last
    order = METHODS.names()
    return (order.index(name), "") if name in order else (len(order), str(name))


def group_records(records: list[Record]) -> list[Group]:
    groups: dict[tuple[str, str], Group] = {}
    for r in records:
        model, dataset = str(cfg(r, "model.name")), str(cfg(r, "dataset.name"))
        groups.setdefault((model, dataset), Group(model, dataset)).records.append(r)
    for g in groups.values():
        g.knobs = varying_knobs(g.records)
        g.records.sort(key=lambda r: (
            _method_rank(cfg(r, "method.name")),
            [_sort_value(cfg(r, k)) for k in g.knobs],
            str(r.run.id),
        ))
    return [groups[k] for k in sorted(groups)]


# --- baseline ---------------------------------------------------------------------------

def find_baseline(record: Record, group: Group, method: str) -> Record | None:
    """The group's ok `method` run closest in config to `record` (most equal config values)."""
    candidates = [r for r in group.records
                  if cfg(r, "method.name") == method and r.ok and mask_ap(r) is not None]
    if not candidates:
        return None
    own = record.config

    def shared(r):
        other = r.config
        return sum(_hashable(other.get(k)) == _hashable(v) for k, v in own.items() if not k.startswith("method."))

    return max(candidates, key=shared)  # max keeps the first (sorted) one on ties


def _ratio_of(a, b) -> float | None:
    if a is None or b is None or not b:
        return None
    return a / b


def baseline_numbers(record: Record, base: Record | None) -> dict:
    if base is None or not record.ok:
        return {}
    same_mem = eff(record, "peak_memory_kind") == eff(base, "peak_memory_kind")
    ap, base_ap = mask_ap(record), mask_ap(base)
    return {
        "baseline.run_id": base.run.id,
        "baseline.delta_mask_AP": None if ap is None or base_ap is None else ap - base_ap,
        "baseline.step_time_ratio": _ratio_of(eff(record, "mean_step_time_s"), eff(base, "mean_step_time_s")),
        "baseline.peak_memory_ratio": _ratio_of(eff(record, "peak_memory_bytes"), eff(base, "peak_memory_bytes"))
        if same_mem else None,
    }


# --- table ------------------------------------------------------------------------------

def _knob_text(value) -> str:
    if value is None:
        return DASH
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    if isinstance(value, str) and "/" in value:
        return Path(value).name  # a weights path: its file name tells runs apart
    return str(value)


def _knob_header(key: str) -> str:
    # the last component is what tells columns apart (rank, targets, weights, domain);
    # keep the group only where two knobs would otherwise share a header
    return key.removeprefix("method.") if key.startswith("method.") else key.rsplit(".", 1)[-1]


def _or_dash(text: str) -> str:
    return DASH if text in ("-", "- s") else text


# Peak RSS (CPU runs) measures the whole process (framework, data, allocator caches): it
# does not follow the model's tensors, so its ratios between methods mislead. Marked, not hidden.
RSS_MARK = "†"
RSS_NOTE = (f"{RSS_MARK} peak memory of a CPU run is the process's peak RSS (framework and data included), "
            "not comparable between methods; CUDA runs report the allocator's tensor peak.")


def backbone_pct(record: Record) -> float | None:
    """(trainable backbone + PEFT parameters) / backbone parameters, in %: the ratio PEFT papers
    quote ("LoRA tunes 1% of ViT-B"), since heads and neck train under every method."""
    groups = (record.params or {}).get("by_group") or {}
    backbone = (groups.get("backbone") or {}).get("total")
    if not backbone:
        return None
    tuned = (groups.get("backbone") or {}).get("trainable", 0) + (groups.get("peft") or {}).get("trainable", 0)
    return 100 * tuned / backbone


def front_ids(group: Group) -> set[int]:
    """id() of the group's runs on the Pareto front of trainable % (lower) vs mask AP (higher)."""
    runs = [r for r in group.records if _plottable(r)]
    if len(runs) < 2:
        return set()
    return {id(runs[i]) for i in pareto_front([(ratio(r), mask_ap(r)) for r in runs])}


def _is_rss(record: Record) -> bool:
    return str(eff(record, "peak_memory_kind") or "").endswith("rss")


def group_rows(group: Group, baseline: str | None, extras: dict[int, dict]) -> tuple[list[str], list[list[str]]]:
    """The group's table as plain text: headers and one row per run (terminal and report.md)."""
    headers = ["method", *(_knob_header(k) for k in group.knobs),
               "trainable %", "backbone %", "mask AP", "box AP", "peak mem", "step time", "ckpt size"]
    if baseline:
        headers += ["ΔAP", "time ×", "mem ×"]
    front = front_ids(group)
    if front:
        headers.append("front")
    headers.append("status")
    rows = []
    for r in group.records:
        row = [str(cfg(r, "method.name"))]
        row += [_knob_text(cfg(r, k)) if k in r.config else "" for k in group.knobs]
        rt, bb = ratio(r), backbone_pct(r)
        step = eff(r, "mean_step_time_s")
        mark = RSS_MARK if _is_rss(r) else ""
        mem = _or_dash(fmt_bytes(eff(r, "peak_memory_bytes")))
        row += [
            DASH if rt is None else fmt_num(100 * rt, ".3f"),
            DASH if bb is None else fmt_num(bb, ".3f"),
            _or_dash(fmt_num(mask_ap(r))),
            _or_dash(fmt_num(box_ap(r))),
            mem + mark if mem != DASH else mem,
            DASH if step is None else f"{step:.3f} s",
            _or_dash(fmt_bytes(eff(r, "checkpoint_bytes"))),
        ]
        if baseline:
            b = extras.get(id(r), {})
            d = b.get("baseline.delta_mask_AP")
            row += [
                DASH if d is None else f"{d:+.2f}",
                DASH if b.get("baseline.step_time_ratio") is None else f"{b['baseline.step_time_ratio']:.2f}×",
                DASH if b.get("baseline.peak_memory_ratio") is None else f"{b['baseline.peak_memory_ratio']:.2f}×{mark}",
            ]
        if front:
            row.append("★" if id(r) in front else "")
        row.append(str(r.status))
        rows.append(row)
    return headers, rows


def group_table(group: Group, baseline: str | None, extras: dict[int, dict]) -> Table:
    headers, rows = group_rows(group, baseline, extras)
    table = Table(title=f"{group.model} · {group.dataset}", title_justify="left")
    n_knobs = len(group.knobs)
    for i, name in enumerate(headers):
        if i == 0:
            table.add_column(name, style="bold", no_wrap=True)
        elif i <= n_knobs:  # knobs may be cut short (…); numbers never wrap
            table.add_column(name, overflow="ellipsis", no_wrap=True)
        elif name in ("front", "status"):
            table.add_column(name, no_wrap=True)
        else:
            table.add_column(name, justify="right", no_wrap=True)
    for row in rows:
        status = row[-1]
        # cells are text, not markup: a knob value such as [attn_qkv] must not vanish
        cells = [Text(c) for c in row[:-1]]
        # a pruned (search) or interrupted run stopped on purpose: not a result, not an error
        style = "green" if status == "ok" else "yellow" if status in ("pruned", "interrupted") else "red"
        table.add_row(*cells, Text(status, style=style))
    return table


# --- CSV ----------------------------------------------------------------------------------

def _flatten(prefix: str, value, out: dict) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = value


def flat_row(record: Record, extra: dict) -> dict:
    row: dict = {"run.id": record.run.id, "status": record.status}
    row.update(record.config)  # already flat: model.*, method.*, …
    for section in ("params", "metrics", "efficiency", "run", "versions"):
        _flatten(section, getattr(record, section) or {}, row)
    error = record.error or {}
    row["error.type"], row["error.message"] = error.get("type"), error.get("message")
    row.update(extra)
    return row


def _column_rank(key: str) -> int:
    order = ("run.id", "status", "model.name", "dataset.name", "method.name", "model.", "method.",
             "dataset.", "train.", "params.", "metrics.", "efficiency.", "baseline.", "run.", "versions.",
             "error.")
    for i, prefix in enumerate(order):
        if key == prefix or (prefix.endswith(".") and key.startswith(prefix)):
            return i
    return len(order)


def _csv_value(value):
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    if isinstance(value, float) and not math.isfinite(value):
        return ""
    return value


def write_csv(path: Path, rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for row in rows for k in row))
    keys.sort(key=_column_rank)  # stable: first-seen order within a section
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, restval="", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_value(v) for k, v in row.items()})
    write_atomic(path, buf.getvalue().encode())


# --- plot ---------------------------------------------------------------------------------

def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats: the best AP at that trainable % or less."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def _plottable(r: Record) -> bool:
    ap, rt = mask_ap(r), ratio(r)
    return r.ok and ap is not None and math.isfinite(ap) and rt is not None and rt > 0


# One colour per method in every picture (pareto.png, curves), whatever the sweep holds;
# methods outside this list get a stable colour from their name.
METHOD_COLOURS = {
    "full": "#1f77b4", "heads": "#ff7f0e", "bitfit": "#2ca02c", "adapter": "#d62728", "lora": "#9467bd",
    "loha": "#8c564b", "lokr": "#e377c2", "ia3": "#7f7f7f", "adapter_lora": "#bcbd22",
}
_SPARE = ("#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173")


def method_colour(method: str) -> str:
    if method in METHOD_COLOURS:
        return METHOD_COLOURS[method]
    return _SPARE[sum(map(ord, str(method))) % len(_SPARE)]  # not hash(): that changes per process


def readable_x_axis(ax, xs: list[float]) -> None:
    """Log scale only where the runs span a decade or more; plain numbers as tick labels.

    matplotlib's log ticks label a narrow range (67.4 … 67.5 %) with minor ticks such as
    "6.74×10¹" that overlap into a smear."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter

    lo, hi = min(xs), max(xs)
    if hi / lo >= 10:
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    else:
        pad = (hi - lo) * 0.15 or max(abs(hi) * 0.01, 1e-3)
        ax.set_xlim(lo - pad, hi + pad)
        ax.xaxis.set_major_locator(MaxNLocator(5))
        ax.xaxis.set_major_formatter(_plain_formatter())


def _plain_formatter():
    """Fixed-point tick labels with as many decimals as the spacing needs: no offset or
    "×10ⁿ" text, which sits apart from the ticks and is easy to misread."""
    from matplotlib.ticker import ScalarFormatter

    formatter = ScalarFormatter(useOffset=False)
    formatter.set_scientific(False)
    return formatter


def write_plot(path: Path, groups: list[Group]) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display here or on a cluster node
    import matplotlib.pyplot as plt

    methods = sorted({str(cfg(r, "method.name")) for g in groups for r in g.records}, key=_method_rank)
    n = len(groups)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4.5 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    for ax, g in zip(axes.flat, groups):
        runs = [r for r in g.records if _plottable(r)]
        ax.set_title(f"{g.model} · {g.dataset}")
        ax.set_xlabel("trainable parameters (% of the model)")
        ax.set_ylabel("mask AP")
        ax.grid(True, which="both", alpha=0.3)
        if not runs:
            ax.text(0.5, 0.5, "no successful run to plot", ha="center", va="center", transform=ax.transAxes)
            continue
        points = [(100 * ratio(r), mask_ap(r)) for r in runs]
        readable_x_axis(ax, [x for x, _ in points])
        ax.yaxis.set_major_formatter(_plain_formatter())  # no "1e-5" offset text above the axis
        for m in methods:
            xs = [p for p, r in zip(points, runs) if str(cfg(r, "method.name")) == m]
            if xs:
                ax.scatter([x for x, _ in xs], [y for _, y in xs], color=method_colour(m), label=m, zorder=3)
        front_idx = pareto_front(points)
        for i in front_idx:
            # only the front's points get a label (the others are in the table and report.md:
            # labels of neighbouring runs at similar AP overlapped into one smear), and only
            # the method's own knobs, so long labels do not squeeze the axes
            r = runs[i]
            label = " ".join(f"{_knob_header(k)}={_knob_text(cfg(r, k))}" for k in g.knobs
                             if k.startswith("method.") and k in r.config)[:40]
            if label:
                ax.annotate(label, points[i], textcoords="offset points", xytext=(6, -12), fontsize=7)
        front = [points[i] for i in front_idx]
        ax.step([x for x, _ in front], [y for _, y in front], where="post", color="black",
                linestyle="--", linewidth=1, zorder=2, label="Pareto front")
        ax.scatter([x for x, _ in front], [y for _, y in front], s=160, facecolors="none",
                   edgecolors="black", zorder=4)
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    write_atomic(path, buf.getvalue())


# --- training curves and the baseline hint -----------------------------------------------

def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)


def write_group_curves(root: Path, group: Group) -> Path | None:
    """curves_<model>_<dataset>.png under root: loss and lr of every run of the group."""
    from peftseg.curves import write_curves_png

    runs = []
    for r in group.records:
        label = " ".join([str(cfg(r, "method.name"))] + [f"{_knob_header(k)}={_knob_text(cfg(r, k))}"
                                                        for k in group.knobs if k in r.config])
        runs.append((label[:50], str(cfg(r, "method.name")), Path(r.run.dir or "")))
    path = Path(root) / f"curves_{_slug(group.model)}_{_slug(group.dataset)}.png"
    return path if write_curves_png(path, f"{group.model} · {group.dataset}", runs, method_colour) else None


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


# --- command ------------------------------------------------------------------------------

def build_report(root: Path, baseline: str | None, console: Console) -> tuple[Path, Path]:
    root = Path(root)
    records = load_records(root, console)
    groups = group_records(records)
    rows = []
    sections = []  # (group, headers, rows, curves png or None) for report.md
    for g in groups:
        extras: dict[int, dict] = {}
        if baseline:
            for r in g.records:
                base = find_baseline(r, g, baseline)
                extras[id(r)] = baseline_numbers(r, base)
            if not any(cfg(r, "method.name") == baseline and r.ok for r in g.records):
                g.baseline_note = (
                    f"no successful `{baseline}` run for {g.model} · {g.dataset}, so ΔAP and the "
                    f"ratios show {DASH}; add one to this folder with: {baseline_command(root, g, baseline)}"
                )
        console.print(group_table(g, baseline, extras))
        if g.baseline_note:
            console.print(f"[yellow]note:[/] {g.baseline_note}", highlight=False)
        if any(_is_rss(r) for r in g.records):
            console.print(RSS_NOTE, highlight=False)
        rows += [flat_row(r, extras.get(id(r), {})) for r in g.records]
        sections.append((g, *group_rows(g, baseline, extras), write_group_curves(root, g)))
    csv_path, plot_path = root / CSV_NAME, root / PLOT_NAME
    write_csv(csv_path, rows)
    write_plot(plot_path, groups)
    from peftseg.report_md import write_report_md

    write_report_md(root / MD_NAME, sections, PLOT_NAME, RSS_NOTE if any(_is_rss(r) for r in records) else None)
    failed = sum(not r.ok for r in records)
    console.print(f"{len(records)} runs ({failed} not ok) in {len(groups)} model·dataset group(s); "
                  f"wrote {csv_path}, {plot_path} and {root / MD_NAME}", highlight=False)
    return csv_path, plot_path


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="peftseg report",
        description="Aggregate every results.json under DIR: a table per model and dataset, "
                    f"DIR/{CSV_NAME} (one row per run) and DIR/{PLOT_NAME} (mask AP vs trainable %).",
    )
    parser.add_argument("dir", type=Path, help="a sweep folder (multirun/<date>/<time>) or any folder of runs")
    parser.add_argument("--baseline", metavar="METHOD",
                        help="add ΔAP and step-time / peak-memory ratios against this method's run "
                             "of the same model and dataset (e.g. --baseline full)")
    args = parser.parse_args(argv)
    # at least 160 columns: piped output (CI logs) defaults to 80, too narrow for the table
    console = Console()
    build_report(args.dir, args.baseline, Console(width=max(console.width, 160)))
    return 0
