"""Shared test helpers: conf/ presets without Hydra, and real training batches."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from detectron2.data import DatasetMapper
from detectron2.data import transforms as T
from detectron2.data.datasets.coco import load_coco_json
from omegaconf import OmegaConf

from peftseg.data.shapes import generate_split

CONF = Path(__file__).resolve().parent.parent / "conf"


def preset(group: str, name: str, schema=None, **overrides):
    """conf/<group>/<name>.yaml as Hydra composes it (its schema, the presets it extends),
    with `overrides` merged on top; `schema`, when given, is checked to be the one it uses."""
    from peftseg.config import compose_config

    node = compose_config([f"{group}={name}"])[group]
    assert schema is None or OmegaConf.get_type(node) is schema, (name, OmegaConf.get_type(node), schema)
    return OmegaConf.merge(node, overrides)


def shapes_batch(tmp_dir, n: int = 2, image_size: int = 128, seed: int = 0) -> list[dict]:
    """`n` mapped training dicts (image + instances with polygon masks), as the loader makes."""
    json_path = generate_split(tmp_dir, "train", n, image_size, 4, seed)
    with open(json_path) as f:
        assert json.load(f)["annotations"], "the generator wrote no instances"
    # a dataset name makes load_coco_json map category ids to contiguous 0..K-1
    dicts = load_coco_json(json_path, os.path.join(tmp_dir, "train"), dataset_name=f"peftseg_unit_{image_size}")
    mapper = DatasetMapper(
        is_train=True, augmentations=[T.ResizeShortestEdge(image_size, max_size=image_size)],
        image_format="RGB", use_instance_mask=True, instance_mask_format="polygon",
    )
    return [mapper(d) for d in dicts]


def train_steps_and_check(model, batch, optimizer, trainable: set[str], label: str = "", steps: int = 3) -> None:
    """`steps` real optimizer steps, then: every parameter named in `trainable` moved and
    every other one is bit-identical (zero-initialised factors move from step 2 on)."""
    import torch
    from detectron2.utils.events import EventStorage

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    torch.manual_seed(0)
    with EventStorage():  # detectron2's heads log sampling stats to it
        for _ in range(steps):
            loss = sum(model(batch).values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    for n, p in model.named_parameters():
        if n in trainable:
            assert not torch.equal(p, before[n]), f"{label}: trainable {n} did not change"
        else:
            assert torch.equal(p, before[n]), f"{label}: frozen {n} changed"


def cli_env(cache, **extra: str) -> dict:
    """The environment of a `peftseg` subprocess in a test: the session's shapes cache, a wide
    console (rich wraps at 80 columns when piped), the project importable from any cwd."""
    root = str(Path(__file__).resolve().parent.parent)
    return {**os.environ, "PEFTSEG_CACHE": str(cache), "COLUMNS": "200",
            "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p), **extra}


@contextlib.contextmanager
def _in(cwd, cache):
    """Run from `cwd` with PEFTSEG_CACHE=`cache` (the shapes data the session shares)."""
    old_cwd, old_cache = os.getcwd(), os.environ.get("PEFTSEG_CACHE")
    try:
        os.chdir(cwd)
        os.environ["PEFTSEG_CACHE"] = str(cache)
        yield
    finally:
        os.chdir(old_cwd)
        if old_cache is None:
            os.environ.pop("PEFTSEG_CACHE", None)
        else:
            os.environ["PEFTSEG_CACHE"] = old_cache


def run_in_process(run_dir, cache, *overrides: str):
    """One real run (peftseg.engine.run, as `peftseg train` runs it) of train=smoke with
    `overrides`, recorded in `run_dir`; returns its Record. For tests where the CLI is not
    what is tested: no subprocess, no ~6 s of imports."""
    from peftseg.config import compose_config
    from peftseg.engine.run import run

    with _in(run_dir, cache):
        cfg = compose_config(["train=smoke", "train.progress=false", *overrides])
        return run(cfg, Path(run_dir), Path(run_dir).name)


def cli_in_process(*args: str, cwd, cache):
    """`peftseg <args>` run in this process (no ~6 s of imports per call), from `cwd` with
    PEFTSEG_CACHE=`cache`: a CompletedProcess with the exit status and the console output.

    For commands that do not go through @hydra.main (eval, merge, report, predict, …):
    `train` keeps the real subprocess, since Hydra's app state and logging outlive a run."""
    import io
    import subprocess

    from peftseg import cli

    assert args[0] != "train" or "--help" in args, "train runs through Hydra's main: use a subprocess"
    out, err = io.StringIO(), io.StringIO()
    widths = cli.console.width, cli.err_console.width
    try:
        cli.console.width = cli.err_console.width = 200  # as COLUMNS=200 gives the subprocesses
        with _in(cwd, cache), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main(list(args))
            except SystemExit as exc:
                code = exc.code
    finally:
        cli.console.width, cli.err_console.width = widths
    return subprocess.CompletedProcess(["peftseg", *args], code, out.getvalue(), err.getvalue())


