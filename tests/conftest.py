import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def shapes_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("peftseg-cache")


@pytest.fixture
def peftseg(tmp_path, shapes_cache):
    """Run the real `peftseg` CLI in a subprocess, in a fresh working dir."""

    def _run(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
        full_env = {**os.environ, "PEFTSEG_CACHE": str(shapes_cache), "COLUMNS": "200", **(env or {})}
        return subprocess.run(
            [sys.executable, "-m", "peftseg.cli", *args], cwd=tmp_path, env=full_env,
            capture_output=True, text=True, timeout=timeout,
        )

    return _run


def records_under(path: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(Path(path).rglob("results.json"))]
