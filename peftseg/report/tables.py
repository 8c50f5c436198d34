"""Tables as text: the end-of-run table, `peftseg eval`'s table, and a report group's rows
(terminal and report.md share them)."""

from __future__ import annotations

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


def group_table(group: Group, baseline: str | None, extras: dict[int, dict], width: int = 160) -> Table:
    """The group's rows for a terminal of `width` columns: method and every number stay whole
    (their columns never shrink below their longest cell); knob values wrap instead, lists at
    their commas. When the knobs have less room than a column each needs, they share one
    column, one `knob=value` per line."""
    headers, rows = group_rows(group, baseline, extras)
    n_knobs = len(group.knobs)
    fixed = [max([len(row[i]) for row in rows] + [len(w) for w in headers[i].split()]) for i in range(len(headers))]
    fixed_width = sum(w + 3 for i, w in enumerate(fixed) if not 1 <= i <= n_knobs) + 1
    room = width - fixed_width
    # each knob column wants its longest single value (a list wraps at its commas) on one line
    wanted = [min(KNOB_WIDTH, max(len(w) for row in rows for w in [*row[i].split(","), *headers[i].split("_")]))
              for i in range(1, n_knobs + 1)]
    if n_knobs and room < sum(w + 3 for w in wanted):
        headers = [headers[0], "knobs", *headers[n_knobs + 1:]]
        rows = [[row[0], "\n".join(f"{h}={v}" for h, v in zip(group_rows(group, baseline, extras)[0][1:n_knobs + 1],
                                                               row[1:n_knobs + 1]) if v not in ("", DASH)),
                 *row[n_knobs + 1:]] for row in rows]
        fixed = [fixed[0], max(KNOB_MIN, room - 3), *fixed[n_knobs + 1:]]
        n_knobs, knob_width = 1, max(KNOB_MIN, room - 3)
    else:
        knob_width = KNOB_WIDTH
    # headers on one line where the table fits so, else broken between words ("trainable %"
    # over two lines); cells never break
    one_line = sum(max(w, len(h)) + 3 for w, h in zip(fixed, headers)) + 1 <= width
    table = Table(title=group.title, title_justify="left")
    for i, name in enumerate(headers):
        if 1 <= i <= n_knobs:
            table.add_column(name, overflow="fold", max_width=knob_width,
                             min_width=wanted[i - 1] if n_knobs == len(wanted) else knob_width)
        else:
            table.add_column(Text(name if one_line else name.replace(" ", "\n")), style="bold" if i == 0 else None,
                             no_wrap=True, min_width=max(fixed[i], len(name)) if one_line else fixed[i],
                             justify="left" if i == 0 or name in ("front", "status") else "right")
    for row in rows:
        status = row[-1]
        # cells are text, not markup: a knob value such as [attn_qkv] must not vanish
        cells = [Text(c.replace(",", ", ") if 1 <= i <= n_knobs else c) for i, c in enumerate(row[:-1])]
        # a pruned (search) or interrupted run stopped on purpose: not a result, not an error
        style = "green" if status == "ok" else "yellow" if status in ("pruned", "interrupted") else "red"
        table.add_row(*cells, Text(status, style=style))
    return table
