"""The lake: exactly-once ingestion of landing files into per-file batches (content-hash
ledger, pseudonymised ids, quarantine with reasons), per-batch validation, and reading the
validated feedback back. See docs/lake.md for the contract and the on-disk layout.
Validation of ingested batches is the ``ValidatedBatches`` part (``batches.py``); Parquet reads
and atomic writes are in ``tables.py``."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from rec_models.data.privacy import (
    KEY_ENV,
    SESSION_PREFIX,
    USER_PREFIX,
    existing_pseudonym_key,
    key_id,
    pseudonymize,
    resolve_pseudonym_key,
)
from rec_models.files import as_location, is_remote, sync_all, write_json_atomic
from rec_pipelines.lake.batches import GROUP_ROWS, ValidatedBatches
from rec_pipelines.lake.compaction import Compaction
from rec_pipelines.lake.conversion import (
    coerce_catalog,
    coerce_events,
    coerce_impressions,
    missing_event_columns,
)
from rec_pipelines.lake.landing import (
    KINDS,
    MARKER_SUFFIX,
    SUFFIXES,
    RefusedFile,
    RemoteLandingZone,
    file_sha256,
    is_final_name,
    is_supported,
    refusal,
    safe_stem,
)
from rec_pipelines.lake.ledger import Ledger
from rec_pipelines.lake.locks import lake_lock
from rec_pipelines.lake.parsing import (
    IngestLimits,
    ParsedFile,
    UnreadableFile,
    read_table,
)
from rec_pipelines.lake.reading import LakeReads
from rec_pipelines.lake.tables import (
    write_arrow_atomic,
    write_parquet_atomic,
)

LAKE_FORMAT = 2  # 1: before pseudonymisation and per-batch validation


class LakeError(RuntimeError):
    """The lake cannot be used as it is (written by an older version, or another key)."""




@dataclass
class IngestReport:
    """What one ``ingest`` call did."""

    kind: str
    files: list[str] = field(default_factory=list)
    batches: list[str] = field(default_factory=list)
    rows_in: int = 0
    duplicate_files: list[str] = field(default_factory=list)
    quarantined_files: list[dict] = field(default_factory=list)
    texts_truncated: int = 0

    def as_dict(self) -> dict:
        return {
            "kind": self.kind,
            "files": len(self.files),
            "batches": self.batches,
            "rows_in": self.rows_in,
            "duplicate_files": self.duplicate_files,
            "quarantined_files": self.quarantined_files,
            "texts_truncated": self.texts_truncated,
        }


class FeedbackStore(ValidatedBatches, Compaction, LakeReads):
    """Reads the landing zone into the lake and keeps the ledger of what was read.

    ``lake`` is a folder or an fsspec URL (``s3://bucket/lake``). ``pseudonym_key`` overrides
    the key otherwise taken from ``$RECSYS_PSEUDONYM_KEY`` or ``key_file`` (default
    ``<lake>/secrets/pseudonym.key`` for a local lake, generated on first use; a lake on object
    storage never keeps its key beside the data); ``limits`` caps the size of one file and of
    one line. ``lock``: see ``locks.lake_lock``. ``work``: a local folder for what stays on
    this machine (a remote landing zone's mirror, model bundles before upload); default the
    lake itself when it is local, else a folder under the system's temporary directory.
    """

    def __init__(self, landing_zone: Path | str, lake: Path | str, pseudonym_key: bytes | str | None = None,
                 key_file: Path | str | None = None, limits: IngestLimits | None = None, lock: str = "",
                 work: Path | str | None = None):
        self.limits = limits or IngestLimits()
        self.lake = as_location(lake)
        self.lock = lock
        self.work = Path(work) if work else local_work_folder(self.lake)
        self.remote = RemoteLandingZone(str(landing_zone), self.work / "landing-mirror") if is_remote(str(landing_zone)) else None
        self.landing_zone = self.remote.mirror if self.remote else Path(str(landing_zone).removeprefix("file://"))
        self.ledger_path = self.lake / "ledger.jsonl"
        self.key_file = Path(key_file) if key_file else (None if is_remote(self.lake) else key_file_of(self.lake))
        self._configured_key = pseudonym_key
        self._key: bytes | None = None
        self._verify_lock: Callable[[], None] = _unlocked

    @classmethod
    def from_settings(cls, settings, landing_zone: Path | str | None = None) -> FeedbackStore:
        """The store ``rec_pipelines.settings.Settings`` describe (``landing_zone`` overrides
        where files are read from)."""
        return cls(settings.landing_location if landing_zone is None else landing_zone, settings.lake,
                   key_file=settings.pseudonym_key_file, lock=settings.lake_lock, work=settings.lake_work,
                   limits=IngestLimits(settings.ingest_max_file_bytes, settings.ingest_max_line_bytes))

    # -- privacy -------------------------------------------------------------------------
    def pseudonym_key(self) -> bytes:
        if self._key is None:
            if is_remote(self.lake) and not self._configured_key:  # never generated: it would die with the pod
                self._key = existing_pseudonym_key(self.key_file)
                if self._key is None:
                    raise LakeError(f"the lake {self.lake} is on object storage: give its pseudonym key in {KEY_ENV} "
                                    "(e.g. from a secret store) or RECSYS_PSEUDONYM_KEY_FILE (a mounted secret; "
                                    f"{self.key_file or 'unset'} holds none)")
            else:
                self._key, _ = resolve_pseudonym_key(self.key_file, self._configured_key)
        return self._key

    def pseudonymizer(self) -> Callable:
        """``f(raw_user_ids) -> pseudonyms`` with this lake's key: what serving and evaluation
        call before looking up a user (a list in, a list out; a Series in, a Series out)."""
        key = self.pseudonym_key()
        return lambda user_ids: pseudonymize(user_ids, key, USER_PREFIX)

    # -- ledger --------------------------------------------------------------------------
    def ledger(self) -> list[dict]:
        return Ledger(self.ledger_path).entries()

    def _append_ledger(self, *entries: dict) -> None:
        self._verify_lock()  # (a lost PostgreSQL lock stops here, before the record)
        Ledger(self.ledger_path).append(*entries)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if not is_remote(self.lake):
            self.lake.mkdir(parents=True, exist_ok=True)
        with lake_lock(self.lake, self.lock) as verify:
            self._verify_lock = verify
            try:
                yield
            finally:
                self._verify_lock = _unlocked

    def _check_lake(self, entries: list[dict]) -> None:
        legacy = [e["file"] for e in entries if e["kind"] == "events" and e["status"] == "ingested" and "format" not in e]
        if legacy:
            raise LakeError(
                f"the lake {self.lake} was written by an older version (raw user ids, no per-batch validation), "
                f"e.g. {legacy[0]}: delete it (`make clean`) and the pipeline re-ingests the landing zone"
            )
        keys = {e["key_id"] for e in entries if e.get("key_id")}
        current = key_id(self.pseudonym_key())
        if keys and keys != {current}:
            raise LakeError(
                f"the pseudonym key changed (lake written with key id {sorted(keys)}, now {current}): every user "
                "would get a new pseudonym. Restore the key (RECSYS_PSEUDONYM_KEY or "
                f"{self.key_file}) or delete the lake to re-ingest under the new one"
            )

    # -- landing zone --------------------------------------------------------------------
    def _entries(self, kind: str) -> list[Path]:
        """Complete entries of ``kind`` (final name, no ``.writing`` marker; links and special
        files included, folders not), sorted; a remote zone is mirrored first."""
        if self.remote is not None:
            self.remote.sync(kind)
        folder = self.landing_zone / kind
        if not folder.is_dir():
            return []
        with os.scandir(folder) as listing:
            found = {entry.name: entry.is_dir(follow_symlinks=False) for entry in listing}
        return sorted(folder / name for name, is_dir in found.items()
                      if not is_dir and is_final_name(name) and name + MARKER_SUFFIX not in found)

    def ready_files(self, kind: str) -> list[Path]:
        """Complete regular landing files of ``kind`` (links and special files are never read)."""
        return [path for path in self._entries(kind) if refusal(path) is None]

    def _pending(self, kind: str, entries: list[dict]) -> list[tuple[Path, str | None]]:
        """(path, sha256) of complete entries the ledger has not seen; sha256 is None for a
        link or special file, which is refused by name."""
        entries = [e for e in entries if e["kind"] == kind]
        seen = {(e["file"], e["sha256"]) for e in entries}
        seen_stats = {(e["file"], e["size"], e.get("mtime_ns")) for e in entries}
        pending = []
        for path in self._entries(kind):
            try:
                rel, info = self._relative(path), os.lstat(path)
                # Cheap path first: an untouched file keeps name, size and mtime; hash only otherwise.
                if (rel, info.st_size, info.st_mtime_ns) in seen_stats:
                    continue
                sha = None if refusal(path) else file_sha256(path)
            except FileNotFoundError:  # gone since the listing
                continue
            except RefusedFile:  # swapped for a link since the listing
                sha = None
            if (rel, sha) not in seen:
                pending.append((path, sha))
        return pending

    def pending_files(self, kind: str) -> list[Path]:
        """Ready files whose (name, content) the ledger has not seen yet."""
        return [path for path, _ in self._pending(kind, self.ledger())]

    def _relative(self, path: Path) -> str:
        return path.relative_to(self.landing_zone).as_posix()

    # -- ingestion -----------------------------------------------------------------------
    def ingest(self, kind: str) -> IngestReport:
        """Move every pending file of ``kind`` into the lake, exactly once. Event files are
        converted together in groups of up to ``GROUP_ROWS`` records (one vectorised pass, so
        10,000 small files cost little more than one large one); each stays its own batch."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        with self._locked():
            entries = self.ledger()
            if kind == "events":
                self._check_lake(entries)
            report = IngestReport(kind=kind)
            known_hashes = {e["sha256"]: e["file"] for e in entries if e["kind"] == kind and e["status"] == "ingested"}
            group, rows = [], 0
            for path, sha in self._pending(kind, entries):
                read = self._read_file(kind, path, sha, known_hashes, report)
                if read is None:
                    continue
                if kind != "events":
                    self._ingest_whole_file(*read, report)
                    continue
                group.append(read)
                rows += read[2].records
                if rows >= GROUP_ROWS:
                    self._ingest_events(group, report)
                    group, rows = [], 0
            if group:
                self._ingest_events(group, report)
            return report

    def _read_file(self, kind: str, path: Path, sha: str | None, known_hashes: dict,
                   report: IngestReport) -> tuple[dict, str, ParsedFile] | None:
        """(ledger entry, batch id, records) of a file to ingest; None when it is a duplicate
        or was quarantined whole (both recorded in the ledger)."""
        rel, info = self._relative(path), os.lstat(path)
        report.files.append(rel)
        entry = {"kind": kind, "file": rel, "sha256": sha, "size": info.st_size,
                 "mtime_ns": info.st_mtime_ns, "ingested_at": time.time()}
        if sha in known_hashes:  # same bytes under another name: nothing new to read
            report.duplicate_files.append(rel)
            self._append_ledger({**entry, "status": "duplicate", "duplicate_of": known_hashes[sha]})
            return None
        try:
            if sha is None:
                raise UnreadableFile(refusal(path) or "not a regular file: never followed or read")
            if not is_supported(path):
                raise UnreadableFile(f"unsupported file type (expected {', '.join(SUFFIXES)}, optionally .gz)")
            parsed = read_table(path, self.limits)
            if kind == "events" and missing_event_columns(parsed):
                raise UnreadableFile(missing_event_columns(parsed))
        except (UnreadableFile, RefusedFile) as exc:
            self._quarantine_file(entry, path, str(exc), report)
            return None
        known_hashes[sha] = rel
        return entry, f"{safe_stem(path.name)}-{sha[:8]}", parsed

    def _quarantine_file(self, entry: dict, path: Path, reason: str, report: IngestReport) -> None:
        """Record a whole file as quarantined, by name (the record never holds its bytes)."""
        report.quarantined_files.append({"file": entry["file"], "reason": reason})
        # Named by a digest: any name the filesystem allows is fine.
        digest = entry["sha256"] or hashlib.sha256(json.dumps(entry, sort_keys=True).encode()).hexdigest()
        write_json_atomic(self.lake / "quarantine" / "files" / entry["kind"] / f"{safe_stem(path.name)}-{digest[:16]}.json",
                          {**entry, "reason": reason, "replay_from": str(path)})
        self._append_ledger({**entry, "status": "quarantined", "reason": reason})

    def _ingest_events(self, group: list[tuple[dict, str, ParsedFile]], report: IngestReport) -> None:
        """Convert and pseudonymise the files of ``group`` together, then write one batch per
        file and their ledger entries (after the batches are on disk)."""
        table, _ = coerce_events([parsed for _, _, parsed in group])
        key = self.pseudonym_key()
        table["user_id"] = pseudonymize(table["user_id"], key, USER_PREFIX)
        table["session_id"] = pseudonymize(table["session_id"], key, SESSION_PREFIX)
        parts, truncated = table.pop("part").to_numpy(), table.pop("text_truncated").to_numpy()
        bounds = np.searchsorted(parts, np.arange(len(group) + 1))  # rows are sorted by file
        table.insert(0, "batch_id", np.repeat([batch_id for _, batch_id, _ in group], np.diff(bounds)))
        arrow = pa.Table.from_pandas(table, preserve_index=False)
        done = []
        for (entry, batch_id, _), start, stop in zip(group, bounds[:-1], bounds[1:]):
            write_arrow_atomic(arrow.slice(start, stop - start), self.lake / "events" / f"{batch_id}.parquet",
                                durable=False)
            extra = {"rows": int(stop - start), "key_id": key_id(key), "texts_truncated": int(truncated[start:stop].sum())}
            report.batches.append(batch_id)
            report.rows_in += extra["rows"]
            report.texts_truncated += extra["texts_truncated"]
            done.append({**entry, "status": "ingested", "batch_id": batch_id, "format": LAKE_FORMAT, **extra})
        sync_all(self.lake)  # every batch on disk (one sync, not one per file) before the ledger names them
        self._append_ledger(*done)

    def _ingest_whole_file(self, entry: dict, batch_id: str, parsed: ParsedFile, report: IngestReport) -> None:
        """A catalog or impressions file: its valid rows one batch, its bad rows quarantined."""
        try:
            rows, rejected = (coerce_catalog if entry["kind"] == "catalog" else coerce_impressions)(parsed)
        except UnreadableFile as exc:
            self._quarantine_file(entry, self.landing_zone / entry["file"], str(exc), report)
            return
        extra = self._write_batch(entry["kind"], batch_id, rows, rejected)
        report.batches.append(batch_id)
        report.rows_in += extra["rows"]
        self._append_ledger({**entry, "status": "ingested", "batch_id": batch_id, "format": LAKE_FORMAT, **extra})

    def _write_batch(self, kind: str, batch_id: str, rows: pd.DataFrame, rejected: pd.DataFrame) -> dict:
        rows.insert(0, "batch_id", batch_id)
        if len(rejected):
            folder = self.lake / "quarantine" / ("rows" if kind == "catalog" else kind)
            write_parquet_atomic(rejected.assign(batch_id=batch_id), folder / f"{batch_id}.parquet")
        write_parquet_atomic(rows, self.lake / kind / f"{batch_id}.parquet")
        return {"rows": len(rows) + len(rejected), "rows_valid": len(rows), "rows_quarantined": len(rejected)}


def _unlocked() -> None:
    """``_verify_lock`` outside a locked block: records are written under the lock only."""


def local_work_folder(lake) -> Path:
    """The local folder for what a lake keeps on this machine: the lake itself when local."""
    if not is_remote(lake):
        return Path(lake)
    digest = hashlib.sha256(str(lake).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"recsys-lake-{digest}"


def key_file_of(lake: Path | str) -> Path:
    """Where a lake keeps its generated pseudonym key (when ``$RECSYS_PSEUDONYM_KEY`` is unset)."""
    return Path(lake) / "secrets" / "pseudonym.key"


def load_pseudonym_key(lake: Path | str) -> bytes:
    """The key a lake's user ids are pseudonymised with ($RECSYS_PSEUDONYM_KEY or the lake's
    key file): ``rec_models.data.privacy.pseudonymize(raw_ids, load_pseudonym_key(lake))`` gives the
    ids the lake, the training data and the served model know users by. Never creates a key:
    a lake without one has ingested nothing (LakeError)."""
    key_file = None if is_remote(lake) else key_file_of(lake)
    key = existing_pseudonym_key(key_file)
    if key is None:
        where = f"{key_file} does not exist (nothing ingested yet)" if key_file else f"{lake} keeps no key file"
        raise LakeError(f"no pseudonym key: {KEY_ENV} is not set and {where}")
    return key
