"""One writer at a time: the lock every change to the lake (ingestion, validation, rejection)
holds. A local lake locks its own ``.lock`` file (``fcntl``); a lake on object storage, which
has no locks, takes a PostgreSQL advisory lock (the database Dagster and MLflow already use)
or a lock file on a filesystem every writer shares. Both are released by the operating system
or the database when their holder dies, so a SIGKILLed run never leaves the lake locked.

``lake_lock`` yields ``verify()``, which writers call right before each record they write (the
ledger, a batch's accounting): with PostgreSQL it confirms on the lock's own connection that
the lock is still held (a dropped connection releases it; the write then fails instead of
racing another writer). TCP keepalives notice a silently dead connection within about a
minute."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path

from rec_models.files import is_remote


class LockUnavailable(RuntimeError):
    """No lock can protect this lake as configured, or the lock was lost."""


def _postgres_url(lock: str) -> str | None:
    """The SQLAlchemy URL of a PostgreSQL lock setting (``postgres://`` accepted), else None."""
    scheme = lock.split("://", 1)[0] if "://" in lock else ""
    if scheme == "postgres" or scheme == "postgresql":
        return "postgresql+psycopg2://" + lock.split("://", 1)[1]
    return lock if scheme.startswith("postgresql+") else None


@contextlib.contextmanager
def lake_lock(lake, lock: str = "") -> Iterator[Callable[[], None]]:
    """Hold the lake's lock for the block; yields ``verify()``. ``lock``: a PostgreSQL URL
    (advisory lock), a local file, or "" for ``<lake>/.lock`` (a local lake only)."""
    url = _postgres_url(lock)
    if url is not None:
        with postgres_advisory_lock(url, f"recsys-lake:{lake}") as verify:
            yield verify
        return
    if "://" in lock:
        raise LockUnavailable(f"RECSYS_LAKE_LOCK must be a PostgreSQL URL (postgresql://...) or a lock file, "
                              f"got a {lock.split('://', 1)[0]}:// URL")
    if not lock:
        if is_remote(lake):
            raise LockUnavailable(
                f"the lake {lake} is on object storage, which has no locks: set RECSYS_LAKE_LOCK to a PostgreSQL "
                "URL (postgresql+psycopg2://user:password@host/db, an advisory lock) or to a lock file every "
                "writer shares")
        lock = str(Path(lake) / ".lock")
    with file_lock(Path(lock)):
        yield lambda: None


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


KEEPALIVES = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3}


@contextlib.contextmanager
def postgres_advisory_lock(url: str, name: str) -> Iterator[Callable[[], None]]:
    """A session-level ``pg_advisory_lock`` on a key derived from ``name``, held on its own
    connection for the block (released by the server when the connection drops); yields
    ``verify()`` (raises ``LockUnavailable`` when the lock is no longer held)."""
    import sqlalchemy as sa

    key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") & 0x7FFF_FFFF_FFFF_FFFF
    held = sa.text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1 "
                   "AND pid = pg_backend_pid() AND classid = :high AND objid = :low")
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool,
                              connect_args=KEEPALIVES if url.startswith("postgresql+psycopg2") else {})
    try:
        with engine.connect() as connection:
            connection.execute(sa.text("SELECT pg_advisory_lock(:key)"), {"key": key})
            connection.commit()

            def verify() -> None:
                try:
                    count = connection.execute(held, {"high": key >> 32, "low": key & 0xFFFF_FFFF}).scalar()
                    connection.commit()
                except sa.exc.SQLAlchemyError as error:  # the connection died: the server released the lock
                    raise LockUnavailable(f"lost the lake's lock ({error}): nothing more is written") from error
                if count != 1:
                    raise LockUnavailable("the lake's advisory lock is no longer held: nothing more is written")

            try:
                yield verify
            finally:
                with contextlib.suppress(sa.exc.SQLAlchemyError):  # (a dead connection holds nothing)
                    connection.execute(sa.text("SELECT pg_advisory_unlock(:key)"), {"key": key})
                    connection.commit()
    finally:
        engine.dispose()
