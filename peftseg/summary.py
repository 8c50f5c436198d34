"""The end-of-run console table."""

from __future__ import annotations

from rich.table import Table

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
