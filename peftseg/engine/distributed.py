"""Multi-process training through detectron2's `launch`.

`train.num_gpus` processes on each of `train.num_machines` machines all run the same
`run()`. DDP keeps their weights in step, detectron2's TrainingSampler and
InferenceSampler shard the data by rank, COCOEvaluator gathers the predictions on rank 0,
and only rank 0 writes results.json, the checkpoint and the event files.

`train.ims_per_batch` is the total batch over all processes (detectron2's
SOLVER.IMS_PER_BATCH convention): each process loads ims_per_batch / world_size images
per step, so a run keeps its optimisation schedule when it moves to more processes.

On a machine where torch sees no CUDA device, launch's workers pick the gloo backend
and the processes are CPU processes; nothing here needs to work around launch for that.
"""

from __future__ import annotations

import contextlib
import logging
import logging.config
import os
from pathlib import Path

import torch

from peftseg.errors import UserError
from peftseg.results import FILENAME, Record, read_record, write_record

log = logging.getLogger(__name__)


def world_size(tcfg) -> int:
    return int(tcfg.num_gpus) * int(tcfg.num_machines)


def check(tcfg) -> None:
    """Catch what launch would only assert on (or hang on) inside its workers."""
    world = world_size(tcfg)
    if tcfg.ims_per_batch % world:
        raise UserError(
            f"train.ims_per_batch={tcfg.ims_per_batch} is the total batch over all {world} "
            f"processes (train.num_gpus x train.num_machines) and must divide evenly among them; "
            f"use a multiple of {world}, e.g. train.ims_per_batch={world * max(1, tcfg.ims_per_batch // world)}."
        )
    if tcfg.num_machines > 1 and tcfg.dist_url == "auto" and _slurm_env() is None:
        raise UserError(
            "train.dist_url=auto only works on one machine (or inside a SLURM job, where the "
            "first node's address is known). For several machines, give every machine the same "
            "train.dist_url=tcp://<address of machine 0>:<free port> and its own "
            "train.machine_rank."
        )
    if world > 1 and tcfg.device != "cpu" and torch.cuda.is_available():
        if tcfg.num_gpus > torch.cuda.device_count():
            raise UserError(
                f"train.num_gpus={tcfg.num_gpus} asks for one process per GPU but this machine has "
                f"{torch.cuda.device_count()} visible CUDA device(s); lower train.num_gpus, or use "
                "train.device=cpu for CPU processes."
            )


def _slurm_env():
    """submitit's view of the SLURM job, when this process runs inside one."""
    if "SLURM_JOB_ID" not in os.environ:
        return None
    try:
        import submitit

        return submitit.JobEnvironment()
    except Exception:  # not a submitit job (plain sbatch/srun): no hostnames to rely on
        return None


def _port_of(job_id: str) -> int:
    """A port in [20000, 40000) from a SLURM job id such as "1234" or "1234_7" (array task)."""
    import zlib

    return 20000 + zlib.crc32(job_id.encode()) % 20000


def _rendezvous(tcfg) -> tuple[str, int]:
    if tcfg.num_machines > 1 and tcfg.dist_url == "auto":
        env = _slurm_env()
        # One SLURM task per node (conf/hydra/launcher/slurm.yaml); launch spawns the rest.
        # The full job id, array task included: every member of a sweep array is its own
        # rendezvous and must not share a port with its siblings on the same first node.
        port = _port_of(env.job_id)
        return f"tcp://{env.hostnames[0]}:{port}", env.node
    return tcfg.dist_url, tcfg.machine_rank


@contextlib.contextmanager
def _cpu_children(device: str):
    # launch picks NCCL and binds one GPU per process whenever the *children* see CUDA;
    # hiding the GPUs from them is what makes train.device=cpu mean gloo on a GPU machine.
    if device != "cpu" or not torch.cuda.is_available():
        yield
        return
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved


def _worker(cfg, run_dir: Path, run_id: str, log_config: dict | None, on_evaluation=None) -> None:
    from detectron2.utils import comm

    from peftseg import known_warnings
    from peftseg.engine.interrupt import RunInterrupted
    from peftseg.engine.pruning import RunPruned
    from peftseg.engine.run import run

    known_warnings.install()  # a spawned process starts with Python's default warning filters
    # Spawned processes start with no logging set up: rank 0 gets the run's (console + the
    # run dir's log file), the others only warnings so the console shows one run's story.
    if comm.is_main_process() and log_config:
        logging.config.dictConfig(log_config)
    else:
        logging.basicConfig(level=logging.WARNING)
    if not torch.cuda.is_available():
        # N CPU processes each defaulting to all cores would oversubscribe them N times.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // comm.get_local_size()))
    try:
        run(cfg, run_dir, run_id, on_evaluation)
    except RunPruned:
        return  # every rank took the same decision; rank 0 recorded it, the launcher reads it there
    except RunInterrupted as stop:
        # A stop every rank took at the same step ends each process normally. An exception would
        # make torch's spawn terminate the other processes at once: rank 0 too, while it may
        # still be writing the checkpoint. Other stops (a second signal) still end with one.
        if not stop.agreed:
            raise