CLASSES = ["circle", "square", "triangle"]


def make_run(run_dir: Path, *overrides: str, noise_seed: int, classes: list[str] = CLASSES) -> Path:
    """A run's final checkpoint of vitdet_tiny (or model=…) + a method, its trained tensors set to random
    values (as training would leave them, but in a second): a checkpoint as `peftseg train` writes it,
    for `classes` (a run on other data)."""
    import torch

    from peftseg.checkpoint.files import FINAL, PeftCheckpointer
    from peftseg.config import compose_config
    from peftseg.build import build_for_run

    cfg = compose_config(["model=vitdet_tiny", "train=smoke", *overrides])
    model = build_for_run(cfg, len(classes), list(classes))
    g = torch.Generator().manual_seed(noise_seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # zero-initialised LoRA B / adapter up become non-zero
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    meta = {"config": OmegaConf.to_container(cfg, resolve=True), "class_names": list(classes)}
    run_dir.mkdir(parents=True)
    PeftCheckpointer(model, save_dir=str(run_dir), meta=meta).save(FINAL)
    return run_dir


def ulps(magnitude, n: float, dtype=None) -> float:
    """A float tolerance: `n` machine epsilons of `dtype` (default float32) at `magnitude`.

    `magnitude` is the size of what is compared (a number, or a tensor/array of reference values,
    whose max abs is taken): rounding error is relative, so the bound scales with it. `n` is the
    number of roundings the two computations may differ by; each use says why that many."""
    import numpy as np
    import torch

    dtype = torch.float32 if dtype is None else dtype
    if isinstance(magnitude, torch.Tensor):
        magnitude = magnitude.detach().abs().max().item() if magnitude.numel() else 0.0
    elif isinstance(magnitude, np.ndarray):
        magnitude = float(np.abs(magnitude).max()) if magnitude.size else 0.0
    return float(n) * torch.finfo(dtype).eps * abs(float(magnitude))


class HeldSqlite:
    """A sqlite database another connection holds in an exclusive transaction, until release()."""

    def __init__(self, path: Path):
        import sqlite3

        self.con = sqlite3.connect(path, isolation_level=None)
        self.con.execute("CREATE TABLE IF NOT EXISTS t (x)")
        self.con.execute("BEGIN EXCLUSIVE")

    def release(self):
        if self.con.in_transaction:
            self.con.execute("ROLLBACK")


@contextlib.contextmanager
def registered_for_test(registry, spec, group: str):
    """`spec` registered in `registry` for the block, then gone again: from the registry and
    from the option compose_config stored for it in Hydra's ConfigStore under `group`."""
    from hydra.core.config_store import ConfigStore

    registry.add(spec)
    try:
        yield spec
    finally:
        registry._specs.pop(spec.name)
        ConfigStore.instance().repo.get(group, {}).pop(f"{spec.name}.yaml", None)
