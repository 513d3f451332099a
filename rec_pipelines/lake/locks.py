"""One writer at a time: the lock every change to the lake (ingestion, validation, rejection)
holds. A local lake locks its own ``.lock`` file (``fcntl``); a lake on object storage, which
has no locks, takes a PostgreSQL advisory lock (the database Dagster and MLflow already use)
or a lock file on a filesystem every writer shares. Both are released by the operating system
or the database when their holder dies, so a SIGKILLed run never leaves the lake locked."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
from collections.abc import Iterator
from pathlib import Path

from rec_models.files import is_remote


class LockUnavailable(RuntimeError):
    """No lock can protect this lake as configured."""


@contextlib.contextmanager
def lake_lock(lake, lock: str = "") -> Iterator[None]:
    """Hold the lake's lock for the block. ``lock``: a PostgreSQL URL (advisory lock), a
    local file, or "" for ``<lake>/.lock`` (a local lake only)."""
    if lock.startswith("postgresql"):
        with postgres_advisory_lock(lock, f"recsys-lake:{lake}"):
            yield
        return
    if not lock:
        if is_remote(lake):
            raise LockUnavailable(
                f"the lake {lake} is on object storage, which has no locks: set RECSYS_LAKE_LOCK to a PostgreSQL "
                "URL (postgresql+psycopg2://user:password@host/db, an advisory lock) or to a lock file every "
                "writer shares")
        lock = str(Path(lake) / ".lock")
    with file_lock(Path(lock)):
        yield


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def postgres_advisory_lock(url: str, name: str) -> Iterator[None]:
    """A session-level ``pg_advisory_lock`` on a key derived from ``name``, held on its own
    connection for the block (released by the server when the connection drops)."""
    import sqlalchemy as sa

    key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as connection:
            connection.execute(sa.text("SELECT pg_advisory_lock(:key)"), {"key": key})
            connection.commit()
            try:
                yield
            finally:
                connection.execute(sa.text("SELECT pg_advisory_unlock(:key)"), {"key": key})
                connection.commit()
    finally:
        engine.dispose()
