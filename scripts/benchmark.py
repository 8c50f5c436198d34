#!/usr/bin/env python
"""Step time and peak memory of PEFT methods side by side, with ratios against `full`.

    .venv/bin/python scripts/benchmark.py --model vitdet_tiny
    .venv/bin/python scripts/benchmark.py --model vitdet_b --image-size 256 --batch 1 --steps 3

Every method trains the same model (same seed, so the same initial weights), on the same
fixed batch, in one process: all models are built up front, then visited in rounds, each
round in a rotated order and each visit starting with an untimed warm-up step, so that
thermal and background-load drift spreads over all methods instead of landing on one.
Step time is the median over all timed steps (forward + backward + optimizer step).

Peak memory is counted the same way on both devices, as tensor bytes, which is what CUDA's
max_memory_allocated measures: the method's own resident tensors (parameters, buffers,
optimizer state) plus the peak of what one training step allocates on top of them. On
CUDA the step's peak comes from max_memory_allocated; on the CPU from the allocator
accounting of torch's profiler (profile_memory=True), since the CPU allocator keeps no
peak statistic. Peak RSS would not do here: it is process-wide and only grows, so in one
process it cannot tell methods apart, and across processes it adds the same interpreter
and library baseline to every method, compressing the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

# Kineto (the profiler backend) logs an ERROR probing for CUDA on CPU-only machines.
os.environ.setdefault("KINETO_LOG_LEVEL", "5")
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=UserWarning)

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_METHODS = ("full", "heads", "lora", "adapter")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vitdet_tiny", help="a conf/model option (default vitdet_tiny)")
    p.add_argument("--image-size", type=int, default=None, help="input size (default: the model's)")
    p.add_argument("--batch", type=int, default=2, help="images per step (default 2)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per method per round (default 5)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds over all methods (default 3)")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated registered methods (default: those of {','.join(DEFAULT_METHODS)} "
                        "that are registered)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the numbers to this file")
    return p.parse_args(argv)


def pick_methods(arg: str | None) -> list[str]:
    from peftseg.errors import UserError
    from peftseg.methods import METHODS

    configs = {p.stem for p in (ROOT / "conf" / "method").glob("*.yaml")}
    usable = sorted(m for m in METHODS if m in configs)
    if arg is None:
        return [m for m in DEFAULT_METHODS if m in usable]
    names = [m.strip() for m in arg.split(",") if m.strip()]
    unknown = [m for m in names if m not in usable]
    if unknown or not names:
        raise UserError(f"--methods names {unknown or 'nothing'}; registered methods: {', '.join(usable)}.")
    return names


def compose(model: str, method: str, image_size: int | None):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    overrides = [f"model={model}", f"method={method}", "train=smoke", "dataset=shapes"]
    if image_size:
        overrides.append(f"model.image_size={image_size}")
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


def resident_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the distinct storages behind parameters, buffers and optimizer state."""
    tensors = [*model.parameters(), *model.buffers()]
    for state in optimizer.state.values():
        tensors += [v for v in state.values() if torch.is_tensor(v)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


class Bench:
    def __init__(self, name, model, optimizer, params, device):
        self.name, self.model, self.optimizer, self.params, self.device = name, model, optimizer, params, device
        self.times: list[float] = []
        self.step_peak_bytes = 0

    def step(self, batch) -> None:
        # Old gradients go before the step starts, so "resident" is weights + optimizer state.
        self.optimizer.zero_grad(set_to_none=True)
        losses = self.model(batch)
        sum(losses.values()).backward()
        self.optimizer.step()

    def timed_step(self, batch) -> None:
        sync(self.device)
        t0 = time.perf_counter()
        self.step(batch)
        sync(self.device)
        self.times.append(time.perf_counter() - t0)

    def measure_memory(self, batch) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            sync(self.device)
            before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.step(batch)
            sync(self.device)
            self.step_peak_bytes = torch.cuda.max_memory_allocated(self.device) - before
        else:
            self.step_peak_bytes = cpu_step_peak(lambda: self.step(batch))

    @property
    def peak_bytes(self) -> int:
        return resident_bytes(self.model, self.optimizer) + self.step_peak_bytes


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_step_peak(fn) -> int:
    """Peak of CPU bytes allocated (net of frees) while `fn` runs, from the profiler's trace."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    # "Total Allocated" counts what was allocated since profiling began, minus its frees.
    cpu = [e["args"]["Total Allocated"] for e in events
           if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0]
    return max(cpu, default=0)


def build(names, args, device, console):
    from peftseg.config import register_schemas
    from peftseg.data import register_dataset
    from peftseg.data._loaders import train_loader
    from peftseg.engine.optim import build_optimizer
    from peftseg.methods import apply_method
    from peftseg.models import build_model
    from peftseg.params import count_parameters

    register_schemas()
    cfgs = {m: compose(args.model, m, args.image_size) for m in names}
    first = cfgs[names[0]]
    splits = register_dataset(first.dataset)
    image_size = first.model.image_size
    # One fixed batch for every method and every step.
    batch = next(iter(train_loader(splits.train, image_size, first.model.input_format, args.batch, 0, args.seed)))
    benches = []
    for m in names:
        cfg = cfgs[m]
        torch.manual_seed(args.seed)  # same initial weights for every method
        model = apply_method(build_model(cfg.model, num_classes=len(splits.class_names)), cfg.method)
        params = count_parameters(model)
        model.to(device).train()
        benches.append(Bench(m, model, build_optimizer(model, cfg.train), params, device))
        console.print(f"built {m}: {params.trainable:,} of {params.total:,} parameters train", highlight=False)
    return benches, batch, image_size


def run(args, console: Console) -> dict:
    from detectron2.utils.events import EventStorage

    from peftseg.engine.run import resolve_device

    device = resolve_device(args.device)
    names = pick_methods(args.methods)
    benches, batch, image_size = build(names, args, device, console)
    console.print(f"{args.model} @ {image_size}px, batch {args.batch}, {device}: "
                  f"{args.rounds} rounds x {args.steps} timed steps per method", highlight=False)
    with EventStorage(0):  # detectron2's losses log into one
        for b in benches:
            b.step(batch)  # first step: optimizer state is created, lazy inits run
            b.measure_memory(batch)
        for r in range(args.rounds):
            k = r % len(benches)
            for b in benches[k:] + benches[:k]:
                b.step(batch)  # untimed: the caches still hold the previous method's tensors
                for _ in range(args.steps):
                    b.timed_step(batch)
    results = {
        "model": args.model, "image_size": image_size, "batch": args.batch, "device": str(device),
        "steps_per_method": args.rounds * args.steps,
        "memory": "tensor bytes: resident params+buffers+optimizer state + peak allocated during one step "
                  + ("(torch.cuda.max_memory_allocated)" if device.type == "cuda" else "(torch.profiler CPU allocator accounting)"),
        "methods": {},
    }
    for b in benches:
        results["methods"][b.name] = {
            "trainable": b.params.trainable, "total": b.params.total, "ratio": b.params.ratio,
            "step_time_s": statistics.median(b.times),
            "step_time_min_s": min(b.times), "step_time_max_s": max(b.times),
            "peak_memory_bytes": b.peak_bytes,
        }
    base = results["methods"].get("full")
    for m in results["methods"].values():
        m["step_time_ratio"] = m["step_time_s"] / base["step_time_s"] if base else None
        m["peak_memory_ratio"] = m["peak_memory_bytes"] / base["peak_memory_bytes"] if base else None
    return results


def table(results: dict) -> Table:
    from peftseg.summary import fmt_bytes

    t = Table(title=f"{results['model']} · {results['image_size']}px · batch {results['batch']} · "
                    f"{results['device']} · {results['steps_per_method']} steps/method")
    for col, just in (("method", "left"), ("trainable %", "right"), ("step time", "right"),
                      ("× full", "right"), ("peak mem", "right"), ("× full ", "right")):
        t.add_column(col, justify=just)
    for name, m in results["methods"].items():
        t.add_row(
            name, f"{100 * m['ratio']:.3f}",
            f"{m['step_time_s'] * 1000:.0f} ms",
            "—" if m["step_time_ratio"] is None else f"{m['step_time_ratio']:.2f}",
            fmt_bytes(m["peak_memory_bytes"]),
            "—" if m["peak_memory_ratio"] is None else f"{m['peak_memory_ratio']:.2f}",
        )
    return t


def main(argv=None) -> int:
    from peftseg.errors import UserError

    args = parse_args(argv)
    console = Console()
    try:
        if args.batch < 1 or args.steps < 1 or args.rounds < 1:
            raise UserError("--batch, --steps and --rounds must each be at least 1.")
        results = run(args, console)
    except UserError as exc:
        Console(stderr=True).print(f"[bold red]error:[/] {exc}", highlight=False)
        return 2
    console.print(table(results))
    console.print(f"memory: {results['memory']}", highlight=False)
    if "full" not in results["methods"]:
        console.print("no `full` in --methods: ratios need it as the baseline", highlight=False)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
