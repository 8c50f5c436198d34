#!/usr/bin/env python
"""GPU acceptance run: one command, one JSON, one printed table per section.

    .venv/bin/python scripts/gpu_check.py --json gpu_check.json          # on a GPU, <= ~8 min
    .venv/bin/python scripts/gpu_check.py --device cpu --quick           # CPU smoke (the test suite)

Sections (each runs even when an earlier one failed; a failure is recorded with its error,
never as numbers):
  train_eval  every family's tiny preset trains 20 steps and evaluates (peftseg.engine.run,
              as `peftseg train` runs it) in fp32, bf16 AMP and fp16 AMP (grad scaler; CUDA
              only); status ok only with finite losses and a finite mask AP
  vitdet_b    vitdet_b at 1024 px, batch 2: stock-attention full (the baseline), full, heads,
              side, LoRA + checkpointing and the detectron2 SimpleTrainer peer, through
              scripts/benchmark.py (torch.cuda.max_memory_allocated, median step times)
  maskdino    maskdino_swin_l at 1024 px, one step: full vs LoRA + checkpointing
  ckpt_memory vitdet_b at 1024 px, batch 1, memory only (benchmark.py --memory-only): stock full
              against full/heads/side/LoRA with the neck and heads checkpointed
              (train.checkpoint_parts), in fp32 and bf16 AMP, each ratio against its goal
  vit_attention  one ViT-B global attention block at 1024 px: detectron2's forward against the
              chunked, SDPA-with-bias and FlexAttention paths, forward + backward time, peak
              memory, max relative difference of output and gradients (ok only within 1e-3)
  compile     vitdet_b at 1024 px, batch 2: LoRA eager vs LoRA with train.compile=true (inductor),
              median step times and the compiled row's first step (compilation included)
  msda        Triton vs PyTorch (grid_sample) deformable attention at the maskdino encoder's
              shapes at 1024 px: forward + backward time and max |difference| of output and
              gradients (the numbers that decide models/_msda.py's TRITON_MEASURED_FASTER)
  nccl        a 1-process process group (NCCL on CUDA, gloo on the CPU) and one all_reduce

--quick shrinks every section to CPU-test size (vitdet_tiny, maskdino_tiny, tiny msda shapes,
2 training steps, one family), so the script is exercised on every test run and never rots; its
compile row captures the blocks with dynamo's `eager` backend (inductor takes a minute or more on
a CPU, which the test suite cannot spend twice; tests/test_compile.py runs inductor).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import socket
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

os.environ.setdefault("KINETO_LOG_LEVEL", "5")
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=UserWarning)

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TINY_PRESETS = ("vitdet_tiny", "swin_tiny", "m2f_tiny", "maskdino_tiny")


def _benchmark_module():
    spec = importlib.util.spec_from_file_location("peftseg_benchmark_script", ROOT / "scripts" / "benchmark.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def section(name: str, fn, results: dict, console: Console) -> None:
    t0 = time.perf_counter()
    try:
        results[name] = {"status": "ok", **fn()}
    except Exception as exc:  # recorded, and the next section still runs
        results[name] = {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                         "traceback": traceback.format_exc(limit=8)}
        console.print(f"[red]{name} failed:[/] {type(exc).__name__}: {exc}", highlight=False)
    results[name]["wall_s"] = time.perf_counter() - t0
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- train + eval, tiny presets
def train_eval(args, out_dir: Path) -> dict:
    from peftseg.config import compose_config
    from peftseg.engine.run import run

    presets = TINY_PRESETS[:1] if args.quick else TINY_PRESETS
    precisions = [("fp32", [])]
    precisions.append(("amp_bf16", ["train.amp=true", "train.amp_dtype=bf16"]))
    if args.device != "cpu":
        precisions.append(("amp_fp16", ["train.amp=true", "train.amp_dtype=fp16"]))
    steps = 2 if args.quick else 20
    data = ["dataset.num_train=4", "dataset.num_val=2"] if args.quick else ["dataset.num_train=40", "dataset.num_val=10"]
    rows = {}
    for preset in presets:
        for prec, extra in precisions:
            label = f"{preset}/{prec}"
            run_dir = out_dir / "train_eval" / label.replace("/", "_")
            overrides = [f"model={preset}", "method=full", "dataset=shapes", "train=smoke", "train.progress=false",
                         f"train.max_iter={steps}", "train.warmup_iters=1", "train.timing_warmup_iters=1",
                         f"train.ims_per_batch={1 if args.quick else 2}", f"train.device={args.device}",
                         *data, *extra]
            t0 = time.perf_counter()
            try:
                record = run(compose_config(overrides), run_dir, run_dir.name)
                ap = record.mask_ap
                eff = record.efficiency or {}
                ok = record.status == "ok" and _finite(ap)
                rows[label] = {"status": "ok" if ok else "failed", "mask_AP": ap,
                               "step_time_s": eff.get("mean_step_time_s"), "peak_memory_bytes": eff.get("peak_memory_bytes"),
                               "precision": eff.get("precision"), "wall_s": time.perf_counter() - t0}
                if not ok:
                    rows[label]["error"] = f"status {record.status}, mask AP {ap!r} (not a finite number)"
            except Exception as exc:
                rows[label] = {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                               "wall_s": time.perf_counter() - t0}
    failed = [k for k, v in rows.items() if v["status"] != "ok"]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(rows)} runs failed: {failed} — rows: {json.dumps(rows, default=str)}")
    return {"steps": steps, "rows": rows}


# ---------------------------------------------------------------- memory / step time tables
def _bench(args, model: str, image_size: int | None, batch: int, methods: str, peer: bool, steps: int,
           extra: tuple[str, ...] = ()) -> dict:
    bench = _benchmark_module()
    bargs = bench.parse_args([*extra, "--model", model, "--batch", str(batch), "--steps", str(steps), "--repeat", "1",
                              "--methods", methods, "--device", args.device, "--baseline", methods.split(",")[0].split(":")[0],
                              *(["--image-size", str(image_size)] if image_size else []),
                              *(["--peer"] if peer else [])])
    results = bench.run(bargs, Console(quiet=True))
    for label, m in results["methods"].items():
        if not (_finite(m["step_time_s"]) and m["peak_memory_bytes"] > 0):
            raise RuntimeError(f"{model} {label}: step time {m['step_time_s']!r}, memory {m['peak_memory_bytes']!r}")
    return results


VITDET_ROWS = ("stock:full:model.attention=detectron2,full,heads,side,"
               "lora+ckpt:lora:train.activation_checkpointing=true")


def vitdet_b(args) -> dict:
    if args.quick:  # the stock baseline, the efficient attention and the peer: every code path
        return _bench(args, "vitdet_tiny", None, 1, "stock:full:model.attention=detectron2,full", peer=True, steps=1)
    return _bench(args, "vitdet_b", 1024, 2, VITDET_ROWS, peer=True, steps=3)


def maskdino(args) -> dict:
    rows = "full,lora+ckpt:lora:train.activation_checkpointing=true"
    if args.quick:
        return _bench(args, "maskdino_tiny", None, 1, "full", peer=False, steps=1)
    return _bench(args, "maskdino_swin_l", 1024, 1, rows, peer=False, steps=1)


# ---------------------------------------------------------------- checkpointed neck/heads memory
_CKPT = "train.activation_checkpointing=true:train.checkpoint_parts"
# label -> (row, goal as a fraction of stock full's peak)
CKPT_ROWS = {
    "stock": ("stock:full:model.attention=detectron2", None),
    "full": ("full", 0.55),
    "full+ckpt-nh": (f"full+ckpt-nh:full:{_CKPT}=[neck,heads]", 0.55),
    "heads+ckpt": (f"heads+ckpt:heads:{_CKPT}=[neck,heads]", 0.22),
    "side+ckpt": (f"side+ckpt:side:{_CKPT}=[neck,heads]", 0.22),
    "lora+ckpt-all": (f"lora+ckpt-all:lora:{_CKPT}=[blocks,neck,heads]", 0.25),
}


def ckpt_memory(args) -> dict:
    bench = _benchmark_module()
    rows = dict(CKPT_ROWS)
    for label in ("full+ckpt-nh", "heads+ckpt", "side+ckpt", "lora+ckpt-all"):  # the same rows under bf16 AMP
        entry, goal = CKPT_ROWS[label]
        rows[label + "-amp"] = (entry.replace(label + ":", label + "-amp:", 1) + ":train.amp=true", goal)
    if args.quick:
        rows = {k: rows[k] for k in ("stock", "heads+ckpt-amp")}  # checkpointing and AMP, two rows
    model, size = ("vitdet_tiny", None) if args.quick else ("vitdet_b", 1024)
    goals = ",".join(f"{label}={goal}" for label, (_, goal) in rows.items() if goal is not None)
    bargs = bench.parse_args(["--model", model, "--batch", "1", "--memory-only", "--baseline", "stock",
                              "--methods", ",".join(r for r, _ in rows.values()), "--goals", goals,
                              "--device", args.device, *(["--image-size", str(size)] if size else [])])
    results = bench.run(bargs, Console(quiet=True))
    for label, m in results["methods"].items():
        if not m["peak_memory_bytes"] > 0:
            raise RuntimeError(f"{model} {label}: memory {m['peak_memory_bytes']!r}")
    return results


# ---------------------------------------------------------------- ViT rel-pos attention paths
def vit_attention(args) -> dict:
    spec = importlib.util.spec_from_file_location("peftseg_attention_script", ROOT / "scripts" / "attention_memory.py")
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT / "scripts"))  # it imports benchmark.py's accounting
    spec.loader.exec_module(mod)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "attention.json"
        size = ["--tokens", "8", "--dim", "96", "--heads", "3", "--reps", "1"] if args.quick else ["--reps", "5"]
        mod.main([*size, "--device", args.device, "--json", str(out)])
        res = json.loads(out.read_text())
    bad = {k: r["max_rel_diff"] for k, r in res["rows"].items()
           if "max_rel_diff" in r and not all(_finite(v) and v <= 1e-3 for v in r["max_rel_diff"].values())}
    if bad:
        raise RuntimeError(f"attention paths differ from detectron2's by more than 1e-3 (relative): {bad}")
    return res


# ---------------------------------------------------------------- deformable attention kernel
def _time(fn, device, reps: int) -> float:
    fn()  # warm-up (Triton compiles here)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def msda(args) -> dict:
    from peftseg.models._maskdino.deform_attn import sample_levels

    device = torch.device(args.device)
    if args.quick:
        B, H, D, P, shapes = 1, 2, 8, 2, [(6, 5), (3, 3), (2, 1)]
    else:
        # maskdino_swin_l's encoder at 1024 px: strides 8..64 (+ stride 4 level when 5 levels
        # are used, left out here as the official encoder does for its self-attention), 8 heads
        B, H, D, P, shapes = 1, 8, 32, 4, [(128, 128), (64, 64), (32, 32), (16, 16)]
    interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if device.type != "cuda" and not interpreting:
        return {"skipped": "Triton needs CUDA (or TRITON_INTERPRET=1 on the CPU)"}
    from peftseg.models import _msda_triton as msda_triton

    g = torch.Generator(device="cpu").manual_seed(0)
    S = sum(h * w for h, w in shapes)
    Q, L = S, len(shapes)
    value = torch.randn(B, S, H, D, generator=g).to(device)
    loc = (torch.rand(B, Q, H, L, P, 2, generator=g) * 1.2 - 0.1).to(device)
    w = torch.rand(B, Q, H, L, P, generator=g).to(device)
    w = w / w.sum((-1, -2), keepdim=True)
    grad_out = torch.randn(B, Q, H * D, generator=g).to(device)

    def fwd_bwd(impl):
        ins = [t.clone().requires_grad_() for t in (value, loc, w)]
        out = impl(ins[0], shapes, ins[1], ins[2])
        out.backward(grad_out)
        return out.detach(), [t.grad for t in ins]

    ref, ref_g = fwd_bwd(sample_levels)
    got, got_g = fwd_bwd(msda_triton.ms_deform_attn)
    diffs = {"output": (ref - got).abs().max().item()}
    for name, a, b in zip(("value_grad", "locations_grad", "weights_grad"), ref_g, got_g):
        diffs[name] = (a - b).abs().max().item()
    reps = 1 if args.quick else 10
    t_pt = _time(lambda: fwd_bwd(sample_levels), device, reps)
    t_tr = _time(lambda: fwd_bwd(msda_triton.ms_deform_attn), device, reps)
    max_diff = max(diffs.values())
    return {"shapes": shapes, "batch": B, "heads": H, "head_dim": D, "points": P, "queries": Q,
            "pytorch_fwd_bwd_s": t_pt, "triton_fwd_bwd_s": t_tr, "speedup": t_pt / t_tr,
            "max_abs_diff": diffs, "correct": max_diff <= 1e-4,
            "goal_met": bool(max_diff <= 1e-4 and t_pt / t_tr >= 3.0)}


# ---------------------------------------------------------------- process group
def process_group(args) -> dict:
    import torch.distributed as dist

    backend = "nccl" if args.device.startswith("cuda") else "gloo"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    kwargs = {}
    if backend == "nccl":  # NCCL binds the group to one device, by index
        dev = torch.device(args.device)
        kwargs["device_id"] = dev if dev.index is not None else torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1, **kwargs)
    try:
        x = torch.ones(4, device=args.device)
        dist.all_reduce(x)
        if not torch.equal(x.cpu(), torch.ones(4)):
            raise RuntimeError(f"all_reduce over 1 process changed the tensor: {x}")
    finally:
        dist.destroy_process_group()
    return {"backend": backend, "init_and_all_reduce_s": time.perf_counter() - t0}


# ---------------------------------------------------------------- report
COMPILE_ROWS = "lora,lora+compile:lora:train.compile=true"


def compiled(args) -> dict:
    if args.quick:
        return _bench(args, "vitdet_tiny", None, 1, COMPILE_ROWS, peer=False, steps=1,
                      extra=("--compile-backend", "eager"))
    return _bench(args, "vitdet_b", 1024, 2, COMPILE_ROWS, peer=False, steps=3)


def _mib(b):
    return f"{b / 2**20:,.0f} MiB" if b else "—"


def tables(results: dict) -> list[Table]:
    out = []
    te = results.get("train_eval", {})
    t = Table(title=f"train {te.get('steps', '')} steps + eval (tiny presets) · {te.get('status')}")
    for c in ("run", "status", "mask AP", "step time", "peak mem"):
        t.add_column(c)
    for label, r in te.get("rows", {}).items():
        t.add_row(label, r["status"], f"{r.get('mask_AP', float('nan')):.2f}" if _finite(r.get("mask_AP")) else "—",
                  f"{1000 * r['step_time_s']:.0f} ms" if _finite(r.get("step_time_s")) else "—",
                  _mib(r.get("peak_memory_bytes")))
    out.append(t)
    for name in ("vitdet_b", "maskdino", "ckpt_memory", "compile"):
        r = results.get(name, {})
        t = Table(title=f"{name}: {r.get('model', '')} @ {r.get('image_size', '')}px, batch {r.get('batch', '')} · "
                        f"{r.get('status')} · ratios against {r.get('baseline', '')}")
        for c in ("row", "trainable %", "step time", "× base", "peak mem", "× base ", "first step"):
            t.add_column(c)
        for label, m in r.get("methods", {}).items():
            goal = "" if m.get("goal") is None else f" (goal ≤ {m['goal']:.2f}: {'met' if m['goal_met'] else 'NOT met'})"
            t.add_row(label, f"{100 * m['ratio']:.2f}",
                      f"{1000 * m['step_time_s']:.0f} ms" if _finite(m.get("step_time_s")) else "—",
                      f"{m['step_time_ratio']:.2f}" if m.get("step_time_ratio") else "—",
                      _mib(m["peak_memory_bytes"]),
                      (f"{m['peak_memory_ratio']:.2f}" if m.get("peak_memory_ratio") else "—") + goal,
                      f"{m['first_step_s']:.1f} s" if _finite(m.get("first_step_s")) else "—")
        out.append(t)
    r = results.get("vit_attention", {})
    t = Table(title=f"ViT rel-pos attention paths, {r.get('tokens', '')} tokens · {r.get('status')} · "
                    f"efficient picks {r.get('efficient', '')}")
    for c in ("path", "peak mem", "f+b time", "max rel diff"):
        t.add_column(c)
    for name, row in r.get("rows", {}).items():
        t.add_row(name, _mib(row["peak_bytes"]), f"{1000 * row['time_s']:.1f} ms", str(row.get("max_rel_diff", "")))
    out.append(t)
    r = results.get("msda", {})
    t = Table(title=f"deformable attention, Triton vs grid_sample · {r.get('status')}")
    for c in ("shapes", "pytorch f+b", "triton f+b", "speed-up", "max |diff|", "goal (>=3x, <=1e-4)"):
        t.add_column(c)
    if "speedup" in r:
        t.add_row(str(r["shapes"]), f"{1000 * r['pytorch_fwd_bwd_s']:.1f} ms", f"{1000 * r['triton_fwd_bwd_s']:.1f} ms",
                  f"{r['speedup']:.2f}x", f"{max(r['max_abs_diff'].values()):.2e}", "met" if r["goal_met"] else "not met")
    else:
        t.add_row(r.get("skipped", r.get("error", "")), "", "", "", "", "")
    out.append(t)
    r = results.get("nccl", {})
    t = Table(title="process group")
    for c in ("backend", "status", "init + all_reduce"):
        t.add_column(c)
    t.add_row(str(r.get("backend", "")), str(r.get("status")),
              f"{r['init_and_all_reduce_s']:.2f} s" if "init_and_all_reduce_s" in r else r.get("error", ""))
    out.append(t)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda | cuda:N | cpu (default cuda)")
    p.add_argument("--quick", action="store_true", help="CPU-test sizes for every section")
    p.add_argument("--json", type=Path, default=None, help="write the results here (default: print only)")
    p.add_argument("--out", type=Path, default=None, help="folder for the training runs (default: a temp folder)")
    p.add_argument("--only", default=None, help="comma-separated sections to run (default all)")
    args = p.parse_args(argv)
    console = Console() if sys.stdout.isatty() or os.environ.get("COLUMNS") else Console(width=160)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        console.print("no CUDA device is available; run with --device cpu --quick for the CPU check", highlight=False)
        return 2
    env = {"torch": torch.__version__, "device": args.device, "quick": args.quick,
           "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    results: dict = {"env": env}
    sections = {"train_eval": None, "vitdet_b": vitdet_b, "maskdino": maskdino, "ckpt_memory": ckpt_memory,
                "vit_attention": vit_attention, "compile": compiled, "msda": msda, "nccl": process_group}
    only = set(args.only.split(",")) if args.only else set(sections)
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = args.out or Path(tmp)
        for name, fn in sections.items():
            if name not in only:
                continue
            console.print(f"[bold]{name}[/] …", highlight=False)
            section(name, (lambda: train_eval(args, out_dir)) if name == "train_eval" else (lambda fn=fn: fn(args)),
                    results, console)
    for t in tables(results):
        console.print(t)
    failed = [k for k, v in results.items() if k != "env" and v.get("status") != "ok"]
    results["failed_sections"] = failed
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp_path = args.json.with_suffix(".json.tmp")
        tmp_path.write_text(json.dumps(results, indent=2, default=str) + "\n")
        os.replace(tmp_path, args.json)  # atomic: never a half-written result
    console.print(f"failed sections: {failed}" if failed else "all sections ok", highlight=False)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
