"""Atomic file writes: the one helper every writer of the project uses, so a reader (the
sensor, a loader, another process) sees either the old file or the complete new one."""

from __future__ import annotations

import json
import os
import secrets
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


def write_bytes_atomic(path: Path | str, data: bytes, *, exclusive: bool = False, mode: int | None = None,
                       durable: bool = True) -> Path:
    with atomic_path(path, exclusive=exclusive, mode=mode, durable=durable) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: Path | str, text: str, **kwargs) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"), **kwargs)


def write_json_atomic(path: Path | str, data, **kwargs) -> Path:
    return write_text_atomic(path, json.dumps(data, sort_keys=True, default=str), **kwargs)
