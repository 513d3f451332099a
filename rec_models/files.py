"""Atomic file writes: the one helper every writer of the project uses, so a reader (the
sensor, a loader, another process) sees either the old file or the complete new one.

A location is a local path or an fsspec URL (``s3://bucket/prefix``): ``as_location`` makes
the first a ``pathlib.Path`` and the second a ``upath.UPath`` with the same ``/``, ``open``,
``exists`` and ``unlink``, so the lake's code is the same for both. On object storage a
write is atomic by itself (an object appears whole on PUT): ``atomic_path`` writes a local
temporary file and uploads it."""

from __future__ import annotations

import json
import os
import secrets
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: Path | str, *, exclusive: bool = False, mode: int | None = None,
                durable: bool = True) -> Iterator[Path]:
    """Yield a hidden temporary path beside ``path``; when the block ends without error the
    temporary file is flushed to disk and renamed to ``path`` (``os.replace``), else removed.

    ``exclusive``: never replace an existing ``path`` (``os.link``; raises FileExistsError,
    e.g. when another process created it first). ``mode``: permissions of the new file.
    ``durable=False`` skips the fsync: for writers of many files that call ``os.sync()`` once
    before recording them anywhere.
    """
    if is_remote(path):
        with _remote_atomic_path(as_location(path), exclusive) as tmp:
            yield tmp
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    head = os.fsdecode(os.fsencode(path.name)[:200])  # the temporary name stays within NAME_MAX (255 bytes)
    tmp = path.with_name(f".{head}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    if mode is not None:  # created with its final permissions before anything is written
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode))
    try:
        yield tmp
        if durable:
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
        if exclusive:
            os.link(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def is_remote(location) -> bool:
    """Whether ``location`` (a path, a ``UPath`` or a string) is on a remote filesystem."""
    if hasattr(location, "protocol"):  # a UPath
        return location.protocol not in ("", "file", "local")
    if isinstance(location, Path):
        return False
    text = str(location)
    return "://" in text and not text.startswith("file://")


def as_location(location: Path | str):
    """A local path as ``Path``; an fsspec URL (``s3://...``) as ``upath.UPath``."""
    if isinstance(location, Path) or hasattr(location, "protocol"):
        return location
    if is_remote(location):
        from upath import UPath

        return UPath(str(location).rstrip("/"))
    return Path(str(location).removeprefix("file://"))


def sync_all(location) -> None:
    """Make every file written so far durable (``os.sync``) before a record names them; a
    no-op on object storage, where an upload is durable once it returns."""
    if not is_remote(location):
        os.sync()


def parquet_source(path):
    """What ``pyarrow.parquet`` reads ``path`` from: the path itself when local, the object's
    bytes when remote (one GET, not many small range requests)."""
    if not is_remote(path):
        return path
    import pyarrow as pa

    return pa.BufferReader(path.read_bytes())


@contextmanager
def _remote_atomic_path(path, exclusive: bool) -> Iterator[Path]:
    if exclusive:
        raise ValueError(f"exclusive writes are not supported on {path}")
    with tempfile.TemporaryDirectory(prefix="recsys-upload-") as folder:
        tmp = Path(folder) / "object"
        yield tmp
        path.fs.put_file(str(tmp), path.path)


def write_bytes_atomic(path: Path | str, data: bytes, *, exclusive: bool = False, mode: int | None = None,
                       durable: bool = True) -> Path:
    with atomic_path(path, exclusive=exclusive, mode=mode, durable=durable) as tmp:
        tmp.write_bytes(data)
    return as_location(path)


def write_text_atomic(path: Path | str, text: str, **kwargs) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"), **kwargs)


def write_json_atomic(path: Path | str, data, **kwargs) -> Path:
    return write_text_atomic(path, json.dumps(data, sort_keys=True, default=str), **kwargs)
