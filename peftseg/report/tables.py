"""Tables as text: the end-of-run table, `peftseg eval`'s table, and a report group's rows
(terminal and report.md share them)."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table
from rich.text import Text

from peftseg.report.collect import DASH, Group, front_ids, knob_text
from peftseg.results import Record



def fmt_count(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"


def fmt_num(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def run_table(record: Record) -> Table:
    params = record.params or {}
    eff = record.eff
    title = (f"{record.knob('model.name')} · {record.knob('method.name')} · "
             f"{record.knob('dataset.name')} · {record.status}")
    # One row per number: readable at any terminal width (and in CI logs).
    table = Table(title=title, show_header=False)
    columns = {
        "total params": fmt_count(params.get("total")),
        "trainable": fmt_count(params.get("trainable")),
        "trainable %": fmt_num(100 * record.trainable_ratio, ".3f") if record.trainable_ratio is not None else "-",
        "mask AP": fmt_num(record.mask_ap),
        "box AP": fmt_num(record.box_ap),
        "peak mem": fmt_bytes(eff("peak_memory_bytes")),
        "step time": f"{fmt_num(eff('mean_step_time_s'), '.3f')} s",
        "train time": f"{fmt_num(eff('train_wall_time_s'), '.1f')} s",
        "wall time": f"{fmt_num(eff('run_wall_time_s'), '.1f')} s",
    }
    table.add_column("what", style="bold")
    table.add_column("value", justify="right")
    for name, value in columns.items():
        table.add_row(name, value)
    add_group_rows(table, params)
    return table


def add_group_rows(table: Table, params: dict) -> None:
    """Trainable / total per accounting group; the ratio's denominator is the whole model
    as run, PEFT modules included."""
    groups = params.get("by_group") or {}
    if not groups:
        return
    table.add_section()
    for group, counts in groups.items():
        if counts["total"]:
            table.add_row(f"  {group}", f"{fmt_count(counts['trainable'])} / {fmt_count(counts['total'])}")
    table.caption = "trainable % is over the whole model as run, PEFT modules included"


def eval_table(record: dict) -> Table:
    """`peftseg eval`'s table: the checkpoint's AP on the evaluated dataset."""
    params = record["params"]
    table = Table(title=f"{record['checkpoint']} on {record['dataset']}", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value", justify="right")
    for task, label in (("segm", "mask"), ("bbox", "box")):
        for key in ("AP", "AP50", "AP75"):
            table.add_row(f"{label} {key}", fmt_num((record["metrics"].get(task) or {}).get(key)))
    table.add_row("trainable %", fmt_num(100 * params["ratio"], ".3f"))
    add_group_rows(table, params)
    return table


def knob_header(key: str) -> str:
    # the last component is what tells columns apart (rank, targets, weights, domain);
    # keep the group only where two knobs would otherwise share a header
    return key.removeprefix("method.") if key.startswith("method.") else key.rsplit(".", 1)[-1]


def or_dash(text: str) -> str:
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


def budget_notes(group: Group) -> list[str]:
    """One line per run that reallocated a rank budget (method=adalora): the total rank over its
    adapted layers at the start and at the end, against the target the schedule aimed at."""
    notes = []
    for r in group.records:
        b = r.rank_budget
        if not b:
            continue
        notes.append(f"AdaLoRA budget of {Path(r.run.dir).name}: initial total rank {b.get('initial_total')} → "
                     f"final {b.get('final_total')} (target {b.get('target_total')}) over "
                     f"{len(b.get('final') or {})} layers")
    return notes


def is_rss(record: Record) -> bool:
    return str(record.eff("peak_memory_kind") or "").endswith("rss")


def group_rows(group: Group, baseline: str | None, extras: dict[int, dict]) -> tuple[list[str], list[list[str]]]:
    """The group's table as plain text: headers and one row per run (terminal and report.md)."""
    headers = ["method", *(knob_header(k) for k in group.knobs),
               "trainable %", "backbone %", "mask AP", "box AP", "peak mem", "step time", "ckpt size"]
    if baseline:
        headers += ["ΔAP", "time ×", "mem ×"]
    front = front_ids(group)
    if front:
        headers.append("front")
    headers.append("status")
    rows = []
    for r in group.records:
        row = [str(r.knob("method.name"))]
        row += [knob_text(r.knob(k)) if k in r.config else "" for k in group.knobs]
        rt, bb = r.trainable_ratio, backbone_pct(r)
        step = r.eff("mean_step_time_s")
        mark = RSS_MARK if is_rss(r) else ""
        mem = or_dash(fmt_bytes(r.eff("peak_memory_bytes")))
        row += [
            DASH if rt is None else fmt_num(100 * rt, ".3f"),
            DASH if bb is None else fmt_num(bb, ".3f"),
            or_dash(fmt_num(r.mask_ap)),
            or_dash(fmt_num(r.box_ap)),
            mem + mark if mem != DASH else mem,
            DASH if step is None else f"{step:.3f} s",
            or_dash(fmt_bytes(r.eff("checkpoint_bytes"))),
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


KNOB_WIDTH = 18  # a knob column wraps its values at this width; CSV and report.md keep them whole
KNOB_MIN = 8
KNOB_ROOM = 20  # narrower than this, the knobs column makes room by dropping a DROPPABLE column

# columns a narrow terminal does without, first to last (report.md and report.csv keep them): the
# ratios follow from the baseline's own row, backbone % from the group counts in report.csv
DROPPABLE = ("ckpt size", "backbone %", "mem ×", "time ×", "box AP", "step time")

# short names of knobs in the one "knobs" column of a narrow table; the table's caption spells out
# the ones it uses. Keyed by a knob header's last part (lora.rank in adapter_lora: lora.r)
SHORT_KNOBS = {
    "rank": "r", "targets": "tgt", "adapters_per_block": "per_block", "bottleneck": "dim", "image_size": "px",
    "dropout": "drop", "module_dropout": "mod_drop", "rank_dropout": "r_drop", "activation": "act",
    "reduction": "red", "feedforward": "ff", "use_dora": "dora", "use_rslora": "rslora",
    "decompose_both": "both", "decompose_factor": "factor", "train_subset": "imgs", "base_lr": "lr",
    "ims_per_batch": "batch", "max_iter": "iters", "train_task_layers": "task_layers",
}


def short_knob(header: str) -> str:
    group, dot, last = header.rpartition(".")
    return group + dot + SHORT_KNOBS.get(last, last)


def _width(headers: list[str], rows: list[list[str]], i: int) -> int:
    """Column i's width with its header broken between words: its longest cell or word."""
    return max([len(row[i]) for row in rows] + [len(w) for w in headers[i].split()])


def group_table(group: Group, baseline: str | None, extras: dict[int, dict], width: int = 160) -> Table:
    """The group's rows for a terminal of `width` columns: method and every number stay whole
    (their columns never shrink below their longest cell). Where every knob can have a column
    of its own, it does, its values wrapping (lists at their commas). Otherwise the knobs share
    one column, `r=8 tgt=attn_qkv` with short names; the front's ★ goes beside the status; and
    while that column has less than KNOB_ROOM, the DROPPABLE columns go, first to last. The
    caption says what the short names stand for and which columns are left to report.md."""
    headers, rows = group_rows(group, baseline, extras)
    n_knobs = len(group.knobs)
    fixed = [_width(headers, rows, i) for i in range(len(headers))]
    fixed_width = sum(w + 3 for i, w in enumerate(fixed) if not 1 <= i <= n_knobs) + 1
    # each knob column wants its longest single value (a list wraps at its commas) on one line
    wanted = [min(KNOB_WIDTH, max(len(w) for row in rows for w in [*row[i].split(","), *headers[i].split("_")]))
              for i in range(1, n_knobs + 1)]
    if n_knobs and width - fixed_width < sum(w + 3 for w in wanted):
        return _narrow_table(group, headers, rows, n_knobs, width)
    return _table(group.title, headers, rows, fixed, range(1, n_knobs + 1), wanted, KNOB_WIDTH, width)


def _narrow_table(group: Group, headers: list[str], rows: list[list[str]], n_knobs: int, width: int) -> Table:
    knob_headers = headers[1:n_knobs + 1]
    shorts = [short_knob(h) for h in knob_headers]
    knobs = [" ".join(f"{s}={v}" for s, v in zip(shorts, row[1:n_knobs + 1]) if v not in ("", DASH))
             for row in rows]
    headers = [headers[0], *(["knobs"] if n_knobs else []), *headers[n_knobs + 1:]]
    rows = [[row[0], *([k] if n_knobs else []), *row[n_knobs + 1:]] for row, k in zip(rows, knobs)]
    notes = []
    if "front" in headers:  # the front's mark beside the status: ★ ok
        at = headers.index("front")
        rows = [[*row[:at], *row[at + 1:-1], f"{row[at]} {row[-1]}" if row[at] else row[-1]] for row in rows]
        del headers[at]
        notes.append("★ on the Pareto front (trainable % vs mask AP)")
    k = 1 if n_knobs else None  # the knobs column

    def room() -> int:  # what the knobs column has beside the others (for no knobs: what is left)
        return width - 1 - sum(_width(headers, rows, i) + 3 for i in range(len(headers)) if i != k) - (3 if k else 0)

    dropped = []
    for name in DROPPABLE:
        if room() >= (KNOB_ROOM if k else 0):
            break
        if name in headers:
            at = headers.index(name)
            headers, rows = headers[:at] + headers[at + 1:], [row[:at] + row[at + 1:] for row in rows]
            dropped.append(name)
    fixed = [_width(headers, rows, i) for i in range(len(headers))]
    knob_width = max(KNOB_MIN, min(room(), max(len(row[1]) for row in rows))) if k else 0
    used = [f"{s} = {h}" for s, h in dict(zip(shorts, knob_headers)).items() if s != h]
    if used:
        notes.insert(0, "knobs: " + ", ".join(used))
    if dropped:
        notes.append(f"{', '.join(dropped)}: in report.md and report.csv (a wider terminal shows them too)")
    table = _table(group.title, headers, rows, fixed, [k] if k else [], [knob_width], knob_width, width)
    table.caption = "; ".join(notes) or None
    table.caption_justify = "left"
    return table


def _table(title: str, headers: list[str], rows: list[list[str]], fixed: list[int], knob_columns, wanted: list[int],
           knob_width: int, width: int) -> Table:
    knob_columns = list(knob_columns)
    # headers on one line where the table fits so, else broken between words ("trainable %"
    # over two lines); cells never break
    one_line = sum(max(w, len(h)) + 3 for w, h in zip(fixed, headers)) + 1 <= width
    table = Table(title=title, title_justify="left")
    for i, name in enumerate(headers):
        if i in knob_columns:
            table.add_column(name, overflow="fold", max_width=knob_width,
                             min_width=wanted[knob_columns.index(i)] if len(wanted) == len(knob_columns) else knob_width)
        else:
            table.add_column(Text(name if one_line else name.replace(" ", "\n")), style="bold" if i == 0 else None,
                             no_wrap=True, min_width=max(fixed[i], len(name)) if one_line else fixed[i],
                             justify="left" if i == 0 or name in ("front", "status") else "right")
    for row in rows:
        status = row[-1].removeprefix("★ ")
        # cells are text, not markup: a knob value such as [attn_qkv] must not vanish
        cells = [Text(c.replace(",", ", ") if i in knob_columns else c) for i, c in enumerate(row[:-1])]
        # a pruned (search) or interrupted run stopped on purpose: not a result, not an error
        style = "green" if status == "ok" else "yellow" if status in ("pruned", "interrupted") else "red"
        table.add_row(*cells, Text(row[-1], style=style))
    return table
