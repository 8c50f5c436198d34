"""hydra/launcher=slurm (and =local): hydra-submitit-launcher's launchers, whose requeued
members resume where they stopped.

Under the stock launcher a preempted or timed-out member is resubmitted with the overrides it
started with, and would start over. Here `checkpoint()`, which submitit calls once the run
has stopped at a step boundary on the scheduler's warning signal (peftseg.engine.requeue),
returns the same member with `train.resume=<its run dir>`, so the requeued job continues the
run in its own dir.

Hydra finds launchers only in the hydra_plugins package; this module stays light (Hydra
imports every plugin module at start-up) and leaves the work to peftseg.engine.requeue.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra_plugins.hydra_submitit_launcher import submitit_launcher as _submitit


def _member_dir(launcher, sweep_overrides, job_dir_key: str, job_num: int) -> Path | None:
    """The run dir of sweep member `job_num`, as Hydra's run_job makes it."""
    from omegaconf import OmegaConf, open_dict

    try:
        cfg = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, list(sweep_overrides))
        with open_dict(cfg.hydra.job):
            cfg.hydra.job.num = job_num
        return Path(str(OmegaConf.select(cfg, job_dir_key))) / str(OmegaConf.select(cfg, "hydra.sweep.subdir"))
    except Exception:  # no dir, no resume: the member is resubmitted as it started
        return None


class _ResumingCheckpoint:
    def checkpoint(self, sweep_overrides, job_dir_key: str, job_num: int, job_id: str, singleton_state: Any):
        """The member again, continuing its own run: submitit requeues the job with this."""
        import submitit

        from peftseg.engine.requeue import resume_overrides

        overrides = resume_overrides(sweep_overrides, _member_dir(self, sweep_overrides, job_dir_key, job_num))
        return submitit.helpers.DelayedSubmission(self, overrides, job_dir_key, job_num, job_id, singleton_state)


class SlurmLauncher(_ResumingCheckpoint, _submitit.SlurmLauncher):
    pass


class LocalLauncher(_ResumingCheckpoint, _submitit.LocalLauncher):
    pass
