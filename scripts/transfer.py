"""Upstream -> downstream transfer at CPU scale, without a model hub.

1. Train a model fully on the `default` shapes domain (circles, squares, triangles).
2. `peftseg merge` its final checkpoint into a plain detectron2 checkpoint: the
   "pretrained weights".
3. Fine-tune each method on the `downstream` domain (pentagons, hexagons, stars; smaller;
   inverted palette) once from those weights and once from random init, and compare
   mask AP — the setting the reference study measures, with learned weights to adapt.

    .venv/bin/python scripts/transfer.py --out transfer_runs
    .venv/bin/python scripts/transfer.py --model swin_tiny --methods full heads lora
    .venv/bin/python scripts/transfer.py --methods side lora-last4:lora:method.blocks=last:4

`--methods` entries are `METHOD` or `LABEL:METHOD:KEY=VALUE[:KEY=VALUE…]` (extra overrides
for that row; runs are stored under the label).

Every step is a real `peftseg` command; each run's results.json stays under --out.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table


def peftseg(*args: str) -> None:
    cmd = [sys.executable, "-m", "peftseg.cli", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")


def record(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def mask_ap(run_dir: Path) -> float:
    return record(run_dir)["metrics"]["segm"]["AP"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("transfer_runs"))
    ap.add_argument("--model", default="vitdet_tiny")
    ap.add_argument("--methods", nargs="+", default=["full", "heads", "lora", "adapter"])
    ap.add_argument("--upstream-iters", type=int, default=1000)
    ap.add_argument("--downstream-iters", type=int, default=300)
    ap.add_argument("--downstream-train", type=int, default=100, help="downstream training images")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    out = args.out.resolve()
    console = Console()

    up = out / "upstream"
    if not (up / "results.json").exists():
        console.print(f"upstream: {args.model} full fine-tuning on shapes/default, {args.upstream_iters} iters")
        peftseg("train", f"model={args.model}", "method=full", f"train.max_iter={args.upstream_iters}",
                 "train.checkpoint_period=0", f"train.seed={args.seed}", f"hydra.run.dir={up}")
    weights = up / "pretrained.pth"
    if not weights.exists():
        peftseg("merge", f"checkpoint={up}", f"output={weights}")
    console.print(f"upstream mask AP on its own domain: {mask_ap(up):.2f}; weights: {weights}")

    from peftseg.cli.variants import parse_entry

    rows = []
    for entry in args.methods:
        label, method, overrides = parse_entry(entry, "--methods")
        aps = {}
        for start, extra in (("pretrained", [f"model.weights={weights}"]), ("scratch", [])):
            run_dir = out / f"{label}_{start}"
            if not (run_dir / "results.json").exists():
                console.print(f"downstream: {label} from {start}")
                peftseg("train", f"model={args.model}", f"method={method}", *overrides, "dataset.domain=downstream",
                        f"dataset.num_train={args.downstream_train}", f"train.max_iter={args.downstream_iters}",
                        "train.checkpoint_period=0", f"train.seed={args.seed}", *extra, f"hydra.run.dir={run_dir}")
            aps[start] = mask_ap(run_dir)
        rec = record(out / f"{label}_pretrained")
        eff = rec["efficiency"]
        rows.append((label, aps["pretrained"], aps["scratch"], 100 * rec["params"]["ratio"],
                     eff["mean_step_time_s"], eff["peak_memory_bytes"]))

    table = Table(title=f"{args.model}: downstream mask AP after {args.downstream_iters} iters "
                        f"(upstream: {args.upstream_iters} iters of full training on another domain)")
    for col in ("method", "trainable %", "from upstream", "from random init", "gain", "step time", "peak RSS"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for label, pre, scratch, trainable, step, peak in rows:
        # trainable share, step time and peak RSS of the run from upstream weights (the record's own numbers;
        # the share is over the whole model as run, the method's modules included)
        table.add_row(label, f"{trainable:.2f}", f"{pre:.2f}", f"{scratch:.2f}", f"{pre - scratch:+.2f}",
                      f"{step * 1000:.0f} ms", f"{peak / 2**20:.0f} MiB")
    console.print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
