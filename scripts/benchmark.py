#!/usr/bin/env python
"""Step time and peak memory of PEFT methods side by side, with ratios against `full`.

    .venv/bin/python scripts/benchmark.py --model vitdet_tiny
    .venv/bin/python scripts/benchmark.py --model vitdet_b --image-size 256 --batch 1 --steps 3
    .venv/bin/python scripts/benchmark.py --model vitdet_b --image-size 1024 --batch 1 \
        --methods full,heads,side,lora,lora+ckpt:lora:train.activation_checkpointing=true
    .venv/bin/python scripts/benchmark.py --model vitdet_tiny --methods lora,lora+compile:lora:train.compile=true \
        --baseline lora

`--methods` entries are `METHOD` or `LABEL:METHOD:KEY=VALUE[:KEY=VALUE…]` (a labelled
variant with its own Hydra overrides); `--override KEY=VALUE` applies to every entry.
Rows, and the JSON, are keyed by label. Ratios are against the row `--baseline` names
(default `full`), e.g. a stock-attention row `stock:full:model.attention=detectron2`.

Every peftseg row steps through the trainer peftseg's training runs (detectron2's
SimpleTrainer / AMPTrainer from engine/precision.make_trainer, with peftseg's optimizer).
`--peer` adds the row `peer`: the same model built with detectron2's stock attention, all
parameters training, stepped by detectron2's own SimpleTrainer with an optimizer made by
detectron2's `get_default_optimizer_params` (no peftseg method, optimizer or precision code
in the loop): what users would otherwise run, so peftseg's overhead shows against it.

Every method trains the same model (same seed, so the same initial weights), on the same
fixed batch, in one process: all models are built up front, then visited `--repeat` times
in alternation (A B A B …, never A A … B B …), each visit an untimed warm-up step and
`--steps` timed ones, so that thermal and background-load drift lands on every row alike
instead of on whichever ran last. Step time is the median over all timed steps (forward +
backward + optimizer step), with its quartiles as the spread. The ratio against the
baseline is the median of the per-round ratios: each round's row time over the baseline's
time in the same round, neighbours in time, so drift between rounds cancels.
A `train.compile=true` row compiles its transformer blocks as runs do (peftseg.engine.compile);
its first step, which compiles, is reported apart (`first_step_s`) and never timed.

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
    p.add_argument("--repeat", type=int, default=3,
                   help="rounds over all rows in alternation, A B A B … (default 3)")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated METHOD or LABEL:METHOD:KEY=VALUE[:KEY=VALUE…] entries (default: "
                        f"those of {','.join(DEFAULT_METHODS)} that are registered)")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="a Hydra override applied to every entry (repeatable), e.g. train.amp=true")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend of train.compile=true rows (default inductor, as runs use; "
                        "eager captures the same graphs and runs them uncompiled)")
    p.add_argument("--baseline", default="full", help="label of the row ratios are taken against (default full)")
    p.add_argument("--peer", action="store_true",
                   help="add the row `peer`: detectron2's SimpleTrainer, stock attention, full fine-tuning")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the numbers to this file")
    p.add_argument("--goals", default=None, metavar="LABEL=RATIO[,…]",
                   help="memory goals as fractions of the baseline's peak, e.g. heads=0.22,full=0.55: each "
                        "row named gets `goal` and `goal_met` (peak ratio <= goal) in the JSON")
    p.add_argument("--memory-only", action="store_true",
                   help="measure peak memory only, one row at a time (built, stepped, measured, freed), "
                        "so that only one model is held at once; no step times. The JSON is rewritten "
                        "after every row")
    return p.parse_args(argv)


def pick_methods(arg: str | None) -> list[tuple[str, str, list[str]]]:
    from peftseg.errors import UserError
    from peftseg.methods import METHODS

    configs = {p.stem for p in (ROOT / "conf" / "method").glob("*.yaml")}
    usable = [m for m in METHODS.names() if m in configs]  # iterating the registry yields specs
    if arg is None:
        return [(m, m, []) for m in DEFAULT_METHODS if m in usable]
    from peftseg.cli.variants import parse_entry, split_entries

    entries = [parse_entry(e, "--methods") for e in split_entries(arg)]
    unknown = [m for _, m, _ in entries if m not in usable]
    if unknown or not entries:
        raise UserError(f"--methods names {unknown or 'nothing'}; registered methods: {', '.join(usable)}.")
    labels = [label for label, _, _ in entries]
    if len(set(labels)) != len(labels):
        raise UserError(f"--methods uses a label twice ({labels}); give every entry its own label.")
    return entries


def compose(model: str, method: str, image_size: int | None, extra: list[str] = ()):
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from peftseg.config import compose_config

    from peftseg.errors import UserError

    overrides = [f"model={model}", f"method={method}", "train=smoke", "dataset=shapes"]
    if image_size:
        overrides.append(f"model.image_size={image_size}")
    overrides += list(extra)
    try:
        return compose_config(overrides)
    except (HydraException, OmegaConfBaseException) as exc:
        raise UserError(f"overrides {list(extra)} for method {method} do not compose: {exc}") from None


def resident_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the distinct storages behind parameters, buffers and optimizer state."""
    tensors = [*model.parameters(), *model.buffers()]
    for state in optimizer.state.values():
        tensors += [v for v in state.values() if torch.is_tensor(v)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def tensor_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (a shared storage counts once)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


class Bench:
    def __init__(self, name, model, optimizer, params, device, precision, cfg, trainer=None):
        self.name, self.model, self.optimizer, self.params, self.device = name, model, optimizer, params, device
        self.precision, self.cfg = precision, cfg
        # a detectron2 trainer whose run_step is the step (None: the bare loop of `step`)
        self.trainer = trainer
        self.rounds: list[list[float]] = []  # the timed steps of each round's visit
        self.first_step_s = None  # the first step: lazy inits, and compilation under train.compile
        self.compiled_blocks = 0
        self.compile_backend = None
        self.step_peak_bytes = 0
        self.grad_bytes = 0

    def autocast(self):
        import contextlib

        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "amp_bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def step(self, batch) -> None:
        # Old gradients go before the step starts, so "resident" is weights + optimizer state.
        self.optimizer.zero_grad(set_to_none=True)
        if self.trainer is not None:  # forward, backward, metrics, optimizer step; grads stay
            self.trainer.run_step()
            self.grad_bytes = tensor_bytes([p.grad for p in self.model.parameters() if p.grad is not None])
            return
        with self.autocast():  # as the trainer runs it (detectron2's AMPTrainer / CpuAMPTrainer)
            losses = self.model(batch)
            loss = sum(losses.values())
        loss.backward()
        self.grad_bytes = tensor_bytes([p.grad for p in self.model.parameters() if p.grad is not None])
        self.optimizer.step()

    @property
    def times(self) -> list[float]:
        return [t for visit in self.rounds for t in visit]

    def timed_step(self, batch) -> float:
        sync(self.device)
        t0 = time.perf_counter()
        self.step(batch)
        sync(self.device)
        return time.perf_counter() - t0

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

    def breakdown(self) -> dict:
        """Where the peak goes: resident weights (parameters + buffers), optimizer state, and
        of the step's own peak the gradients and the rest (activations autograd keeps for
        backward, plus the step's temporaries)."""
        weights = tensor_bytes([*self.model.parameters(), *self.model.buffers()])
        state = [v for st in self.optimizer.state.values() for v in st.values() if torch.is_tensor(v)]
        optimizer = tensor_bytes(state)
        return {"weights_bytes": weights, "optimizer_state_bytes": optimizer, "gradients_bytes": self.grad_bytes,
                "activations_bytes": max(0, self.step_peak_bytes - self.grad_bytes)}

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
    cpu = [e["args"] for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0]
    if not cpu:
        return 0
    # "Total Allocated" is the allocator's running total, which does not start at zero
    # with each profiling session (measured: it carried ~10 MiB over from one method's
    # measurement to the next, inflating every later row). What the step adds is the peak
    # above the total just before the step's first allocation.
    baseline = cpu[0]["Total Allocated"] - cpu[0]["Bytes"]
    return max(0, max(a["Total Allocated"] for a in cpu) - baseline)


def build_peer(args, device, num_classes, batch, console) -> Bench:
    """The `peer` row: detectron2's SimpleTrainer on the stock-attention model, full training."""
    import itertools

    from detectron2.engine import SimpleTrainer
    from detectron2.solver.build import get_default_optimizer_params

    from peftseg.models import build_model
    from peftseg.params import count_parameters

    cfg = compose(args.model, "full", args.image_size, list(args.override))
    if "attention" in cfg.model:
        cfg.model.attention = "detectron2"
    torch.manual_seed(args.seed)  # the same initial weights as every other row
    model = build_model(cfg.model, num_classes=num_classes)
    for p in model.parameters():
        p.requires_grad_(True)
    model.to(device).train()
    params = get_default_optimizer_params(model, base_lr=cfg.train.base_lr, weight_decay=cfg.train.weight_decay,
                                          weight_decay_norm=0.0)
    cls, kwargs = {"adamw": (torch.optim.AdamW, {}),
                   "sgd": (torch.optim.SGD, {"momentum": cfg.train.momentum})}[cfg.train.optimizer]
    optimizer = cls(params, lr=cfg.train.base_lr, **kwargs)
    trainer = SimpleTrainer(model, itertools.repeat(batch), optimizer)
    bench = Bench("peer", model, optimizer, count_parameters(model), device, "fp32", cfg, trainer=trainer)
    console.print(f"built peer: detectron2 SimpleTrainer, stock attention, {bench.params.trainable:,} parameters train",
                  highlight=False)
    return bench


def build(entries, args, device, console):
    import itertools

    from peftseg.data import register_splits
    from peftseg.data.loading.loaders import train_loader
    from peftseg.build.activation_checkpointing import enable_activation_checkpointing
    from peftseg.engine.compile import compile_blocks
    from peftseg.engine.optim import build_optimizer
    from peftseg.engine.precision import make_trainer, run_precision
    from peftseg.methods import apply_method
    from peftseg.models import build_model
    from peftseg.params import count_parameters

    cfgs = {label: compose(args.model, m, args.image_size, [*args.override, *extra]) for label, m, extra in entries}
    first = next(iter(cfgs.values()))
    splits = register_splits(first.dataset)
    image_size = first.model.image_size
    # One fixed batch for every method and every step.
    batch = next(iter(train_loader(splits.train, image_size, first.model.input_format, args.batch, 0, args.seed)))

    def build_one(label, cfg) -> Bench:
        torch.manual_seed(args.seed)  # same initial weights for every method
        model = apply_method(build_model(cfg.model, num_classes=len(splits.class_names), class_names=splits.class_names), cfg.method)
        if cfg.train.activation_checkpointing:
            enable_activation_checkpointing(model, tuple(cfg.train.checkpoint_parts))
        params = count_parameters(model)
        model.to(device).train()
        compiled = compile_blocks(model, args.compile_backend) if cfg.train.compile else 0
        precision = run_precision(cfg.train, device, model)
        optimizer = build_optimizer(model, cfg.train)
        trainer = make_trainer(model, itertools.repeat(batch), optimizer, precision, device)
        console.print(f"built {label}: {params.trainable:,} of {params.total:,} parameters train, {precision}",
                      highlight=False)
        bench = Bench(label, model, optimizer, params, device, precision, cfg, trainer=trainer)
        bench.compiled_blocks, bench.compile_backend = compiled, args.compile_backend if compiled else None
        return bench

    if args.memory_only:  # builders, called one at a time by run_memory_only
        makers = [(label, (lambda label=label, cfg=cfg: build_one(label, cfg))) for label, cfg in cfgs.items()]
        if args.peer:
            makers.append(("peer", lambda: build_peer(args, device, len(splits.class_names), batch, console)))
        return makers, batch, image_size
    benches = [build_one(label, cfg) for label, cfg in cfgs.items()]
    if args.peer:
        benches.append(build_peer(args, device, len(splits.class_names), batch, console))
    return benches, batch, image_size


def row(b: Bench) -> dict:
    return {
        "trainable": b.params.trainable, "total": b.params.total, "ratio": b.params.ratio,
        **step_time_stats(b.times),
        # each round's median: any two rows' paired ratios can be taken from these later
        "step_time_rounds_s": [statistics.median(visit) for visit in b.rounds],
        "peak_memory_bytes": b.peak_bytes, **b.breakdown(),
        "method": b.cfg.method.name, "precision": b.precision,
        "activation_checkpointing": bool(b.cfg.train.activation_checkpointing),
        "checkpoint_parts": list(b.cfg.train.checkpoint_parts) if b.cfg.train.activation_checkpointing else [],
        "compile": bool(b.cfg.train.get("compile", False)), "compiled_blocks": b.compiled_blocks,
        "compile_backend": b.compile_backend, "first_step_s": b.first_step_s,
        "base_dtype": b.cfg.method.base_dtype, "blocks": str(b.cfg.method.blocks),
        # the target groups of a targeted method (LoRA on Linears vs on convolutions), else absent
        **({"targets": list(b.cfg.method.targets)} if "targets" in b.cfg.method else {}),
        "train_task_layers": bool(b.cfg.method.get("train_task_layers", False)),
        "attention": str(b.cfg.model.get("attention", "")),
        "loop": "detectron2 SimpleTrainer (peer)" if b.name == "peer" else type(b.trainer).__name__,
    }


def with_ratios(results: dict, baseline: str) -> dict:
    results["baseline"] = baseline
    base = results["methods"].get(baseline)
    for m in results["methods"].values():
        m.update(pair_ratios(m, base))
        m["peak_memory_ratio"] = m["peak_memory_bytes"] / base["peak_memory_bytes"] if base else None
    return results


def parse_goals(arg: str | None) -> dict[str, float]:
    from peftseg.errors import UserError

    goals = {}
    for item in (arg or "").split(","):
        if not item.strip():
            continue
        label, _, value = item.partition("=")
        try:
            goals[label.strip()] = float(value)
        except ValueError:
            raise UserError(f"--goals entry {item!r} is not LABEL=RATIO (e.g. heads=0.22).") from None
    return goals


def with_goals(results: dict, goals: dict[str, float]) -> dict:
    """Mark each row that has a goal met or not (its peak memory ratio against the baseline at
    most the goal); rows without a goal get None."""
    for label, m in results["methods"].items():
        goal = goals.get(label)
        ratio = m.get("peak_memory_ratio")
        m["goal"] = goal
        m["goal_met"] = None if goal is None or ratio is None else bool(ratio <= goal)
    return results


def run_memory_only(args, console: Console, device, makers, batch, image_size) -> dict:
    """--memory-only: each row built, stepped once (optimizer state, lazy inits), measured and
    freed before the next is built; the JSON is rewritten after every row, so a long CPU run
    that is stopped keeps the rows it finished."""
    import gc

    from detectron2.utils.events import EventStorage

    results = {
        "model": args.model, "image_size": image_size, "batch": args.batch, "device": str(device),
        "steps_per_method": 0, "overrides": list(args.override),
        "memory": "tensor bytes: resident params+buffers+optimizer state + peak allocated during one step "
                  + ("(torch.cuda.max_memory_allocated)" if device.type == "cuda" else "(torch.profiler CPU allocator accounting)")
                  + "; rows measured one after another in one process, one model held at a time",
        "methods": {},
    }
    console.print(f"{args.model} @ {image_size}px, batch {args.batch}, {device}: memory only, row by row",
                  highlight=False)
    for label, make in makers:
        b = make()
        with EventStorage(0):  # detectron2's losses log into one
            b.step(batch)  # first step: optimizer state is created, lazy inits run
            b.measure_memory(batch)
        results["methods"][label] = row(b)
        console.print(f"  {label}: peak {b.peak_bytes / 2**20:,.0f} MiB", highlight=False)
        del b
        gc.collect()
        if args.json:
            args.json.write_text(json.dumps(with_goals(with_ratios(results, args.baseline), parse_goals(args.goals)),
                                            indent=2) + "\n")
    return with_ratios(results, args.baseline)


def run(args, console: Console) -> dict:
    from detectron2.utils.events import EventStorage

    from peftseg.build import resolve_device

    from peftseg.errors import UserError

    device = resolve_device(args.device)
    entries = pick_methods(args.methods)
    # checked before the (long) run: a typo would otherwise leave a goal silently unchecked
    missing = [g for g in parse_goals(args.goals) if g not in {label for label, _, _ in entries} | {"peer"}]
    if missing:
        raise UserError(f"--goals names {missing}, which --methods has no row for.")
    benches, batch, image_size = build(entries, args, device, console)
    if args.memory_only:
        return with_goals(run_memory_only(args, console, device, benches, batch, image_size), parse_goals(args.goals))
    console.print(f"{args.model} @ {image_size}px, batch {args.batch}, {device}: "
                  f"{args.repeat} alternating rounds x {args.steps} timed steps per method", highlight=False)
    with EventStorage(0):  # detectron2's losses log into one
        for b in benches:
            start = time.perf_counter()
            b.step(batch)  # first step: optimizer state is created, lazy inits run, compiled blocks compile
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            b.first_step_s = time.perf_counter() - start
            b.measure_memory(batch)
        alternate(benches, batch, args.repeat, args.steps)
    results = {
        "model": args.model, "image_size": image_size, "batch": args.batch, "device": str(device),
        "steps_per_method": args.repeat * args.steps, "repeat": args.repeat, "overrides": list(args.override),
        "memory": "tensor bytes: resident params+buffers+optimizer state + peak allocated during one step "
                  + ("(torch.cuda.max_memory_allocated)" if device.type == "cuda" else "(torch.profiler CPU allocator accounting)"),
        "methods": {},
    }
    for b in benches:
        results["methods"][b.name] = row(b)
    return with_goals(with_ratios(results, args.baseline), parse_goals(args.goals))


def alternate(benches, batch, repeat: int, steps: int) -> None:
    """`repeat` rounds over all rows in the same order (A B A B …): a row's visit is one untimed
    step (the caches still hold the previous row's tensors) and `steps` timed ones."""
    for _ in range(repeat):
        for b in benches:
            b.step(batch)
            b.rounds.append([b.timed_step(batch) for _ in range(steps)])


def step_time_stats(times: list[float]) -> dict:
    """Median step time and its spread: the quartiles, and min/max (all None: no timed steps)."""
    if not times:
        return dict.fromkeys(("step_time_s", "step_time_p25_s", "step_time_p75_s", "step_time_min_s", "step_time_max_s"))
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else (times[0],) * 3
    return {"step_time_s": statistics.median(times), "step_time_p25_s": q1, "step_time_p75_s": q3,
            "step_time_min_s": min(times), "step_time_max_s": max(times)}


def pair_ratios(row: dict, base: dict | None) -> dict:
    """A row's time against the baseline's, round by round (`step_time_rounds_s`): the median of
    the rounds' ratios, and their range (each round's ratio compares two neighbours in time)."""
    rounds = list(zip(row.get("step_time_rounds_s") or [], (base or {}).get("step_time_rounds_s") or []))
    if not rounds:
        return {"step_time_ratio": None, "step_time_ratio_min": None, "step_time_ratio_max": None}
    ratios = [own / theirs for own, theirs in rounds]
    return {"step_time_ratio": statistics.median(ratios),
            "step_time_ratio_min": min(ratios), "step_time_ratio_max": max(ratios)}


def table(results: dict) -> Table:
    from peftseg.report.tables import fmt_bytes

    t = Table(title=f"{results['model']} · {results['image_size']}px · batch {results['batch']} · "
                    f"{results['device']} · {results['steps_per_method']} steps/method")
    for col, just in (("method", "left"), ("trainable %", "right"), ("step time (quartiles)", "right"),
                      (f"× {results['baseline']}", "right"), ("peak mem", "right"), (f"× {results['baseline']} ", "right"),
                      ("weights", "right"),
                      ("grads", "right"), ("optim", "right"), ("activations", "right")):
        t.add_column(col, justify=just)
    for name, m in results["methods"].items():
        t.add_row(
            name, f"{100 * m['ratio']:.3f}",
            "—" if m["step_time_s"] is None
            else f"{m['step_time_s'] * 1000:.0f} ms ({m['step_time_p25_s'] * 1000:.0f}–{m['step_time_p75_s'] * 1000:.0f})",
            "—" if m["step_time_ratio"] is None
            else f"{m['step_time_ratio']:.2f} ({m['step_time_ratio_min']:.2f}–{m['step_time_ratio_max']:.2f})",
            fmt_bytes(m["peak_memory_bytes"]),
            "—" if m["peak_memory_ratio"] is None else f"{m['peak_memory_ratio']:.2f}",
            fmt_bytes(m["weights_bytes"]), fmt_bytes(m["gradients_bytes"]),
            fmt_bytes(m["optimizer_state_bytes"]), fmt_bytes(m["activations_bytes"]),
        )
    return t


def main(argv=None) -> int:
    from peftseg.errors import UserError

    args = parse_args(argv)
    # Written to a log (a long CPU run usually is), the 10-column table needs more than the
    # 80 columns rich assumes without a terminal: cells would wrap into unreadable stubs.
    console = Console() if sys.stdout.isatty() or os.environ.get("COLUMNS") else Console(width=180)
    try:
        if args.batch < 1 or args.steps < 1 or args.repeat < 1:
            raise UserError("--batch, --steps and --repeat must each be at least 1.")
        if args.peer and args.methods and any(e.split(":")[0] == "peer" for e in args.methods.split(",")):
            raise UserError("--methods uses the label `peer`, which --peer adds; rename that entry.")
        results = run(args, console)
    except UserError as exc:
        Console(stderr=True).print(f"[bold red]error:[/] {exc}", highlight=False)
        return 2
    console.print(table(results))
    console.print(f"memory: {results['memory']}", highlight=False)
    if results["baseline"] not in results["methods"]:
        console.print(f"no `{results['baseline']}` row: ratios need it as the baseline (--baseline)", highlight=False)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
