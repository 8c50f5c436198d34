"""train.threads: torch's CPU threads for a run, recorded; and the one-line hint when a CPU run's
threads outnumber the cores free for them."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest
import torch

from helpers import run_in_process
from peftseg.config import TrainConfig, compose_config, validate
from peftseg.engine.threads import OversubscriptionCheck, oversubscription_hint
from peftseg.errors import UserError


def test_a_run_computes_with_train_threads_and_records_them(tmp_path, shapes_cache):
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the process's number; the run asks for another
    try:
        record = run_in_process(tmp_path, shapes_cache, "train.threads=1", "train.max_iter=2", "train.warmup_iters=0",
                                "model.score_thresh_test=0.0", "train.num_workers=0")
        assert torch.get_num_threads() == 2  # the next run in this process starts from the number it had
    finally:
        torch.set_num_threads(before)
    assert record.status == "ok", record.error
    assert record.efficiency["threads"] == 1
    assert json.loads((tmp_path / "results.json").read_text())["efficiency"]["threads"] == 1


@pytest.mark.parametrize("value", [0, -1])
def test_threads_below_one_are_refused_with_the_fix(value):
    with pytest.raises(UserError) as e:
        validate(compose_config([f"train.threads={value}"]))
    assert str(e.value) == (f"train.threads must be an integer at least 1 (got {value}); null keeps torch's default, "
                            "one thread per core; e.g. train.threads=1 on shared cores.")
    assert TrainConfig(threads=None).threads is None and TrainConfig(threads=3).threads == 3


def test_the_hint_names_the_fix_when_threads_outnumber_the_free_cores():
    # 16 threads, 16 cores, other processes keep 12 busy: 4 are free
    hint = oversubscription_hint(device_type="cpu", threads=16, cores=16, load=12.3)
    assert hint is not None and "\n" not in hint
    assert "16 torch threads" in hint and "about 12 of this machine's 16 cores busy (load average 12.3)" in hint
    assert hint.endswith("Set train.threads=4 (or OMP_NUM_THREADS=4 in the environment); with several runs sharing "
                         "the cores, train.threads=1.")
    hint = oversubscription_hint(device_type="cpu", threads=2, cores=2, load=4.7, own_load=1.2)
    assert "other processes already keep all 2 cores of this machine busy (load average 4.7)" in hint
    assert hint.endswith("Set train.threads=1 (or OMP_NUM_THREADS=1 in the environment).")
    # the load this run makes itself is not someone else's: alone on the machine, no hint
    assert oversubscription_hint(device_type="cpu", threads=16, cores=16, load=15.8, own_load=15.9) is None
    # threads that fit the free cores, one thread (nothing to lower), a GPU run: no hint
    assert oversubscription_hint(device_type="cpu", threads=4, cores=16, load=12.0) is None
    assert oversubscription_hint(device_type="cpu", threads=1, cores=2, load=6.0) is None
    assert oversubscription_hint(device_type="cuda", threads=16, cores=16, load=30.0) is None
    # an allotment smaller than the machine (CPU affinity: a SLURM job's cores)
    hint = oversubscription_hint(device_type="cpu", threads=64, cores=64, load=0.5, usable=8)
    assert "only 8 cores are allotted to it" in hint and "train.threads=8" in hint
    # several training processes share the free cores
    hint = oversubscription_hint(device_type="cpu", threads=4, processes=2, cores=8, load=2.0)
    assert "4 torch threads per process" in hint and "train.threads=3" in hint


def test_a_cpu_run_says_the_hint_once_after_its_warmup_steps(monkeypatch, caplog):
    monkeypatch.setattr(OversubscriptionCheck, "said", False)
    monkeypatch.setattr("os.getloadavg", lambda: (40.0, 40.0, 40.0))
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    caplog.set_level(logging.WARNING, logger="peftseg.engine.threads")
    for _ in range(2):  # two runs in one process (a sweep): one line in all
        hook = OversubscriptionCheck(torch.device("cpu"), processes=1, warmup_iters=2)
        hook.trainer = SimpleNamespace()
        hook.before_train()
        for _ in range(10):
            hook.after_step()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "8 torch threads" in lines[0] and "train.threads=1" in lines[0]
