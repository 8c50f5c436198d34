"""A run dir's leftovers that used to mislead: a garbage lock file, and a `last_checkpoint`
naming a checkpoint that was deleted."""

from __future__ import annotations

import logging
import os
import time

import pytest

from peftseg.checkpoint.files import checkpoint_file
from peftseg.engine.rundir import LOCK, claim
from peftseg.errors import UserError


@pytest.mark.parametrize("garbage", [b"", b"\x00\xffnot json", b"[1, 2]", b'{"host": "x"}'])
def test_an_old_lock_that_names_no_process_is_taken_over(tmp_path, caplog, garbage):
    lock = tmp_path / LOCK
    lock.write_bytes(garbage)
    old = time.time() - 60
    os.utime(lock, (old, old))
    with caplog.at_level(logging.WARNING, logger="peftseg.engine.rundir"):
        with claim(tmp_path):
            assert f'"pid": {os.getpid()}' in lock.read_text()
    assert "which names no process" in caplog.text
    assert not lock.exists()


def test_a_fresh_lock_that_names_no_process_is_refused_with_what_to_do(tmp_path):
    (tmp_path / LOCK).write_text("")  # another run may be between creating and filling it
    with pytest.raises(UserError, match=r"names no process; another run may be creating it right now\. "
                                        r"Try again in a few seconds; if it stays, delete the file\."):
        with claim(tmp_path):
            pass


def test_last_checkpoint_naming_a_deleted_file_says_so_and_names_what_is_there(tmp_path):
    (tmp_path / "last_checkpoint").write_text("model_0000499.pth")
    (tmp_path / "model_0000199.pth").write_bytes(b"x")
    with pytest.raises(UserError, match=r"last_checkpoint names 'model_0000499.pth', which is not a file in .* "
                                        r"\(deleted or moved\?\); give one of the checkpoints there, e\.g\. "
                                        r".*model_0000199.pth \(all: model_0000199.pth\)"):
        checkpoint_file(tmp_path)
    (tmp_path / "model_0000199.pth").unlink()
    with pytest.raises(UserError, match="no model_\\*.pth is left there either: start a new run"):
        checkpoint_file(tmp_path)
