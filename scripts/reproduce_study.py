#!/usr/bin/env python
"""The reference study's grid on Mask DINO or SEEM in one command: one Hydra multirun, then the report.

    .venv/bin/python scripts/reproduce_study.py --dataset coco --weights /path/maskdino_swinl.pth
    .venv/bin/python scripts/reproduce_study.py --model seem_focalt --weights /path/seem_focalt_v1.pt
    .venv/bin/python scripts/reproduce_study.py --smoke        # maskdino_tiny + shapes, minutes on a CPU
    .venv/bin/python scripts/reproduce_study.py --lora-variants --smoke   # LoRA's starts x LoRA+ x ranks

The grid is conf/study/ (one file per setting: full, heads, adapters 1-4 per block at the
study's sites, LoRA r=8 on the deformable attention, and that plus attention), each with
the study's learning rates (1e-4 for pretrained weights, 1e-3 for PEFT modules). It runs as
`peftseg train -m +study=<all of them> model=... dataset=... train=...`, so the launcher,
run records and failure accounting are the CLI's; then `peftseg report <sweep> --baseline
full` prints the table, the CSV and the AP-vs-trainable plot. Any further argument is passed
to `peftseg train` as a Hydra override (e.g. train.max_iter=2000 hydra/launcher=submitit_slurm).

`--lora-variants` runs another grid instead: LoRA r=8 on the backbone's token mixer and MLP
(nn.Linear layers on both families, which every start supports) with each initialisation
(method.init) x AdamW or LoRA+ (train.optimizer) x a uniform rank or rank 16 on the MLP
(method.rank_pattern), at the study's learning rates; with --smoke on maskdino_tiny and
seem_tiny both. Its report has no baseline method (every run is LoRA): compare the rows.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STUDY = sorted(p.stem for p in (ROOT / "conf" / "study").glob("*.yaml"))  # the grid: one file per setting
# CPU-sized: the tiny model on a small shapes split, a few steps each; proves the pipeline
SMOKE = ["dataset=shapes", "train=smoke", "train.max_iter=4",
         "train.warmup_iters=1", "dataset.num_train=8", "dataset.num_val=4"]


# LoRA's variants: every start, AdamW vs LoRA+, a uniform rank vs more rank on the MLP
LORA_INITS = ("default", "gaussian", "pissa", "olora", "orthogonal", "eva", "corda")
LORA_VARIANTS = ["method=lora", "method.targets=[attn_qkv,attn_proj,mlp]", "method.rank=8", "method.alpha=8.0",
                 f"method.init={','.join(LORA_INITS)}", "train.optimizer=adamw,loraplus",
                 "method.rank_pattern=null,{mlp:16}", "train.base_lr=1e-4", "train.peft_lr=1e-3"]
VARIANT_SMOKE_MODELS = ("maskdino_tiny", "seem_tiny")


def overrides(args: argparse.Namespace, extra: list[str]) -> list[str]:
    if args.lora_variants:
        if args.only:
            raise SystemExit("--only picks settings of the study's grid; --lora-variants runs its own grid")
        out = ["-m", *LORA_VARIANTS]
        if args.smoke:
            out += [f"model={','.join(VARIANT_SMOKE_MODELS)}", *SMOKE]
        else:
            out += [f"model={args.model}", f"dataset={args.dataset}", f"train={args.train}"]
        if args.weights:
            out.append(f"model.weights={args.weights}")
        return out + extra
    study = [s for s in STUDY if not args.only or s in args.only]
    if not study:
        raise SystemExit(f"--only names none of the study's settings: {', '.join(STUDY)}")
    out = ["-m", f"+study={','.join(study)}"]
    if args.smoke:
        out += [f"model={args.smoke_model}", *SMOKE]
    else:
        out += [f"model={args.model}", f"dataset={args.dataset}", f"train={args.train}"]
    if args.weights:
        out.append(f"model.weights={args.weights}")
    return out + extra


def parse(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="shapes", help="a dataset option, as `peftseg list` shows them (default: shapes)")
    ap.add_argument("--model", default="maskdino_swin_l",
                    help="a conf/model maskdino or seem preset (e.g. seem_focalt, seem_focall)")
    ap.add_argument("--weights", default="", help="official Mask DINO or SEEM checkpoint (or Swin ImageNet weights)")
    ap.add_argument("--train", default="default", help="a conf/train preset (default: default)")
    ap.add_argument("--only", nargs="*", help=f"a subset of the grid ({', '.join(STUDY)})")
    ap.add_argument("--smoke", action="store_true", help="a tiny model on a small shapes split, a few steps")
    ap.add_argument("--smoke-model", default="maskdino_tiny", help="the --smoke model (maskdino_tiny or seem_tiny)")
    ap.add_argument("--lora-variants", action="store_true",
                    help="LoRA's grid instead: each method.init x train.optimizer adamw|loraplus x uniform rank or "
                         "rank 16 on the MLP (with --smoke: on maskdino_tiny and seem_tiny)")
    return ap.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    args, extra = parse(argv)

    from peftseg import cli
    from peftseg.cli.train import sweep_dir_of, with_sweep_dir

    argv = overrides(args, extra)
    sweep_dir = sweep_dir_of(argv)  # the sweep's folder, named once: the report reads it after
    code = cli.main(["train", *with_sweep_dir(argv, sweep_dir)])
    baseline = [] if args.lora_variants else ["--baseline", "full"]
    report_code = cli.main(["report", str(sweep_dir), *baseline])
    return code or report_code


if __name__ == "__main__":
    sys.exit(main())
