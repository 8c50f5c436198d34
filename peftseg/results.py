"""The run record (results.json): schema, atomic write, read.

One JSON object per run. Writers go through `write_atomic`, so a reader (or a killed
run) never sees a half-written file: either the previous content or the new one.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

FILENAME = "results.json"
SCHEMA_VERSION = 1
_UMASK = os.umask(0)
os.umask(_UMASK)
METRIC_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def write_atomic_with(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Call `write(f)` on a temp file beside `path`, fsync, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file a normal mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: Path, data: bytes) -> None:
    write_atomic_with(path, lambda f: f.write(data))


def _json_safe(value: Any) -> Any:
    # COCOeval reports NaN for empty area ranges; JSON has no NaN, so store null.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_json(path: Path, obj: dict) -> Path:
    text = json.dumps(_json_safe(obj), indent=2, allow_nan=False)
    write_atomic(path, (text + "\n").encode())
    return Path(path)


def write_record(run_dir: Path, record: dict) -> Path:
    return write_json(Path(run_dir) / FILENAME, record)


def read_record(path: Path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    return json.loads(path.read_text())


def coco_metrics(eval_results: dict) -> dict:
    """Keep the standard COCO summary numbers of detectron2's COCOEvaluator output."""
    return {
        task: {k: eval_results[task].get(k) for k in METRIC_KEYS if k in eval_results[task]}
        for task in ("segm", "bbox")
        if task in eval_results
    }


def git_describe() -> str:
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--tags"],
            cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def versions() -> dict:
    import detectron2
    import torch

    import peftseg

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "detectron2": detectron2.__version__,
        "peftseg": peftseg.__version__,
    }
