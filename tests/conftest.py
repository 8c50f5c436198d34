import copy
import json
import os
import subprocess
import sys
from pathlib import Path

# Triton kernels run in Triton's CPU interpreter in the tests (tests/test_msda_triton.py):
# triton reads this when triton.language is first imported, which importing torch can do
os.environ.setdefault("TRITON_INTERPRET", "1")
# Under pytest-xdist (addopts: -n auto) every core runs a worker: one torch thread per worker,
# and per CLI subprocess it starts, instead of each worker's threads competing for every core
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import cli_env  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

# session fixtures built once per worker: their users must share the worker that built them
SHARED_SESSION_FIXTURES = ("smoke_sweep", "finished_lora_run")


def pytest_collection_modifyitems(items):
    """xdist's loadgroup schedules a group as a unit: a file's tests stay together (its module
    fixtures are built once) unless they use a shared session fixture, whose users are one group."""
    for item in items:
        shared = [name for name in SHARED_SESSION_FIXTURES if name in item.fixturenames]
        item.add_marker(pytest.mark.xdist_group(shared[0] if shared else item.module.__name__))


@pytest.fixture(scope="session")
def shapes_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("peftseg-cache")


@pytest.fixture
def peftseg(tmp_path, shapes_cache):
    """Run the real `peftseg` CLI in a subprocess, in a fresh working dir."""

    def _run(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "peftseg.cli", *args], cwd=tmp_path, env=cli_env(shapes_cache, **(env or {})),
            capture_output=True, text=True, timeout=timeout,
        )

    return _run


def records_under(path: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(Path(path).rglob("results.json"))]


SMOKE_SWEEP = ("train", "-m", "method=adapter", "method.adapters_per_block=1,2,3", "train=smoke",
               "train.max_iter=8", "train.warmup_iters=0", "model.score_thresh_test=0.0")


@pytest.fixture(scope="session")
def smoke_sweep(tmp_path_factory, shapes_cache):
    """One 3-member sweep (1, 2, 3 adapters per block), shared by the sweep and report tests.

    Returns (completed process, sweep dir)."""
    cwd = tmp_path_factory.mktemp("sweep")
    proc = subprocess.run([sys.executable, "-m", "peftseg.cli", *SMOKE_SWEEP], cwd=cwd, env=cli_env(shapes_cache),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (sweep_dir,) = (cwd / "multirun").glob("*/*")
    return proc, sweep_dir


@pytest.fixture(scope="module")
def base():
    """A seeded vitdet_tiny (3 classes) in eval mode; tests that train call .train()."""
    from helpers import preset
    from peftseg.models import build_model
    from peftseg.models.vitdet import VitDetConfig

    torch.manual_seed(0)
    return build_model(preset("model", "vitdet_tiny", VitDetConfig), num_classes=3).eval()


@pytest.fixture
def model(base):
    return copy.deepcopy(base)


@pytest.fixture(scope="session")
def finished_lora_run(tmp_path_factory, shapes_cache) -> Path:
    """A finished 2-step LoRA run (mergeable; eval/ written), in-process: for the tests of the
    commands that read a run (predict, visualize, merge, eval) and must never damage it."""
    from helpers import run_in_process

    work = tmp_path_factory.mktemp("finished_lora")
    record = run_in_process(work, shapes_cache, "method=lora", "train.max_iter=2", "train.warmup_iters=0", "model.score_thresh_test=0.0", "train.num_workers=0")
    assert record.status == "ok", record.error
    return work
