"""Reading one landing file (JSON Lines, JSON, CSV, Parquet; gzipped or not) into records,
within size limits (``IngestLimits``), every record kept with its problem if any; turning
records into the lake's schemas is ``conversion.py``."""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from rec_models.data.schema import (
    EVENT_COLUMNS,
    OPTIONAL_EVENT_COLUMNS,
)
from rec_pipelines.lake.landing import open_landing_file

ROW_COLUMNS = ["batch_id", "source_row", *EVENT_COLUMNS, *OPTIONAL_EVENT_COLUMNS]
TEXT_COLUMNS = ["user_id", "item_id", "event_type", "session_id", "text", "title", "description", "category", "tags",
                "request_id", "model_version", "arm"]


class UnreadableFile(ValueError):
    """A landing file that cannot be turned into rows at all; the message is the reason."""


@dataclass(frozen=True)
class IngestLimits:
    """How large one landing file may be once decompressed, and one line of it (JSON Lines,
    CSV); larger files are quarantined with the reason, never read whole."""

    max_file_bytes: int = 1 << 30
    max_line_bytes: int = 1 << 20



@dataclass
class ParsedFile:
    """The records of one file: ``data`` holds those that parsed, as a frame with
    ``source_row`` (1-based position among the file's non-blank records) or, from Arrow's
    readers, as a table in file order (``frame`` converts it); ``bad`` the (source_row,
    reason) of those that did not."""

    data: pd.DataFrame | pa.Table
    bad: list[tuple[int, str]] = field(default_factory=list)

    @property
    def frame(self) -> pd.DataFrame:
        if isinstance(self.data, pa.Table):
            self.data = _arrow_frame(self.data)
        return self.data

    @property
    def columns(self) -> list[str]:
        names = self.data.column_names if isinstance(self.data, pa.Table) else list(self.data.columns)
        return [name for name in names if name != "source_row"]

    @property
    def rows(self) -> int:
        return len(self.data)

    @property
    def records(self) -> int:
        return self.rows + len(self.bad)


def _format(path: Path) -> tuple[str, bool]:
    gz = path.name.endswith(".gz")
    name = (path.name[:-3] if gz else path.name).lower()
    if name.endswith((".parquet", ".pq")):
        return "parquet", gz
    if name.endswith(".csv"):
        return "csv", gz
    return ("json" if name.endswith(".json") else "jsonl"), gz


def _arrow_frame(table: pa.Table) -> pd.DataFrame:
    frame = table.to_pandas(types_mapper=pd.ArrowDtype)
    frame.insert(0, "source_row", np.arange(1, len(frame) + 1))
    return frame


def read_table(path: Path, limits: IngestLimits = IngestLimits()) -> ParsedFile:
    """Parse one landing file by its suffix; raise UnreadableFile with a clear reason when no
    record can be read. Fast path: Arrow's readers; on any error, a careful pure-Python pass
    that finds the precise reason and keeps the records that do parse."""
    fmt, gz = _format(path)
    data = read_landing_bytes(path, gz, limits)
    if not data:
        raise UnreadableFile("empty file (0 bytes)")
    if fmt == "parquet":
        return _read_parquet(data, limits)
    longest = _longest_line(data)
    if longest > limits.max_line_bytes and not (fmt == "json" and _starts_with(data, b"[")):
        raise UnreadableFile(f"a line of {longest} bytes, over the limit of {limits.max_line_bytes} "
                             "(RECSYS_INGEST_MAX_LINE_BYTES)")
    threads = len(data) > 1 << 20  # a thread pool costs more than it saves on small files
    try:
        if fmt == "csv":
            table = pa_csv.read_csv(pa.BufferReader(data), read_options=pa_csv.ReadOptions(use_threads=threads),
                                    convert_options=pa_csv.ConvertOptions(
                                        strings_can_be_null=True, column_types=dict.fromkeys(TEXT_COLUMNS, pa.string())))
        elif fmt == "jsonl" or not _starts_with(data, b"["):
            table = pa_json.read_json(pa.BufferReader(data), read_options=pa_json.ReadOptions(use_threads=threads))
        else:
            raise pa.ArrowInvalid("a JSON array: parsed by the careful path")
        if any(pa.types.is_binary(t) or pa.types.is_large_binary(t) for t in table.schema.types):
            raise pa.ArrowInvalid("bytes that are not UTF-8: the careful path says where")
        parsed = ParsedFile(table)
    except (pa.ArrowException, ValueError):
        parsed = _read_text_carefully(data, fmt)
    duplicated = sorted({str(c) for c in pd.Index(parsed.columns)[pd.Index(parsed.columns).duplicated()]})
    if duplicated:
        raise UnreadableFile(f"duplicate column names: {duplicated}")
    if not parsed.records:
        raise UnreadableFile("no rows (only a header or whitespace)" if fmt == "csv" else "no rows (only whitespace)")
    if not parsed.rows:
        raise UnreadableFile(f"no record could be read; first problem: {parsed.bad[0][1]}")
    return parsed


