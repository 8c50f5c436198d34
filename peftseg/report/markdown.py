"""report.md: the report's tables and pictures as Markdown, to paste into a paper draft or a PR."""

from __future__ import annotations

from pathlib import Path

from peftseg.io.atomic import write_atomic
from peftseg.report.tables import budget_notes


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    numeric = [i for i, h in enumerate(headers) if i > 0 and any(ch.isdigit() for r in rows for ch in r[i][:1])]
    align = ["---:" if i in numeric else "---" for i in range(len(headers))]
    lines = ["| " + " | ".join(_cell(h) for h in headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_report_md(path: Path, sections: list, plot_name: str, footnote: str | None,
                    data_plot: str | None = None) -> Path:
    """sections: (group, headers, rows, curves PNG or None) per model·dataset group."""
    path = Path(path)
    parts = [f"# PEFT report: {path.parent.name}", "",
             "trainable % = trainable / all parameters of the model as run (PEFT modules included); "
             "backbone % = (trainable backbone + PEFT parameters) / backbone parameters. "
             "★ marks the Pareto front (fewest trainable parameters for the mask AP, among the runs of one "
             "training-set size).", ""]
    for group, headers, rows, curves in sections:
        parts += [f"## {group.title}", "", markdown_table(headers, rows), ""]
        for note in (group.baseline_note, group.timing_note, *budget_notes(group)):
            if note:
                parts += [f"> {note}", ""]
        if curves is not None:
            parts += [f"![training curves, {group.title}]({Path(curves).name})", ""]
    if footnote:
        parts += [footnote, ""]
    parts += ["## Mask AP against trainable parameters", "", f"![mask AP vs trainable %]({plot_name})", ""]
    if data_plot:
        parts += ["## Mask AP against training images", "", f"![mask AP vs training images]({data_plot})", ""]
    write_atomic(path, "\n".join(parts).encode())
    return path