def launch_run(cfg, run_dir: Path, run_id: str, log_config: dict | None = None,
               on_evaluation=None) -> Record | None:
    """Run one experiment on `world_size` processes; the record (None on machines other than 0).
    Machine 0 holds the run dir's claim (peftseg.engine.rundir) for the whole run, and refuses
    a dir that holds an interrupted run this one would clear (UserError naming the resume).
    `on_evaluation` (a search's pruner) is called in every process of the run: with several,
    it is pickled into each spawned process (peftseg.experiments.trial.TrialPruner is)."""
    from peftseg.engine.run import run
    from peftseg.engine.rundir import claim, refuse_to_replace_interrupted

    tcfg = cfg.train
    check(tcfg)
    if world_size(tcfg) == 1:
        with claim(run_dir):
            refuse_to_replace_interrupted(run_dir, tcfg.resume)
            return run(cfg, run_dir, run_id, on_evaluation)
    dist_url, machine_rank = _rendezvous(tcfg)
    with claim(run_dir) if machine_rank == 0 else contextlib.nullcontext():
        if machine_rank == 0:
            refuse_to_replace_interrupted(run_dir, tcfg.resume)
        return _launch(cfg, run_dir, run_id, log_config, dist_url, machine_rank, on_evaluation)


@contextlib.contextmanager
def _forward_stop_signals():
    """SIGTERM/SIGINT and the scheduler's SIGUSR1/SIGUSR2 reach the launching process (what
    SLURM signals); its children, which run the training, each stop at the same step boundary
    with a checkpoint when they get it (engine/interrupt.py). So the parent passes the signal
    on and keeps waiting for them."""
    import multiprocessing
    import signal

    from peftseg.engine.interrupt import SIGNALS

    received: list[int] = []

    def forward(signum, frame):
        received.append(signum)
        for child in multiprocessing.active_children():
            if child.pid is not None:
                os.kill(child.pid, signum)

    previous = {s: signal.signal(s, forward) for s in SIGNALS}
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _stamp(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


def _stopped(record: Record | None):
    """The stop rank 0 recorded (interrupted or pruned), as the exception the caller handles."""
    import signal

    from peftseg.engine.interrupt import RunInterrupted
    from peftseg.engine.pruning import RunPruned

    if record is not None and record.status == "interrupted":
        info = record.interrupted or {}
        return RunInterrupted(signal.Signals[info.get("signal", "SIGTERM")], info.get("iteration"),
                              info.get("checkpoint"))
    if record is not None and record.status == "pruned":
        info = record.pruned or {}
        return RunPruned(info.get("iteration"), record.metrics or {}, info.get("reason", "pruned"))
    return None


def _launch(cfg, run_dir: Path, run_id: str, log_config: dict | None, dist_url: str, machine_rank: int,
            on_evaluation=None) -> Record | None:
    from detectron2.engine import launch

    from peftseg.engine.interrupt import RunInterrupted
    from peftseg.engine.rundir import resumes_from_inside
    from peftseg.results import failed_record

    tcfg = cfg.train
    path = Path(run_dir) / FILENAME
    if machine_rank == 0 and not resumes_from_inside(run_dir, tcfg.resume):
        # A leftover record in a reused dir must not pass for this run's if rank 0 is killed.
        # (A run resumed in its own dir keeps its interrupted record until rank 0 writes "running".)
        path.unlink(missing_ok=True)
    before = _stamp(path)  # a record written after this is this run's
    log.info("launching %d processes (%d per machine, machine %d), dist_url=%s",
             world_size(tcfg), tcfg.num_gpus, machine_rank, dist_url)
    try:
        with _cpu_children(tcfg.device), _forward_stop_signals() as received:
            launch(_worker, tcfg.num_gpus, num_machines=tcfg.num_machines, machine_rank=machine_rank,
                   dist_url=dist_url, args=(cfg, Path(run_dir), run_id, log_config, on_evaluation))
    except Exception as exc:
        if machine_rank != 0:
            if received:
                raise RunInterrupted(received[0], elsewhere=True) from None
            raise
        record = read_record(path) if _stamp(path) not in (None, before) else None
        stop = _stopped(record)
        if isinstance(stop, RunInterrupted):
            raise stop from None  # rank 0 stopped and recorded it: report it as a stop
        if record is None and before is not None:
            raise  # a resume that never started: the interrupted record still says how to continue
        # When another rank fails first, rank 0 is terminated before it can write.
        if record is None or record.status != "failed":
            record = failed_record(cfg, run_dir, run_id, exc)
            write_record(run_dir, record)
        if record.error["type"] == "UserError":
            raise UserError(record.error["message"]) from None
        raise
    if machine_rank != 0:
        if received:  # this machine's processes stopped at the step boundary machine 0 saved
            raise RunInterrupted(received[0], elsewhere=True)
        return None
    record = read_record(path)
    stop = _stopped(record)
    if stop is not None:
        raise stop
    return record
