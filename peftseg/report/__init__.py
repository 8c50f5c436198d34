"""`peftseg report DIR`: every results.json under DIR as tables (terminal, report.md),
report.csv, pareto.png and training curves.

collect (records, groups, baselines, front) -> tables / csvfile / markdown / plots / curves.
Next to each method the tables show its knobs that vary within the group (rank, targets,
adapters_per_block, …), so the members of a sweep tell apart; report.csv has every
flattened config value and number of every run.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from peftseg.io.output_guard import check_targets, write_errors
from peftseg.report.collect import (baseline_command, baseline_numbers, find_baseline, find_records, group_records,
                                    load_records, timing_note, unmatched_note)
from peftseg.report.csvfile import flat_row, write_csv
from peftseg.report.curves import curves_path, write_group_curves
from peftseg.report.markdown import write_report_md
from peftseg.report.plots import DATA_PLOT_NAME, write_data_efficiency_plot, write_plot
from peftseg.report.tables import DASH, RSS_NOTE, budget_notes, group_rows, group_table, is_rss

CSV_NAME = "report.csv"
PLOT_NAME = "pareto.png"
MD_NAME = "report.md"


def build_report(root: Path, baseline: str | None, console: Console) -> tuple[Path, Path]:
    root = Path(root)
    paths = find_records(root, console) if root.is_dir() else []
    records = load_records(root, console, paths)
    groups = group_records(records)
    # invariant 2 (peftseg.io.output_guard): the report's files are never links, special files, a
    # run's own, nor inside a run it reads (a folder of links to runs gets them beside the links)
    targets = [root / name for name in (CSV_NAME, PLOT_NAME, MD_NAME, DATA_PLOT_NAME)]
    check_targets(targets + [curves_path(root, g) for g in groups], [p.parent for p in paths], what="report file",
                  fix="give `peftseg report` the folder that holds the runs (a sweep, or a folder of links to "
                      f"them), e.g. peftseg report {root.resolve().parent}")
    with write_errors(root):
        return _build(root, records, groups, baseline, console)


def _build(root: Path, records, groups, baseline: str | None, console: Console) -> tuple[Path, Path]:
    rows = []
    sections = []  # (group, headers, rows, curves png or None) for report.md
    for g in groups:
        extras: dict[int, dict] = {}
        if baseline:
            unmatched = []
            for r in g.records:
                base = find_baseline(r, g, baseline)
                extras[id(r)] = baseline_numbers(r, base)
                if base is None and r.ok:
                    unmatched.append(r)
            if not any(r.knob("method.name") == baseline and r.ok for r in g.records):
                g.baseline_note = (
                    f"no successful `{baseline}` run for {g.title}, so ΔAP and the "
                    f"ratios show {DASH}; add one to this folder with: {baseline_command(root, g, baseline)}"
                )
            elif unmatched:
                g.baseline_note = unmatched_note(unmatched, baseline)
            g.timing_note = timing_note(g, extras)
        console.print(group_table(g, baseline, extras, width=console.width))
        for note in (g.baseline_note, g.timing_note):
            if note:
                console.print(f"[yellow]note:[/] {note}", highlight=False)
        for note in budget_notes(g):
            console.print(note, highlight=False)
        if any(is_rss(r) for r in g.records):
            console.print(RSS_NOTE, highlight=False)
        rows += [flat_row(r, extras.get(id(r), {})) for r in g.records]
        sections.append((g, *group_rows(g, baseline, extras), write_group_curves(root, g)))
    csv_path, plot_path = root / CSV_NAME, root / PLOT_NAME
    write_csv(csv_path, rows)
    write_plot(plot_path, groups)
    data_plot = write_data_efficiency_plot(root / DATA_PLOT_NAME, groups)
    if data_plot:
        console.print(f"wrote {root / DATA_PLOT_NAME}: mask AP against training images", highlight=False)
    write_report_md(root / MD_NAME, sections, PLOT_NAME, RSS_NOTE if any(is_rss(r) for r in records) else None,
                    DATA_PLOT_NAME if data_plot else None)
    failed = sum(not r.ok for r in records)
    console.print(f"{len(records)} runs ({failed} not ok) in {len(groups)} model·data group(s); "
                  f"wrote {csv_path}, {plot_path} and {root / MD_NAME}", highlight=False)
    return csv_path, plot_path
