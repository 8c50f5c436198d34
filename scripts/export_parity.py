"""Export time and parity of `peftseg export` for model + method pairs.

    .venv/bin/python scripts/export_parity.py --out export_parity
    .venv/bin/python scripts/export_parity.py --pairs vitdet_b:lora --formats onnx
    .venv/bin/python scripts/export_parity.py --train-iters 10 --images <shapes val folder> --out export_parity_trained

Each pair gets a run checkpoint and is exported to each format by peftseg.checkpoint.export
(the code behind `peftseg export`); the parity record it writes beside the file is collected.
The checkpoint is either synthetic (scripts/synthetic_run.py: trained tensors set by seeded
noise, so LoRA/adapters change the outputs) or, with --train-iters N, a real `train=smoke` run
of N iterations on the shapes data: the query families' masks (and so their boxes) follow the
image only once trained, which is what exposes a value frozen by tracing.
Writes <out>/export_parity.json and prints a table; an export that fails parity is a row too.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from synthetic_run import synthetic_run  # noqa: E402

FAMILY_PRESETS = ["vitdet_tiny", "swin_tiny", "m2f_tiny", "maskdino_tiny", "seem_tiny"]
DEFAULT_PAIRS = [f"{m}:{method}" for m in FAMILY_PRESETS for method in ("lora", "adapter", "side")]


def trained_run(run_dir: Path, overrides: list[str], iters: int) -> Path:
    """A real run of train=smoke for `iters` iterations (4 val images: its evaluation is not measured)."""
    from peftseg.config import compose_config
    from peftseg.engine.run import run

    cfg = compose_config(["train=smoke", "train.progress=false", f"train.max_iter={iters}", "train.warmup_iters=0",
                          "dataset.num_val=4", *overrides])
    run_dir.mkdir(parents=True, exist_ok=True)
    run(cfg, run_dir, run_dir.name)
    return run_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", nargs="+", default=DEFAULT_PAIRS, help="MODEL:METHOD entries")
    ap.add_argument("--formats", nargs="+", default=["onnx", "pt2", "torchscript"])
    ap.add_argument("--train-iters", type=int, default=0, help="train each run this long (0: synthetic tensors)")
    ap.add_argument("--images", type=Path, help="a folder of images to check parity on (default: synthetic ones)")
    ap.add_argument("--out", type=Path, default=Path("export_parity"))
    args = ap.parse_args()

    from peftseg.checkpoint.export import export_checkpoint
    from peftseg.errors import UserError

    images = sorted(p for p in args.images.iterdir() if p.is_file()) if args.images else None
    rows = []
    for pair in args.pairs:
        model, method = pair.split(":")
        run = (args.out / f"{model}-{method}").resolve()
        if not (run / "model_final.safetensors").is_file():
            overrides = [f"model={model}", f"method={method}"]
            if args.train_iters:
                trained_run(run, overrides, args.train_iters)
            else:
                synthetic_run(run, overrides, noise_seed=0)
        for fmt in args.formats:
            try:
                result = export_checkpoint(str(run), fmt, None, [], images=images)
            except UserError as e:
                rows.append({"model": model, "method": method, "format": fmt, "refused": str(e)})
                continue
            p = result.parity
            rows.append({"model": model, "method": method, "format": fmt, "export_seconds": p["export_seconds"],
                         "file": result.path.name, "file_bytes": result.path.stat().st_size,
                         "max_abs_diff": p["max_abs_diff"], "classes_equal": p["classes_equal"],
                         "compared_detections": p["compared_detections"], "within_tolerance": p["within_tolerance"],
                         "problems": p["problems"], "detections": [i["detections_pytorch"] for i in p["images"]],
                         "onnx_exporter": p.get("onnx_exporter"), "opset": p.get("opset"),
                         "mask_pixels": p.get("mask_pixels")})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "export_parity.json").write_text(json.dumps(rows, indent=2) + "\n")
    print("| model | method | format | export s | MiB | compared | scores | boxes (px) | masks | classes equal | ok |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "refused" in r:
            print(f"| {r['model']} | {r['method']} | {r['format']} | refused: {r['refused'][:120]} |")
            continue
        d = r["max_abs_diff"]
        f = (lambda x: "-" if x is None else ("0" if x == 0 else f"{x:.1e}"))
        ok = "yes" if r["within_tolerance"] else f"**no**: {'; '.join(r['problems'])}"
        print(f"| {r['model']} | {r['method']} | {r['format']} | {r['export_seconds']:.1f} | "
              f"{r['file_bytes'] / 2**20:.1f} | {r['compared_detections']} | {f(d['scores'])} | {f(d['boxes'])} | "
              f"{f(d['masks'])} | {'yes' if r['classes_equal'] else 'no'} | {ok} |")


if __name__ == "__main__":
    main()