def read_landing_bytes(path: Path, gz: bool, limits: IngestLimits) -> bytes:
    """The file's bytes (decompressed when gzipped), read through ``open_landing_file``; past
    ``max_file_bytes`` it stops reading and raises UnreadableFile (a gzip bomb included)."""
    cap = limits.max_file_bytes
    too_large = f"over the limit of {cap} bytes (RECSYS_INGEST_MAX_FILE_BYTES)"
    with open_landing_file(path) as handle:
        if not gz:
            data = handle.read(cap + 1)
            if len(data) > cap:
                raise UnreadableFile(f"{os.fstat(handle.fileno()).st_size} bytes, {too_large}")
            return data
        chunks, size = [], 0
        try:
            with gzip.GzipFile(fileobj=handle) as stream:
                while chunk := stream.read(1 << 20):
                    size += len(chunk)
                    if size > cap:
                        raise UnreadableFile(f"decompresses to more than {cap} bytes, {too_large}")
                    chunks.append(chunk)
        except EOFError as exc:
            raise UnreadableFile("truncated gzip stream (the file ends before the compressed data does)") from exc
        except (OSError, zlib.error) as exc:
            raise UnreadableFile(f"not a valid gzip file: {exc}") from exc
        return b"".join(chunks)


def _longest_line(data: bytes) -> int:
    """Length in bytes of the longest line, in chunks (no copy of the whole file)."""
    longest, start, step = 0, 0, 1 << 24
    view = np.frombuffer(data, dtype=np.uint8)
    for offset in range(0, len(view), step):
        ends = np.flatnonzero(view[offset : offset + step] == 10) + offset
        if len(ends):
            longest = max(longest, int(ends[0] - start), int(np.diff(ends).max(initial=0)) - 1)
            start = int(ends[-1]) + 1
    return max(longest, len(view) - start)


def _starts_with(data: bytes, prefix: bytes) -> bool:
    return data[:4096].lstrip(b"\xef\xbb\xbf \t\r\n").startswith(prefix)


def _read_parquet(data: bytes, limits: IngestLimits) -> ParsedFile:
    """Batch by batch, stopping once the rows read take more than ``max_file_bytes`` in memory
    (dictionary encoding and compression can make a small file expand without bound)."""
    batches, size = [], 0
    try:
        source = pq.ParquetFile(pa.BufferReader(data))
        for batch in source.iter_batches(batch_size=64 * 1024):
            size += batch.nbytes
            if size > limits.max_file_bytes:
                raise UnreadableFile(f"Parquet data of more than {limits.max_file_bytes} bytes once read, over the "
                                     "limit (RECSYS_INGEST_MAX_FILE_BYTES)")
            batches.append(batch)
        table = pa.Table.from_batches(batches, schema=source.schema_arrow)
    except UnreadableFile:
        raise
    except Exception as exc:  # Arrow raises several types for corrupt files; all mean "unreadable"
        raise UnreadableFile(f"not a readable Parquet file: {type(exc).__name__}: {exc}"[:300]) from exc
    if table.num_rows == 0:
        raise UnreadableFile("no rows")
    return ParsedFile(table)


def _decode(data: bytes) -> str:
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise UnreadableFile("UTF-16 text (byte-order mark found): re-encode the file as UTF-8")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UnreadableFile(
            f"not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}; binary data, or "
            "another encoding such as latin-1): re-encode the file as UTF-8"
        ) from exc


def _read_text_carefully(data: bytes, fmt: str) -> ParsedFile:
    text = _decode(data)
    if fmt == "csv":
        return _parse_csv(text)
    return _parse_json(text, array_allowed=fmt == "json")


def _parse_json(text: str, array_allowed: bool) -> ParsedFile:
    stripped = text.lstrip()
    if stripped.startswith("["):
        if not array_allowed:
            raise UnreadableFile("a JSON array, not JSON Lines: write one object per line (or name the file .json)")
        try:
            records = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise UnreadableFile(f"invalid JSON array: {exc}") from exc
        return _records_frame([(i, r) for i, r in enumerate(records, 1)])
    numbered, source_row = [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        source_row += 1
        try:
            numbered.append((source_row, json.loads(line)))
        except json.JSONDecodeError as exc:
            numbered.append((source_row, f"invalid JSON ({exc.msg})"))
    return _records_frame(numbered)


def _records_frame(numbered: list[tuple[int, object]]) -> ParsedFile:
    """Objects become rows; anything else (a parse error message, a non-object) a bad record."""
    rows, positions, bad = [], [], []
    for source_row, record in numbered:
        if isinstance(record, dict):
            rows.append(record)
            positions.append(source_row)
        elif isinstance(record, str) and record.startswith("invalid JSON"):
            bad.append((source_row, record))
        else:
            bad.append((source_row, f"record is a JSON {type(record).__name__}, not an object"))
    frame = pd.DataFrame.from_records(rows) if rows else pd.DataFrame()
    frame.insert(0, "source_row", np.asarray(positions, dtype=np.int64))
    return ParsedFile(frame, bad)


def _parse_csv(text: str) -> ParsedFile:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None:
            return ParsedFile(pd.DataFrame({"source_row": []}))
        header = [h.strip() for h in header]
        rows, positions, bad, source_row = [], [], [], 0
        for row in reader:
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            source_row += 1
            if len(row) != len(header):
                bad.append((source_row, f"{len(row)} fields where the header has {len(header)}"))
            else:
                rows.append(row)
                positions.append(source_row)
    except csv.Error as exc:
        raise UnreadableFile(f"malformed CSV: {exc}") from exc
    frame = pd.DataFrame(rows, columns=header, dtype=object).replace("", None)
    frame.insert(0, "source_row", np.asarray(positions, dtype=np.int64))
    return ParsedFile(frame, bad)
