"""The landing zone: which files are complete (final name, no ``.writing`` marker), opening
them without ever leaving the zone (no symlink followed, no special file read), content
fingerprints, safe names derived from any file name, and the mirror of a remote (fsspec)
zone. The contract is in docs/lake.md."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
from pathlib import Path

from rec_models.files import atomic_path, write_json_atomic

KINDS = ("events", "catalog", "impressions")
SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".parquet", ".pq")
MARKER_SUFFIX = ".writing"
IN_PROGRESS_SUFFIXES = (".tmp", ".part", MARKER_SUFFIX)


def is_final_name(name: str) -> bool:
    """Whether a file name is a final one (not hidden, no ``.tmp``/``.part`` suffix, not a marker)."""
    return not (name.startswith(".") or name.endswith(IN_PROGRESS_SUFFIXES))


def is_ready(path: Path) -> bool:
    """Whether a landing-zone file is complete: a regular file (not a link) with its final name
    and no ``<name>.writing`` marker."""
    return (is_final_name(path.name) and refusal(path) is None
            and not os.path.lexists(path.with_name(path.name + MARKER_SUFFIX)))


class RefusedFile(ValueError):
    """A landing-zone entry that is never read (a link, a FIFO, a device...): the message says
    what it is."""


_SPECIAL = ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
            (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder"))


def _refusal_of(mode: int) -> str | None:
    what = next((text for test, text in _SPECIAL if test(mode)), None if stat.S_ISREG(mode) else "not a regular file")
    return f"{what}, not a regular file: never followed or read (land the file itself)" if what else None


def refusal(path: Path) -> str | None:
    """Why ``path`` is not read (a link or special file, judged without following it); None for
    a regular file."""
    return _refusal_of(os.lstat(path).st_mode)


def open_landing_file(path: Path):
    """Open a landing file for reading in binary mode without following a symlink and without
    blocking on a FIFO; RefusedFile when it is not a regular file (checked on the opened file,
    so a swap between listing and opening cannot lead outside the zone)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        if exc.errno == 40:  # ELOOP: the last component is a symlink
            raise RefusedFile(_refusal_of(stat.S_IFLNK)) from None
        raise
    reason = _refusal_of(os.fstat(fd).st_mode)
    if reason:
        os.close(fd)
        raise RefusedFile(reason)
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def safe_stem(name: str, max_chars: int = 60) -> str:
    """A short ASCII stem for ids and file names derived from any file name (newlines,
    non-UTF-8 bytes and 255-byte names included): its letters, digits, ``_`` and ``-``."""
    stem = name.split(".")[0] if not name.startswith(".") else name
    return re.sub(r"[^A-Za-z0-9_-]+", "_", stem)[:max_chars].strip("_") or "file"


def printable(name: str) -> str:
    """A file name for logs: control characters and undecodable bytes escaped, one line."""
    return json.dumps(name)[1:-1]


class RemoteLandingZone:
    """An fsspec landing zone, mirrored file by file into a local folder.

    ``sync(kind)`` downloads every complete remote file of ``kind`` that is new or changed
    (size and modification time / ETag differ from the last download) to the mirror, under a
    hidden temporary name first, so the mirror only ever holds complete files.
    """

    def __init__(self, url: str, mirror: Path):
        import fsspec

        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.mirror = Path(mirror)
        self.index_path = self.mirror / ".remote-index.json"

    @staticmethod
    def _version(info: dict) -> str:
        stamp = next((info[k] for k in ("mtime", "LastModified", "last_modified", "ETag", "etag", "created", "updated")
                      if info.get(k) is not None), "")
        return f"{info.get('size')}:{stamp}"

    def sync(self, kind: str) -> list[str]:
        """Download what is new in ``<url>/<kind>``; returns the mirrored names it fetched."""
        try:
            listing = self.fs.ls(f"{self.root}/{kind}", detail=True)
        except FileNotFoundError:
            return []
        files = {info["name"].rstrip("/").rsplit("/", 1)[-1]: info for info in listing if info.get("type") == "file"}
        index = json.loads(self.index_path.read_text()) if self.index_path.exists() else {}
        fetched = []
        folder = self.mirror / kind
        for name, info in sorted(files.items()):
            if not is_final_name(name) or name + MARKER_SUFFIX in files:
                continue
            key, version = f"{kind}/{name}", self._version(info)
            if index.get(key) == version and (folder / name).exists():
                continue
            with atomic_path(folder / name) as tmp:
                self.fs.get_file(info["name"], str(tmp))
            index[key] = version
            fetched.append(key)
        if fetched:
            write_json_atomic(self.index_path, index)
        return fetched


def is_supported(path: Path) -> bool:
    """Whether the file's name says a format the store reads."""
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    return name.lower().endswith(SUFFIXES)


def file_sha256(path: Path) -> str:
    """SHA-256 of a landing file's bytes (RefusedFile for links and special files)."""
    with open_landing_file(path) as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def fingerprint(path: Path) -> str:
    """Cheap identity of a file's current content: size and modification time (of the entry
    itself, a link is not followed)."""
    info = os.lstat(path)
    return f"{info.st_size}:{info.st_mtime_ns}"


# --- writing into the landing zone (as producers must) -------------------------------------


def _source_sha256(path: Path) -> str:
    with open(path, "rb") as handle:  # a file outside the zone that the caller named
        return hashlib.file_digest(handle, "sha256").hexdigest()


def place(source: Path, folder: Path, durable: bool = True) -> Path:
    """Copy ``source`` into ``folder`` atomically (hidden temp name, then ``os.replace``);
    returns the final path. Identical content already there is left as it is. ``durable=False``:
    no fsync (the caller syncs once after placing many files)."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / source.name
    if os.path.lexists(target):
        if refusal(target) is None and file_sha256(target) == _source_sha256(source):
            return target
        stem, _, suffix = source.name.partition(".")
        stem = os.fsdecode(os.fsencode(stem)[: 255 - 10 - len(os.fsencode(suffix))]) if suffix else stem[:240]
        target = folder / (f"{stem}-{_source_sha256(source)[:8]}.{suffix}" if suffix else f"{stem}-{_source_sha256(source)[:8]}")
        if os.path.lexists(target):
            return target
    with atomic_path(target, durable=durable) as tmp:
        shutil.copyfile(source, tmp)
    return target


def place_movielens(folder: Path, landing_zone: Path) -> list[Path]:
    """Land a MovieLens folder: ratings as an events Parquet file, movies as a catalog one."""
    import tempfile

    from rec_models.data.movielens import load_movielens

    data = load_movielens(folder)
    placed = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind, frame in (("catalog", data.catalog), ("events", data.events)):
            path = Path(tmp) / f"movielens-{folder.resolve().name}.parquet"
            frame.to_parquet(path, index=False)
            placed.append(place(path, landing_zone / kind))
    return placed
