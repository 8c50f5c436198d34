"""Two machines on this one: train.num_machines=2, each machine_rank its own `peftseg train`
process on localhost (gloo over TCP), one training process each, sharing the run dir as the
nodes of a cluster share a filesystem."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from helpers import cli_env

SETUP = ["train=smoke", "train.max_iter=4", "train.warmup_iters=0", "train.timing_warmup_iters=1",
         "train.log_period=1", "train.progress=false", "train.device=cpu", "train.ims_per_batch=4",
         "dataset.num_train=8", "dataset.num_val=2", "model.score_thresh_test=0.0",
         "train.threads=1"]  # two machines share this host's cores: one thread each, not all of them each


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_machines(cwd: Path, cache, run_dir: Path, *overrides: str) -> list[subprocess.Popen]:
    """Both machines of one run, each in its own session (its own process group)."""
    url = f"tcp://127.0.0.1:{free_port()}"
    return [subprocess.Popen([sys.executable, "-m", "peftseg.cli", "train", *overrides, "train.num_gpus=1",
                              "train.num_machines=2", f"train.machine_rank={rank}", f"train.dist_url={url}",
                              f"hydra.run.dir={run_dir}"],
                             cwd=cwd, env=cli_env(cache), start_new_session=True, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
            for rank in (0, 1)]


def finish(machines: list[subprocess.Popen], timeout: float = 300) -> list[str]:
    try:
        return [m.communicate(timeout=timeout)[0] for m in machines]
    finally:
        for m in machines:
            if m.poll() is None:
                os.killpg(m.pid, signal.SIGKILL)


def final_weights(run_dir: Path) -> dict:
    from peftseg.checkpoint.files import read_checkpoint

    return read_checkpoint(run_dir / "model_final.safetensors")[1]["model"]


def trained_iterations(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.json"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [json.loads(line)["iteration"] for line in lines if "total_loss" in line]


def test_two_machines_train_one_model_and_resume_exactly_after_one_is_stopped(tmp_path, shapes_cache):
    # one run on two machines, to the end
    whole = tmp_path / "whole"
    outs = finish(start_machines(tmp_path, shapes_cache, whole, *SETUP))
    assert all("Traceback" not in out for out in outs), outs[0][-3000:] + outs[1][-3000:]
    record = json.loads((whole / "results.json").read_text())
    assert record["status"] == "ok", record.get("error")
    assert record["config"]["train.num_machines"] == 2
    eff = record["efficiency"]
    assert eff["num_processes"] == 2 and eff["device"] == "cpu" and eff["timed_steps"] > 0
    # images/s counts the batch of both processes: ims_per_batch=4 is the total, 2 on each machine
    assert eff["images_per_s"] == 4 / eff["mean_step_time_s"]
    assert "AP" in record["metrics"]["segm"]
    # after the last step every process holds the same trainable weights, byte for byte (checked
    # by the run itself, which fails otherwise), and only machine 0 writes the record
    assert "trainable weights identical on all 2 processes" in (whole / "train.log").read_text()
    assert "machine 1 done; machine 0 writes the record" in outs[1]
    print(f"2 machines x 1 process: {eff['timed_steps']} timed steps, {eff['mean_step_time_s']:.3f} s/step, "
          f"{eff['images_per_s']:.2f} images/s over both, segm AP {record['metrics']['segm']['AP']}")

    # the same run, machine 1's process group stopped by SIGTERM after a step
    stopped = tmp_path / "stopped"
    machines = start_machines(tmp_path, shapes_cache, stopped, *SETUP)
    deadline = time.monotonic() + 240
    while not trained_iterations(stopped) and all(m.poll() is None for m in machines) \
            and time.monotonic() < deadline:
        time.sleep(0.02)
    assert all(m.poll() is None for m in machines), "the run ended before it could be stopped"
    os.killpg(machines[1].pid, signal.SIGTERM)
    outs = finish(machines)
    assert [m.returncode for m in machines] == [128 + signal.SIGTERM] * 2, outs[0][-3000:] + outs[1][-3000:]
    record = json.loads((stopped / "results.json").read_text())
    assert record["status"] == "interrupted" and record["interrupted"]["signal"] == "SIGTERM"
    stopped_at = record["interrupted"]["iteration"]
    assert 0 <= stopped_at < 3 and (stopped / f"model_{stopped_at:07d}.pth").is_file()
    assert "machine 0 saved the checkpoint" in " ".join(outs[1].split())

    # both machines resume it in place; the result is the uninterrupted run's, bit for bit
    outs = finish(start_machines(tmp_path, shapes_cache, stopped, f"train.resume={stopped}"))
    record = json.loads((stopped / "results.json").read_text())
    assert record["status"] == "ok", (record.get("error"), outs[0][-3000:], outs[1][-3000:])
    assert trained_iterations(stopped) == [0, 1, 2, 3]
    wa, wb = final_weights(whole), final_weights(stopped)
    assert wa.keys() == wb.keys() and wa
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} tensors differ after the resume, e.g. {different[:3]}"
    print(f"stopped after iteration {stopped_at} by SIGTERM to machine 1, resumed from {stopped_at + 1}: "
          "final weights equal to the uninterrupted run's")
