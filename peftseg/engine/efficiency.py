"""Efficiency numbers for the run record: peak memory and step time."""

from __future__ import annotations

import resource
import sys

import torch


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    # Peak RSS only ever grows, so without a reset every member of an in-process sweep
    # would inherit the peaks of the members before it. Linux resets it on "5" here.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # not Linux, or not permitted: the peak then counts from process start


def peak_memory(device: torch.device) -> dict:
    """CUDA max allocated on GPU; the process's peak RSS on CPU."""
    if device.type == "cuda":
        return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated(device)), "peak_memory_kind": "cuda_max_allocated"}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is KiB on Linux, bytes on macOS.
    rss_bytes = rss if sys.platform == "darwin" else rss * 1024
    return {"peak_memory_bytes": int(rss_bytes), "peak_memory_kind": "cpu_peak_rss"}


def step_time_stats(storage, ims_per_batch: int) -> dict:
    """Mean step time from detectron2's IterationTimer (which already skips warm-up steps)."""
    if "time" not in storage.histories():
        return {"mean_step_time_s": None, "images_per_s": None, "timed_steps": 0}
    values = [v for v, _ in storage.history("time").values()]
    mean = sum(values) / len(values)
    return {"mean_step_time_s": mean, "images_per_s": ims_per_batch / mean if mean > 0 else None,
            "timed_steps": len(values)}
