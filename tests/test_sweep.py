"""Hydra multirun sweeps: one dir and record per member, failures counted, other launchers."""

from pathlib import Path

from conftest import records_under


def last_line(text: str) -> str:
    return [line for line in text.splitlines() if line.strip()][-1]


def test_each_member_gets_its_own_dir_and_record(smoke_sweep):
    proc, sweep_dir = smoke_sweep
    records = records_under(sweep_dir)
    assert sorted(r["config"]["method.adapters_per_block"] for r in records) == [1, 2, 3]
    assert all(r["status"] == "ok" and r["config"]["method.name"] == "adapter" for r in records)
    dirs = {Path(r["run"]["dir"]) for r in records}
    assert dirs == {sweep_dir.resolve() / f"{n}-vitdet_tiny-adapter" for n in range(3)}
    # Each extra adapter per block adds the same number of parameters, all of them trainable.
    peft = {r["config"]["method.adapters_per_block"]: r["params"]["by_group"]["peft"]["trainable"]
            for r in records}
    assert 0 < peft[1] and peft[2] == 2 * peft[1] and peft[3] == 3 * peft[1]
    assert last_line(proc.stdout).startswith("sweep: 0 of 3 runs failed")


def test_a_failing_member_is_recorded_and_the_sweep_goes_on(peftseg, tmp_path):
    proc = peftseg("train", "-m", "method.rank=4,0", "train=smoke", "train.max_iter=4", "train.warmup_iters=0",
                   "model.score_thresh_test=0.0")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    records = {r["config"]["method.rank"]: r for r in records_under(tmp_path / "multirun")}
    assert set(records) == {4, 0}
    assert records[4]["status"] == "ok" and records[4]["metrics"]["segm"]
    failed = records[0]
    assert failed["status"] == "failed"
    assert failed["error"]["type"] == "UserError" and "method.rank" in failed["error"]["message"]
    assert failed["metrics"] is None
    assert "method.rank must be an integer at least 1" in proc.stderr
    assert last_line(proc.stdout).startswith("sweep: 1 of 2 runs failed")


def test_submitit_local_launcher_runs_a_sweep(peftseg, tmp_path):
    # The same code path as hydra/launcher=slurm, with jobs as local processes.
    # one member: each is its own process (~6 s of imports), and the sweep logic is tested above
    proc = peftseg("train", "-m", "hydra/launcher=submitit_local", "method.rank=2",
                   "train=smoke", "train.max_iter=2", "train.warmup_iters=0",
                   "model.score_thresh_test=0.0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = records_under(tmp_path / "multirun")
    assert [r["config"]["method.rank"] for r in records] == [2]
    assert all(r["status"] == "ok" for r in records)
    (sweep_dir,) = (tmp_path / "multirun").glob("*/*")
    assert list((sweep_dir / ".submitit").glob("*/*_log.out")), "submitit ran no job"
    assert last_line(proc.stdout).startswith("sweep: 0 of 1 runs failed")


def test_slurm_launcher_config_takes_gpus_and_nodes_from_train():
    from peftseg.config import compose_config

    cfg = compose_config(["hydra/launcher=slurm", "train.num_gpus=4", "train.num_machines=2",
                          "hydra.launcher.partition=gpu"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.gpus_per_node, launcher.nodes, launcher.tasks_per_node) == (4, 2, 1)
    assert launcher.partition == "gpu" and launcher.timeout_min > 0
    assert launcher.cpus_per_task > 0 and launcher.mem_gb > 0
