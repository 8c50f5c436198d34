#!/usr/bin/env python
"""One ViT-B attention block, detectron2's stock forward against each rel-pos path of
model.attention=efficient (chunked, sdpa, flex): peak memory and time of forward + backward,
and the largest difference of output and gradients, at the token grid of a global block
(1024 px: 64 x 64) or a window block.

    .venv/bin/python scripts/attention_memory.py                      # 1024 px global block, CPU
    .venv/bin/python scripts/attention_memory.py --tokens 32 --no-grad  # 512 px, frozen (inference-like)

Rows: detectron2, then `--paths` (default: chunked and sdpa; flex too on CUDA, or on the CPU
with --no-grad, since this torch has no FlexAttention backward there). The row `efficient`
is the path model.attention=efficient picks on the device.

Memory is tensor bytes as scripts/benchmark.py counts them (CUDA: max_memory_allocated;
CPU: the profiler's allocator accounting), of the step alone: input and parameters exist
before it starts.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("KINETO_LOG_LEVEL", "5")
warnings.filterwarnings("ignore", category=FutureWarning)

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=64, help="token grid side (1024 px / patch 16 = 64)")
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--no-grad", action="store_true", help="input and weights frozen: forward only")
    p.add_argument("--device", default="cpu")
    p.add_argument("--paths", default=None, help="comma-separated rel-pos paths (default: see above)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    from detectron2.modeling.backbone.vit import Attention

    from benchmark import cpu_step_peak, sync  # scripts/benchmark.py: the same accounting
    from peftseg.models._vit_attention import EfficientAttention, rel_pos_path

    device = torch.device(args.device)
    flex_ok = device.type == "cuda" or args.no_grad
    paths = args.paths.split(",") if args.paths else ["chunked", "sdpa"] + (["flex"] if flex_ok else [])
    torch.manual_seed(0)
    n = args.tokens
    stock = Attention(args.dim, num_heads=args.heads, use_rel_pos=True, rel_pos_zero_init=False,
                      input_size=(n, n)).to(device)
    modules = {"detectron2": stock}
    for path in paths:
        modules[path] = EfficientAttention.from_detectron2(copy.deepcopy(stock))
        modules[path].path = path
    x = torch.randn(args.batch, n, n, args.dim, device=device)
    g = torch.randn_like(x)
    outs = {}

    def step(module):
        xi = x.clone().requires_grad_(not args.no_grad)
        for prm in module.parameters():
            prm.requires_grad_(not args.no_grad)
            prm.grad = None
        if args.no_grad:
            with torch.no_grad():
                return module(xi), []
        y = module(xi)
        y.backward(g)
        return y.detach(), [xi.grad, *(prm.grad for prm in module.parameters())]

    rows = {}
    for name, module in modules.items():
        if device.type == "cuda":
            sync(device)
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            outs[name] = step(module)
            sync(device)
            peak = torch.cuda.max_memory_allocated(device) - before
        else:
            holder = {}
            peak = cpu_step_peak(lambda: holder.setdefault("r", step(module)))
            outs[name] = holder["r"]
        times = []
        for _ in range(args.reps):
            sync(device)
            t0 = time.perf_counter()
            step(module)
            sync(device)
            times.append(time.perf_counter() - t0)
        rows[name] = {"peak_bytes": peak, "time_s": statistics.median(times)}
    y0, g0 = outs["detectron2"]
    diff = {"output": 0.0}
    for path in paths:
        y1, g1 = outs[path]
        d = {"output": ((y0 - y1).abs().max() / y0.abs().max()).item()}
        if g0:
            d["grads"] = max(((a - b).abs().max() / a.abs().max()).item() for a, b in zip(g0, g1))
        rows[path]["max_rel_diff"] = d
        diff = {k: max(diff.get(k, 0.0), v) for k, v in d.items()}  # the worst path's
    picked = rel_pos_path(device)
    res = {"tokens": n * n, "dim": args.dim, "heads": args.heads, "batch": args.batch, "grad": not args.no_grad,
           "device": str(device), "efficient": picked, "rows": rows, "max_rel_diff": diff}
    if picked in rows:
        res["memory_ratio"] = rows[picked]["peak_bytes"] / rows["detectron2"]["peak_bytes"]
        res["time_ratio"] = rows[picked]["time_s"] / rows["detectron2"]["time_s"]
    print(f"{n}x{n} tokens, dim {args.dim}, {args.heads} heads, batch {args.batch}, "
          f"{'forward + backward' if g0 else 'forward, no grad'}, {device}; efficient picks {picked} here")
    for name, r in rows.items():
        print(f"  {name:11} peak {r['peak_bytes'] / 2**20:9.1f} MiB   time {r['time_s'] * 1000:8.0f} ms   "
              f"{r.get('max_rel_diff', '')}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "scripts"))
    sys.exit(main())
