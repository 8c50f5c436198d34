"""`peftseg report DIR [--baseline METHOD]`: the tables, CSV, markdown and pictures of a sweep."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from peftseg.report import CSV_NAME, PLOT_NAME, build_report


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
    if args.baseline is not None:
        from peftseg.registry import METHODS
        from peftseg.errors import UserError

        if args.baseline not in METHODS.names():
            import difflib

            close = difflib.get_close_matches(args.baseline, METHODS.names(), n=1)
            raise UserError(f"--baseline {args.baseline} is not a method"
                            f"{f'; did you mean --baseline {close[0]}?' if close else '.'} "
                            f"The methods are: {', '.join(METHODS.names())}.")
    from peftseg.cli.common import console

    # the terminal's width, and at least 100: piped output (CI logs) defaults to 80. The tables fit
    # it, dropping the columns report.md keeps (peftseg.report.tables.group_table)
    build_report(args.dir, args.baseline, Console(width=max(console.width, 100)))
    return 0
