"""Landing zone → lake: the one place that reads feedback files and remembers what it read.

Contract for producers: drop finished files into ``<landing>/events/`` (feedback) or
``<landing>/catalog/`` (new or changed items). A file is only picked up once it has its final
name: write it under a hidden name (starting with ``.``) or with a ``.tmp``/``.part`` suffix
and rename it into place (``os.replace`` is atomic on one filesystem). Supported formats:
JSON Lines (``.jsonl``/``.ndjson``/``.json``), CSV and Parquet, each optionally gzipped.

What was read is recorded in an append-only ledger (``<lake>/ledger.jsonl``): one line per
file with its content hash, so a file is ingested exactly once however often the pipeline runs,
and a file whose content changed under the same name counts as new. Raw files stay in the
landing zone so any batch can be replayed. A file that cannot be parsed is quarantined whole
(copied to ``<lake>/quarantine/files/`` with its reason in the ledger); the others go on.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from rec_models.schema import CATALOG_COLUMNS, EVENT_COLUMNS, EVENT_DTYPES, REQUIRED_EVENT_COLUMNS

KINDS = ("events", "catalog")
SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".parquet", ".pq")


class UnreadableFile(ValueError):
    """A landing file that cannot be turned into rows at all; the message is the reason."""


def is_ready(path: Path) -> bool:
    """Whether a landing-zone file is complete (final name, supported format)."""
    name = path.name
    if name.startswith(".") or name.endswith((".tmp", ".part")):
        return False
    base = name[:-3] if name.endswith(".gz") else name
    return path.is_file() and base.endswith(SUFFIXES)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_table(path: Path) -> pd.DataFrame:
    """Parse one landing file by its suffix; raise UnreadableFile with a clear reason."""
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    compression = "gzip" if path.name.endswith(".gz") else None
    try:
        if path.stat().st_size == 0:
            raise UnreadableFile("empty file")
        if name.endswith((".parquet", ".pq")):
            frame = pd.read_parquet(path)
        elif name.endswith(".csv"):
            frame = pd.read_csv(path, compression=compression, dtype=str, keep_default_na=False, na_values=[""])
        else:
            frame = pd.read_json(path, lines=True, compression=compression, dtype=False)
    except UnreadableFile:
        raise
    except Exception as exc:  # parser errors come in many types; all mean "cannot read"
        raise UnreadableFile(f"cannot parse {path.name}: {type(exc).__name__}: {exc}".strip()[:500]) from exc
    if frame.empty:
        raise UnreadableFile("no rows")
    return frame


def coerce_events(frame: pd.DataFrame) -> pd.DataFrame:
    """Shape a parsed events table to the event schema. Values that do not convert become
    missing (row validation then quarantines them); missing required columns fail the file."""
    missing = [c for c in REQUIRED_EVENT_COLUMNS if c not in frame.columns]
    if missing:
        raise UnreadableFile(f"missing required columns {missing}; found {sorted(map(str, frame.columns))}")
    out = pd.DataFrame(index=frame.index)
    for column in EVENT_COLUMNS:
        raw = frame[column] if column in frame.columns else pd.Series(pd.NA, index=frame.index)
        dtype = EVENT_DTYPES[column]
        if column == "timestamp":
            out[column] = pd.to_numeric(raw, errors="coerce").astype("Float64").round().astype("Int64")
        elif dtype == "float64":
            out[column] = pd.to_numeric(raw, errors="coerce").astype("float64")
        else:
            out[column] = raw.astype("string").str.strip().replace("", pd.NA)
    return out.reset_index(drop=True)


def coerce_catalog(frame: pd.DataFrame) -> pd.DataFrame:
    if "item_id" not in frame.columns or "title" not in frame.columns:
        raise UnreadableFile(f"catalog files need item_id and title; found {sorted(map(str, frame.columns))}")
    out = pd.DataFrame(index=frame.index)
    for column in CATALOG_COLUMNS:
        raw = frame[column] if column in frame.columns else pd.Series(pd.NA, index=frame.index)
        if column == "tags":
            out[column] = [_as_tag_list(value) for value in raw]
        else:
            out[column] = raw.astype("string").str.strip()
    out = out[out["item_id"].notna() & (out["item_id"] != "")]
    return out.reset_index(drop=True)


def _as_tag_list(value) -> list[str]:
    if isinstance(value, (list, tuple, np.ndarray)):
        return [str(v) for v in value if v is not None and str(v)]
    if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)):
        return []
    return [t.strip() for t in str(value).split("|") if t.strip()]


@dataclass
class IngestReport:
    kind: str
    files: list[str] = field(default_factory=list)
    batches: list[str] = field(default_factory=list)
    rows_in: int = 0
    duplicate_files: list[str] = field(default_factory=list)
    quarantined_files: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "kind": self.kind,
            "files": len(self.files),
            "batches": self.batches,
            "rows_in": self.rows_in,
            "duplicate_files": self.duplicate_files,
            "quarantined_files": self.quarantined_files,
        }


class FeedbackStore:
    """Reads the landing zone into the lake and keeps the ledger of what was read."""

    def __init__(self, landing_zone: Path | str, lake: Path | str):
        self.landing_zone = Path(landing_zone)
        self.lake = Path(lake)
        self.ledger_path = self.lake / "ledger.jsonl"

    # -- ledger --------------------------------------------------------------------------
    def ledger(self) -> list[dict]:
        if not self.ledger_path.exists():
            return []
        with open(self.ledger_path, encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]

    def _append_ledger(self, entry: dict) -> None:
        self.lake.mkdir(parents=True, exist_ok=True)
        with open(self.ledger_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    # -- landing zone --------------------------------------------------------------------
    def ready_files(self, kind: str) -> list[Path]:
        folder = self.landing_zone / kind
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.iterdir() if is_ready(p))

    def pending_files(self, kind: str) -> list[Path]:
        """Ready files whose (name, content) the ledger has not seen yet."""
        entries = [e for e in self.ledger() if e["kind"] == kind]
        seen = {(e["file"], e["sha256"]) for e in entries}
        seen_stats = {(e["file"], e["size"], e.get("mtime_ns")) for e in entries}
        pending = []
        for path in self.ready_files(kind):
            rel, stat = self._relative(path), path.stat()
            # Cheap path first: an untouched file keeps name, size and mtime; hash only otherwise.
            if (rel, stat.st_size, stat.st_mtime_ns) in seen_stats or (rel, file_sha256(path)) in seen:
                continue
            pending.append(path)
        return pending

    def _relative(self, path: Path) -> str:
        return path.relative_to(self.landing_zone).as_posix()

    # -- ingestion -----------------------------------------------------------------------
    def ingest(self, kind: str) -> IngestReport:
        """Move every pending file of ``kind`` into the lake, exactly once."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        report = IngestReport(kind=kind)
        known_hashes = {e["sha256"]: e["file"] for e in self.ledger() if e["kind"] == kind}
        for path in self.pending_files(kind):
            rel, sha = self._relative(path), file_sha256(path)
            report.files.append(rel)
            stat = path.stat()
            entry = {"kind": kind, "file": rel, "sha256": sha, "size": stat.st_size,
                     "mtime_ns": stat.st_mtime_ns, "ingested_at": time.time()}
            if sha in known_hashes:  # same bytes under another name: nothing new to read
                report.duplicate_files.append(rel)
                self._append_ledger({**entry, "status": "duplicate", "duplicate_of": known_hashes[sha]})
                continue
            try:
                raw = read_table(path)
                table = coerce_events(raw) if kind == "events" else coerce_catalog(raw)
            except UnreadableFile as exc:
                self._quarantine_file(path)
                report.quarantined_files.append({"file": rel, "reason": str(exc)})
                self._append_ledger({**entry, "status": "quarantined", "reason": str(exc)})
                continue
            batch_id = f"{Path(rel).name.split('.')[0]}-{sha[:8]}"
            table.insert(0, "batch_id", batch_id)
            _write_parquet_atomic(table, self.lake / kind / f"{batch_id}.parquet")
            report.batches.append(batch_id)
            report.rows_in += len(table)
            known_hashes[sha] = rel
            self._append_ledger({**entry, "status": "ingested", "batch_id": batch_id, "rows": len(table)})
        return report

    def _quarantine_file(self, path: Path) -> None:
        target = self.lake / "quarantine" / "files" / self._relative(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)

    # -- reading the lake ----------------------------------------------------------------
    def batches(self, kind: str) -> list[str]:
        """Ingested batch ids of ``kind`` in ingestion order."""
        return [e["batch_id"] for e in self.ledger() if e["kind"] == kind and e["status"] == "ingested"]

    def read(self, kind: str) -> pd.DataFrame:
        """Every ingested row of ``kind`` in ingestion order (with a ``batch_id`` column)."""
        frames = [pd.read_parquet(self.lake / kind / f"{b}.parquet") for b in self.batches(kind)]
        if not frames:
            columns = ["batch_id", *(EVENT_COLUMNS if kind == "events" else CATALOG_COLUMNS)]
            return pd.DataFrame(columns=columns)
        return pd.concat(frames, ignore_index=True)

    def catalog(self) -> pd.DataFrame:
        """The current catalog: later entries for an item replace earlier ones."""
        rows = self.read("catalog")
        rows = rows.drop_duplicates("item_id", keep="last").reset_index(drop=True)
        rows["tags"] = [_as_tag_list(v) for v in rows["tags"]]
        return rows

    def write_quarantined_rows(self, batch_id: str, rows: pd.DataFrame) -> Path:
        path = self.lake / "quarantine" / "rows" / f"{batch_id}.parquet"
        _write_parquet_atomic(rows, path)
        return path


def _write_parquet_atomic(frame: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    frame.to_parquet(tmp, index=False)
    os.replace(tmp, path)
