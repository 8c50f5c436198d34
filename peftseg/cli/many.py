"""What `peftseg predict` and `peftseg eval` share when given several checkpoints
(checkpoint=[runA,runB,…]: task variants on one frozen base, peftseg.checkpoint.variants)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from peftseg.cli.variants import split_entries
from peftseg.errors import UserError


def checkpoint_list(value: str | None) -> list[str] | None:
    """The checkpoints of `checkpoint=[a,b,…]`; None for a single checkpoint (no brackets)."""
    if value is None or not value.strip().startswith("["):
        return None
    inner = value.strip()
    if not inner.endswith("]"):
        raise UserError(f"checkpoint={value} opens a list but does not close it; write checkpoint=[runA,runB].")
    entries = split_entries(inner[1:-1])
    if not entries:
        raise UserError("checkpoint=[] lists no checkpoint; give run directories, e.g. checkpoint=[runA,runB].")
    return entries


def print_memory(console: Console, vset) -> dict:
    """Resident tensor bytes: the base once + each variant's delta, next to N separate models."""
    from peftseg.report.tables import fmt_bytes

    mem = vset.memory()
    table = Table(title=f"memory of {len(vset.variants)} variants on one base (tensor bytes)")
    for col in ("part", "shared base + deltas", "as a separate model"):
        table.add_column(col, justify="left" if col == "part" else "right")
    table.add_row("base (once)", fmt_bytes(mem["base"]), "")
    for v in vset.variants:
        table.add_row(f"+ {v.name} ({v.cfg.method.name})", fmt_bytes(mem["variants"][v.name]),
                      fmt_bytes(mem["separate"][v.name]))
    table.add_row("total", fmt_bytes(mem["shared_total"]), fmt_bytes(mem["separate_total"]), style="bold")
    console.print(table)
    return mem
