"""Export time and parity of `peftseg export` for a few model + method pairs.

    .venv/bin/python scripts/export_parity.py --out export_parity
    .venv/bin/python scripts/export_parity.py --pairs vitdet_b:lora --formats onnx

Each pair gets a run checkpoint (scripts/synthetic_run.py: trained tensors set by seeded
noise, so LoRA/adapters change the outputs), is exported to each format by
peftseg.checkpoint.export (the code behind `peftseg export`), and the parity record it writes
beside the file is collected. Writes <out>/export_parity.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from synthetic_run import synthetic_run  # noqa: E402

DEFAULT_PAIRS = ["vitdet_tiny:lora", "vitdet_tiny:adapter", "maskdino_tiny:lora", "maskdino_tiny:side"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", nargs="+", default=DEFAULT_PAIRS, help="MODEL:METHOD entries")
    ap.add_argument("--formats", nargs="+", default=["onnx", "torchscript"])
    ap.add_argument("--out", type=Path, default=Path("export_parity"))
    args = ap.parse_args()

    from peftseg.checkpoint.export import export_checkpoint
    from peftseg.errors import UserError

    rows = []
    for pair in args.pairs:
        model, method = pair.split(":")
        run = args.out / f"{model}-{method}"
        if not (run / "model_final.safetensors").is_file():
            synthetic_run(run, [f"model={model}", f"method={method}"], noise_seed=0)
        for fmt in args.formats:
            try:
                result = export_checkpoint(str(run), fmt, None, [])
            except UserError as e:
                rows.append({"model": model, "method": method, "format": fmt, "refused": str(e)})
                continue
            p = result.parity
            rows.append({"model": model, "method": method, "format": fmt, "export_seconds": p["export_seconds"],
                         "file_bytes": result.path.stat().st_size, "max_abs_diff": p["max_abs_diff"],
                         "classes_equal": p["classes_equal"], "within_tolerance": p["within_tolerance"],
                         "detections": [i["detections_pytorch"] for i in p["images"]]})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "export_parity.json").write_text(json.dumps(rows, indent=2) + "\n")
    print("| model | method | format | export s | MiB | scores | boxes | masks | classes equal | ok |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "refused" in r:
            print(f"| {r['model']} | {r['method']} | {r['format']} | refused: {r['refused'][:80]} |")
            continue
        d = r["max_abs_diff"]
        f = (lambda x: "-" if x is None else f"{x:.1e}")
        print(f"| {r['model']} | {r['method']} | {r['format']} | {r['export_seconds']:.1f} | "
              f"{r['file_bytes'] / 2**20:.1f} | {f(d['scores'])} | {f(d['boxes'])} | {f(d['masks'])} | "
              f"{r['classes_equal']} | {r['within_tolerance']} |")


if __name__ == "__main__":
    main()
