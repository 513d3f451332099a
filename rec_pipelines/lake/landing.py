"""The landing zone: which files are complete (final name, no ``.writing`` marker), content
fingerprints, and the mirror of a remote (fsspec) zone. The contract is in docs/lake.md."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from rec_models.files import atomic_path, write_json_atomic

KINDS = ("events", "catalog")
SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".parquet", ".pq")
MARKER_SUFFIX = ".writing"
IN_PROGRESS_SUFFIXES = (".tmp", ".part", MARKER_SUFFIX)


def is_final_name(name: str) -> bool:
    """Whether a file name is a final one (not hidden, no ``.tmp``/``.part`` suffix, not a marker)."""
    return not (name.startswith(".") or name.endswith(IN_PROGRESS_SUFFIXES))


def is_ready(path: Path) -> bool:
    """Whether a landing-zone file is complete: a regular file with its final name and no
    ``<name>.writing`` marker."""
    return is_final_name(path.name) and path.is_file() and not path.with_name(path.name + MARKER_SUFFIX).exists()


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
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def fingerprint(path: Path) -> str:
    """Cheap identity of a file's current content: size and modification time."""
    stat = path.stat()
    return f"{stat.st_size}:{stat.st_mtime_ns}"


# --- writing into the landing zone (as producers must) -------------------------------------


def place(source: Path, folder: Path) -> Path:
    """Copy ``source`` into ``folder`` atomically (hidden temp name, then ``os.replace``);
    returns the final path. Identical content already there is left as it is."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / source.name
    if target.exists():
        if file_sha256(target) == file_sha256(source):
            return target
        stem, _, suffix = source.name.partition(".")
        target = folder / f"{stem}-{file_sha256(source)[:8]}.{suffix}" if suffix else folder / f"{stem}-{file_sha256(source)[:8]}"
        if target.exists():
            return target
    with atomic_path(target) as tmp:
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
