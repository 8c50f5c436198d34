"""Trainable-parameter table of a model preset across methods, as `peftseg train` builds them.

    .venv/bin/python scripts/param_table.py --model vitdet_b
    .venv/bin/python scripts/param_table.py --model swin_t --markdown
    .venv/bin/python scripts/param_table.py --model swin_t --json docs/benchmarks/params_swin_t.json

Each row is a list of Hydra overrides composed over conf/ (exactly the CLI's config),
then build_model + apply_method + count_parameters. No data or training needed;
num_classes defaults to COCO's 80.
"""

from __future__ import annotations

import argparse
import sys
import warnings

warnings.filterwarnings("ignore")

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from peftseg.config import CONF_DIR, compose_config  # noqa: E402
from peftseg.build import build_for_run  # noqa: E402
from peftseg.params import count_parameters  # noqa: E402
from peftseg.report.tables import fmt_count  # noqa: E402


# (label, overrides): the settings the reference study compares
ROWS = [
    ("full", ["method=full"]),
    ("heads", ["method=heads"]),
    ("bitfit", ["method=bitfit"]),
    ("lora r=8 attn_qkv+attn_proj", ["method=lora", "method.rank=8", "method.targets=[attn_qkv,attn_proj]"]),
    ("lora r=8 all block linears", ["method=lora", "method.rank=8", "method.targets=[attn_qkv,attn_proj,mlp]"]),
    ("adapter 1/block", ["method=adapter", "method.adapters_per_block=1"]),
    ("adapter 2/block", ["method=adapter", "method.adapters_per_block=2"]),
    ("adapter 3/block", ["method=adapter", "method.adapters_per_block=3"]),
    ("mona", ["method=mona"]),
]
# rows only a family with those target groups has
FAMILY_ROWS = {
    "mask2former": [
        ("lora r=8 deform_attn", ["method=lora", "method.targets=[deform_attn]"]),
        ("lora r=8 sampling_offsets+value_proj",
         ["method=lora", "method.targets=[deform_sampling_offsets,deform_value_proj]"]),
        ("lora r=8 decoder_attn", ["method=lora", "method.targets=[decoder_attn]"]),
    ],
    # the reference study's settings: adapters only at its sites (after the encoder's deformable
    # self-attention and the decoder's self- and deformable cross-attention), LoRA r=8 alpha=8
    "maskdino": [
        *[(f"adapter {n}/block (study sites)", ["method=adapter", f"method.adapters_per_block={n}",
                                                "method.sites=[attn]"]) for n in (1, 2, 3, 4)],
        ("lora r=8 sampling_offsets+value_proj (enc+dec)",
         ["method=lora", "method.targets=[sampling_offsets,value_proj]"]),
        ("lora r=8 deform enc+dec (all 4 projections)",
         ["method=lora", "method.targets=[deform_attn,decoder_deform_attn]"]),
        ("lora r=8 deform enc+dec + decoder self-attn + backbone attn",
         ["method=lora", "method.targets=[deform_attn,decoder_deform_attn,decoder_self_attn,attn_qkv,attn_proj]"]),
    ],
    # SEEM: the same study placements (adapters after the decoder's self- and cross-attention and
    # the pixel decoder's self-attention; LoRA on those nn.MultiheadAttention modules); the frozen
    # text encoder counts in `total` and never in `trainable`, `full` included
    "seem": [
        *[(f"adapter {n}/block (study sites)", ["method=adapter", f"method.adapters_per_block={n}",
                                                "method.sites=[attn]"]) for n in (1, 2, 3, 4)],
        ("lora r=8 decoder attn (self+cross)", ["method=lora", "method.targets=[decoder_attn]"]),
        ("lora r=8 decoder + pixel-decoder attn",
         ["method=lora", "method.targets=[decoder_attn,pixel_decoder_attn]"]),
        ("lora r=8 decoder + pixel-decoder attn + focal modulation",
         ["method=lora", "method.targets=[decoder_attn,pixel_decoder_attn,attn_qkv,attn_proj]"]),
    ],
}


def backbone_side(r: dict) -> float:
    return 100 * (r["peft"] + r["backbone_trainable"]) / r["backbone"]


def family_of_preset(model: str) -> str:
    """The family a conf/model preset builds (composed: presets set only what differs)."""
    return compose_config([f"model={model}"]).model.family


def table_rows(model: str, rows, num_classes: int) -> list[dict]:
    out = []
    for label, overrides in rows:
        cfg = compose_config([f"model={model}", *overrides])
        counts = count_parameters(build_for_run(cfg, num_classes))
        out.append({"label": label, "total": counts.total, "trainable": counts.trainable,
                    "ratio": counts.ratio, "peft": counts.by_group["peft"]["total"],
                    "backbone": counts.by_group["backbone"]["total"],
                    "backbone_trainable": counts.by_group["backbone"]["trainable"]})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vitdet_b")
    ap.add_argument("--num-classes", type=int, default=80)
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table (for the README)")
    ap.add_argument("--only", nargs="*", help="labels to keep (default: all rows whose method exists)")
    ap.add_argument("--json", metavar="PATH", help="also write the rows as JSON (the docs render docs/benchmarks/params_*.json)")
    args = ap.parse_args(argv)
    from peftseg.registry import FAMILIES, METHODS

    methods = {p.stem for p in (CONF_DIR / "method").glob("*.yaml")}
    family = family_of_preset(args.model)
    family_map = FAMILIES.get(family).family_map

    def hosts(method: str) -> bool:  # e.g. Mona needs a token grid, which SEEM's FocalNet has not
        return all(getattr(family_map, need, None) for need in METHODS.get(method).requires)

    rows = [(label, ov) for label, ov in ROWS
            if ov[0].split("=", 1)[1] in methods and hosts(ov[0].split("=", 1)[1])
            and (not args.only or label in args.only)]
    rows += [(label, ov) for label, ov in FAMILY_ROWS.get(family, [])
             if not args.only or label in args.only]
    result = table_rows(args.model, rows, args.num_classes)
    if args.json:
        import json
        from pathlib import Path

        out = {"model": args.model, "num_classes": args.num_classes,
               "rows": [{**r, "overrides": overrides} for r, (_, overrides) in zip(result, rows)]}
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    if args.markdown:
        print(f"| {args.model} ({args.num_classes} classes) | trainable | total | trainable % | vs backbone % |")
        print("|---|---:|---:|---:|---:|")
        for r in result:
            print(f"| {r['label']} | {fmt_count(r['trainable'])} | {fmt_count(r['total'])} | "
                  f"{100 * r['ratio']:.2f} | {backbone_side(r):.2f} |")
        return 0
    table = Table(title=f"{args.model}: trainable parameters ({args.num_classes} classes; % of the model as run)")
    for col in ("method", "trainable", "total", "trainable %", "PEFT params", "vs backbone %"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in result:
        table.add_row(r["label"], fmt_count(r["trainable"]), fmt_count(r["total"]), f"{100 * r['ratio']:.2f}",
                      fmt_count(r["peft"]), f"{backbone_side(r):.2f}")
    table.caption = ("vs backbone % = (PEFT + trainable backbone params) / backbone params: the ratio "
                     "papers quote when the task layers train in every method")
    Console().print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
