"""The study's storage: opened, waited for when another process holds it, and locked among
the workers of one storage around "is a trial left?" + ask().

A sqlite database another process holds is said at once and waited for (tracking's
STORE_WAIT_S); an Optuna journal file's own lock (a symlink beside it) left by a killed
worker is taken over after JOURNAL_GRACE_S.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from peftseg.errors import UserError

# Optuna's journal file lock (JournalFileSymlinkLock) is a symlink beside the journal; one left by a
# worker killed while it wrote is taken over after this long without a change
JOURNAL_GRACE_S = 30


def storage_file(storage: str) -> Path | None:
    """The file behind a storage (sqlite database or journal), for the workers' lock."""
    if storage.startswith("sqlite:///"):
        path = storage[len("sqlite:///"):].split("?", 1)[0]  # sqlite:///s.db?timeout=9: the file s.db
        return None if not path or path == ":memory:" else Path(path)
    return None if "://" in storage else Path(storage)


def still_locked(storage: str, why: str, done: str = "Nothing was run.") -> UserError:
    from peftseg.experiments.tracking import STORE_WAIT_S

    return UserError(f"search.storage={storage} is still locked by another process after {STORE_WAIT_S:g} s ({why}). "
                     f"{done} Close what holds it (an open transaction in a sqlite3 shell or a database "
                     "browser, a process that is stuck writing), or use another storage: search.storage=<file>.db "
                     "or a journal file, search.storage=studies/search.log.")


def wait_for_storage(storage: str, say, done: str = "Nothing was run.") -> None:
    """Before the study opens, and before each trial is asked for or told: a sqlite storage
    another process holds is one line through `say` at once and a wait of STORE_WAIT_S at most
    (then UserError, ending with `done`); a journal whose lock file is there is one line saying
    how long Optuna waits before it takes the lock over."""
    from peftseg.experiments import tracking

    if "://" in storage:
        path = tracking.sqlite_file(storage)
        held = tracking.wait_for_sqlite(path, f"search.storage={storage}", say) if path else None
        if held:
            raise still_locked(storage, held, done)
        return
    lock = Path(storage + ".lock")  # the symlink JournalFileSymlinkLock makes beside the journal
    deadline = time.monotonic() + tracking.BUSY_PROBE_S  # another worker's moment of writing is no news
    while os.path.lexists(lock) and time.monotonic() < deadline:
        time.sleep(0.05)
    if os.path.lexists(lock):
        say(f"search.storage={storage} is locked: its lock file {lock} is there (another worker is writing, or "
            f"one was killed while writing); waiting up to {JOURNAL_GRACE_S} s for it, after which Optuna takes "
            "over a lock that has not changed")


def open_storage(storage: str):
    import optuna

    if "://" in storage:
        from peftseg.experiments.tracking import STORE_WAIT_S, sqlite_file

        # sqlite: a moment's lock of another worker is waited for as long as a held store is
        # at the start (pysqlite's default is 5 s, then the statement fails)
        kwargs = {"engine_kwargs": {"connect_args": {"timeout": STORE_WAIT_S}}} if sqlite_file(storage) else {}
        try:
            return optuna.storages.RDBStorage(storage, **kwargs)
        except Exception as e:  # a bad URL, a missing driver, a server that does not answer
            if "database is locked" in str(e):
                raise still_locked(storage, "database is locked") from None
            raise UserError(f"search.storage={storage!r} could not be opened ({type(e).__name__}: {e}); use "
                            "sqlite:///search.db, another SQLAlchemy URL, or a file path for a journal.") from None
    from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock

    Path(storage).parent.mkdir(parents=True, exist_ok=True)
    lock = JournalFileSymlinkLock(storage, grace_period=JOURNAL_GRACE_S)  # Optuna's default lock, its grace ours
    return optuna.storages.JournalStorage(JournalFileBackend(storage, lock_obj=lock))


@contextlib.contextmanager
def workers_lock(storage: str):
    """Mutual exclusion among the workers of one storage, around "is a trial left?" + ask().

    A file storage gets a flock on a file beside it (released by the kernel when a worker
    dies; Linux emulates flock over NFS with byte-range locks). A server database has no
    file to lock: concurrent workers may then start at most one trial each past n_trials."""
    path = storage_file(storage)
    if path is None:
        yield
        return
    import fcntl

    lock_path = path.with_name(path.name + ".peftseg-lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def trial_id(storage, study_name: str, number: int) -> int:
    """The storage's id of trial `number` of study `study_name`: what a storage's own methods
    take to change a trial that another process asked for."""
    return storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study_name), number)


def canonical_storage(storage: str) -> str:
    path = storage_file(storage)
    if path is not None:
        return ("sqlite:///" if "://" in storage else "") + str(path.expanduser().resolve())
    if "://" in storage:
        try:
            from sqlalchemy.engine import make_url

            return make_url(storage).render_as_string(hide_password=True)
        except Exception:  # not a URL SQLAlchemy reads: open_storage says so
            return storage
    return storage
