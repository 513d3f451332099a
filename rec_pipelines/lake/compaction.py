"""Compaction of the validated events: each micro-batch adds one small Parquet file, and every
read of the history opens every file, so runs of consecutive small batches are merged into
files of up to ``target_rows`` rows. Each batch stays its own unit: its rows keep their
``batch_id``, its accounting stays in ``<lake>/validated/<batch_id>.json``, and before a
compacted batch is validated again or rejected its file is split back into one file per batch
(``uncompact``). The manifest ``<lake>/validated/compacted.json`` (``tables.compaction_manifest``)
says which file holds which batches; readers resolve batches through it
(``ValidatedEvents.sources``). Replaced files are deleted one compaction later, so a reader that
listed them a moment before still finds them."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterable

import pyarrow as pa
import pyarrow.compute as pc

from rec_models.files import sync_all, write_json_atomic
from rec_pipelines.lake.tables import (
    COMPACTION_MANIFEST,
    compaction_manifest,
    read_arrow,
    write_arrow_atomic,
)

COMPACT_MIN_FILES = 64
"""Compact once at least this many small batch files are waiting (a few reads' worth of file
opens: at 64 files of 2,000 rows, reading them costs about what one 128k-row file costs)."""
COMPACT_TARGET_ROWS = 1_000_000
"""Rows a compacted file gathers at most; batches this large already are left as they are."""


class Compaction:
    """Mixed into ``FeedbackStore``: uses its ``lake``, ``ledger()``, ``account()``,
    ``_locked()`` and ``_verify_lock``."""

    def compact(self, *, min_files: int = COMPACT_MIN_FILES, target_rows: int = COMPACT_TARGET_ROWS) -> dict:
        """Merge runs of consecutive small validated batches (in ingestion order, up to the
        first batch not validated yet; a rejected, already compacted or large batch ends a run)
        into files of at most ``target_rows`` rows, once at least ``min_files`` small files
        wait. Returns what it did: ``compacted_batches``, ``files_written``, ``small_files``
        (waiting before), ``retired_deleted`` (files replaced by the previous compaction),
        ``orphans_deleted`` (files a compaction that died before its manifest left behind)."""
        if min_files < 2 or target_rows < 1:
            raise ValueError(f"min_files must be at least 2 and target_rows at least 1, got {min_files}, {target_rows}")
        with self._locked():
            manifest = compaction_manifest(self.lake)
            deleted = self._delete_retired(manifest)
            orphans = self._delete_orphans(manifest)
            home = {b for entry in manifest["files"] for b in entry["batches"]}
            runs, run = [], []
            for entry in self.ledger():
                if entry["kind"] != "events" or entry["status"] != "ingested":
                    continue
                account = self.account(entry["batch_id"])
                if account is None:  # not validated yet: nothing after it either (keeps files in ingestion order)
                    break
                if entry["batch_id"] in home or account.get("rejected") or account["rows_valid"] >= target_rows:
                    runs, run = runs + [run], []
                else:
                    run.append((entry["batch_id"], int(account["rows_valid"])))
            runs.append(run)
            small = sum(map(len, runs))
            groups = [group for r in runs for group in _groups(r, target_rows) if len(group) > 1] if small >= min_files else []
            written = []
            for group in groups:
                name = f"compacted/{group[0]}+{len(group) - 1}-{uuid.uuid4().hex[:8]}.parquet"
                rows = read_arrow([self.lake / "validated" / f"{batch}.parquet" for batch in group])
                write_arrow_atomic(rows, self.lake / "validated" / name, durable=False)
                written.append({"name": name, "batches": group})
            if written or deleted:
                sync_all(self.lake)  # the new files on disk before the manifest names them
                self._verify_lock()
                replaced = [f"{batch}.parquet" for group in groups for batch in group]
                self._write_manifest({"files": manifest["files"] + written, "retired": replaced})
            return {"compacted_batches": sum(map(len, groups)), "files_written": len(written), "small_files": small,
                    "retired_deleted": deleted, "orphans_deleted": orphans}

    def uncompact(self, batch_ids: Iterable[str]) -> list[str]:
        """Split the compacted files holding any of ``batch_ids`` back into one file per batch
        (before one of them is validated again or rejected); returns the files split. The
        caller holds the lake's lock."""
        wanted = set(batch_ids)
        manifest = compaction_manifest(self.lake)
        hit = [entry for entry in manifest["files"] if wanted & set(entry["batches"])]
        if not hit:
            return []
        for entry in hit:
            rows = read_arrow([self.lake / "validated" / entry["name"]])
            ids = rows["batch_id"].cast(pa.string())
            for batch in entry["batches"]:
                write_arrow_atomic(rows.filter(pc.equal(ids, batch)), self.lake / "validated" / f"{batch}.parquet",
                                   durable=False)
        sync_all(self.lake)
        self._verify_lock()
        split = {entry["name"] for entry in hit}
        live = {f"{batch}.parquet" for entry in hit for batch in entry["batches"]}
        self._write_manifest({"files": [e for e in manifest["files"] if e["name"] not in split],
                              "retired": [n for n in manifest["retired"] if n not in live] + sorted(split)})
        return sorted(split)

    def _delete_retired(self, manifest: dict) -> int:
        """Delete the files the previous compaction (or split) replaced, unless one is in use
        again (a batch file rewritten by ``uncompact``); they leave the manifest's list with the
        next manifest written."""
        home = {b for entry in manifest["files"] for b in entry["batches"]}
        names = {entry["name"] for entry in manifest["files"]}
        deleted = 0
        for name in manifest["retired"]:
            in_use = name in names if name.startswith("compacted/") else name.removesuffix(".parquet") not in home
            if not in_use:
                with contextlib.suppress(FileNotFoundError):
                    (self.lake / "validated" / name).unlink()
                    deleted += 1
        return deleted

    def _delete_orphans(self, manifest: dict) -> int:
        """Delete what ``validated/compacted/`` holds that the manifest names neither as in use
        nor as retired: the files (or temporaries) of a compaction that died before it wrote its
        manifest, which no reader was ever pointed to. Only the lock's holder writes there."""
        folder = self.lake / "validated" / "compacted"
        if not folder.exists():
            return 0
        known = {entry["name"] for entry in manifest["files"]} | set(manifest["retired"])
        deleted = 0
        for path in folder.iterdir():
            if f"compacted/{path.name}" not in known:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    deleted += 1
        return deleted

    def _write_manifest(self, manifest: dict) -> None:
        write_json_atomic(self.lake / "validated" / COMPACTION_MANIFEST, manifest)


def _groups(run: list[tuple[str, int]], target_rows: int) -> list[list[str]]:
    """Consecutive batches of ``run`` cut into groups of at most ``target_rows`` rows."""
    groups, group, rows = [], [], 0
    for batch, count in run:
        if group and rows + count > target_rows:
            groups.append(group)
            group, rows = [], 0
        group.append(batch)
        rows += count
    return groups + [group] if group else groups
