"""Landing zone → lake: the one place that reads feedback files and remembers what it read.

Contract for producers
----------------------
Drop finished files into ``<landing>/events/`` (feedback) or ``<landing>/catalog/`` (new or
changed items). A file is read only once it is complete, which the producer signals in one of
two ways:

* **atomic rename** (preferred): write under a hidden name (``.name``) or with a ``.tmp`` /
  ``.part`` suffix, then ``os.replace`` it to its final name (atomic on one filesystem);
* **marker file**: create ``<name>.writing`` *before* creating ``<name>``, delete it after
  closing ``<name>``. While the marker exists the file is invisible.

The landing zone is a local folder, or any fsspec URL (``s3://bucket/prefix``, ``gs://...``,
``memory://...``; the filesystem's package, e.g. s3fs, must be installed). A remote zone is
mirrored: each complete remote file is downloaded once (tracked by its size and modification
time or ETag) into ``<lake>/landing-mirror/`` and everything below works on the mirror; the
same completeness rules apply to the remote names (hidden/temporary names and ``.writing``
markers hide a file), and the remote files stay where they are for replay.

Formats: JSON Lines (``.jsonl``, ``.ndjson``; ``.json`` may also hold one JSON array of
objects), CSV (UTF-8, header row) and Parquet, each optionally gzipped (``.gz``). Any other
complete file is quarantined whole as "unsupported file type", so nothing lies in the landing
zone unnoticed.

What happens to a file
----------------------
``ingest("events")`` reads every pending file exactly once: an append-only ledger
(``<lake>/ledger.jsonl``) records each file's name and content hash, so a file is never read
twice however often the pipeline runs, a file whose content changed under the same name counts
as new, and the same bytes under another name are recorded as a duplicate. Each readable file
becomes one *batch* ``<lake>/events/<batch_id>.parquet``: every record of the file (one row
per record, in file order, with its ``source_row``), converted to the event schema, with
a ``problem`` for records that could not be parsed or converted. On the way in, user and
session ids are pseudonymised with a keyed hash (``rec_models.privacy``) and free text is
scrubbed of e-mail addresses and phone numbers, so the lake never holds raw user ids. The raw
landing files are never modified: they are the replay source.

A file that cannot be read at all (binary garbage, not UTF-8, truncated gzip, empty, a JSON
array in a ``.jsonl``, missing required columns, ...) is quarantined whole: the ledger and
``<lake>/quarantine/files/`` record the reason (not the bytes, which may hold raw ids; the
file itself stays in the landing zone), and the other files go on.

``validate_pending()`` then validates each new batch exactly once (``rec_pipelines.validation``
rules): valid rows go to ``<lake>/validated/<batch_id>.parquet``, bad rows to
``<lake>/quarantine/rows/<batch_id>.parquet`` with a reason each, and the batch's accounting
(rows_in = rows_valid + rows_quarantined, reasons) to ``<lake>/validated/<batch_id>.json``,
written last so it marks the batch as done. ``reject_batches`` moves a whole batch into
quarantine after the fact (the blocking Great Expectations check does this when it fails).
The validated feedback is the concatenation of the validated batches.

One process at a time changes the lake: ingestion, validation and rejection hold an
exclusive lock on ``<lake>/.lock``.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import gzip
import hashlib
import io
import json
import os
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from rec_models.privacy import (
    KEY_ENV,
    SESSION_PREFIX,
    USER_PREFIX,
    existing_pseudonym_key,
    key_id,
    pseudonymize,
    resolve_pseudonym_key,
    scrub_texts,
)
from rec_models.files import atomic_path, write_json_atomic
from rec_models.schema import CATALOG_COLUMNS, EVENT_COLUMNS, REQUIRED_EVENT_COLUMNS
from rec_pipelines.settings import is_remote_url
from rec_pipelines.validation import (
    DEFAULT_MIN_TIMESTAMP,
    MAX_CLOCK_SKEW_S,
    MAX_TEXT_CHARS,
    event_keys,
    split_valid_rows,
)

KINDS = ("events", "catalog")
SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".parquet", ".pq")
MARKER_SUFFIX = ".writing"
IN_PROGRESS_SUFFIXES = (".tmp", ".part", MARKER_SUFFIX)
LAKE_FORMAT = 2  # 1: before pseudonymisation and per-batch validation
ROW_COLUMNS = ["batch_id", "source_row", *EVENT_COLUMNS]
# Read as text whatever they look like (ids with leading zeros stay as they are).
TEXT_COLUMNS = ["user_id", "item_id", "event_type", "session_id", "text", "title", "description", "category", "tags"]
_TEXT_CONTROL = r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]"  # control characters except tab/newline/CR


class UnreadableFile(ValueError):
    """A landing file that cannot be turned into rows at all; the message is the reason."""


class LakeError(RuntimeError):
    """The lake cannot be used as it is (written by an older version, or another key)."""


# --------------------------------------------------------------------------------------------
# Landing-zone files
# --------------------------------------------------------------------------------------------


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
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / f".{name}.download"
            self.fs.get_file(info["name"], str(tmp))
            os.replace(tmp, folder / name)
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


# --------------------------------------------------------------------------------------------
# Parsing: file → records
# --------------------------------------------------------------------------------------------


@dataclass
class ParsedFile:
    """The records of one file: ``frame`` holds those that parsed (``source_row`` = 1-based
    position among the file's non-blank records), ``bad`` the (source_row, reason) of those
    that did not."""

    frame: pd.DataFrame
    bad: list[tuple[int, str]] = field(default_factory=list)

    @property
    def records(self) -> int:
        return len(self.frame) + len(self.bad)


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


def read_table(path: Path) -> ParsedFile:
    """Parse one landing file by its suffix; raise UnreadableFile with a clear reason when no
    record can be read. Fast path: Arrow's readers; on any error, a careful pure-Python pass
    that finds the precise reason and keeps the records that do parse."""
    fmt, gz = _format(path)
    if path.stat().st_size == 0:
        raise UnreadableFile("empty file (0 bytes)")
    if fmt == "parquet":
        return _read_parquet(path)
    try:
        if fmt == "csv":
            table = pa_csv.read_csv(path, convert_options=pa_csv.ConvertOptions(
                strings_can_be_null=True, column_types=dict.fromkeys(TEXT_COLUMNS, pa.string())))
        elif fmt == "jsonl" or not _starts_with(path, gz, b"["):
            table = pa_json.read_json(path)
        else:
            raise pa.ArrowInvalid("a JSON array: parsed by the careful path")
        if any(pa.types.is_binary(t) or pa.types.is_large_binary(t) for t in table.schema.types):
            raise pa.ArrowInvalid("bytes that are not UTF-8: the careful path says where")
        parsed = ParsedFile(_arrow_frame(table))
    except (pa.ArrowException, OSError, EOFError, zlib.error, ValueError):
        parsed = _read_text_carefully(path, fmt, gz)
    duplicated = sorted({str(c) for c in parsed.frame.columns[parsed.frame.columns.duplicated()]})
    if duplicated:
        raise UnreadableFile(f"duplicate column names: {duplicated}")
    if not parsed.records:
        raise UnreadableFile("no rows (only a header or whitespace)" if fmt == "csv" else "no rows (only whitespace)")
    if not len(parsed.frame):
        raise UnreadableFile(f"no record could be read; first problem: {parsed.bad[0][1]}")
    return parsed


def _starts_with(path: Path, gz: bool, prefix: bytes) -> bool:
    opener = gzip.open if gz else open
    try:
        with opener(path, "rb") as handle:
            head = handle.read(4096)
    except (OSError, EOFError, zlib.error):
        return False
    return head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(prefix)


def _read_parquet(path: Path) -> ParsedFile:
    try:
        table = pq.read_table(path)
    except Exception as exc:  # Arrow raises several types for corrupt files; all mean "unreadable"
        message = str(exc).replace(f"'{path}'", path.name)
        raise UnreadableFile(f"not a readable Parquet file: {type(exc).__name__}: {message}"[:300]) from exc
    if table.num_rows == 0:
        raise UnreadableFile("no rows")
    return ParsedFile(_arrow_frame(table))


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


def _read_bytes(path: Path, gz: bool) -> bytes:
    data = path.read_bytes()
    if not gz:
        return data
    try:
        return gzip.decompress(data)
    except EOFError as exc:
        raise UnreadableFile("truncated gzip stream (the file ends before the compressed data does)") from exc
    except (OSError, zlib.error) as exc:
        raise UnreadableFile(f"not a valid gzip file: {exc}") from exc


def _read_text_carefully(path: Path, fmt: str, gz: bool) -> ParsedFile:
    text = _decode(_read_bytes(path, gz))
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


# --------------------------------------------------------------------------------------------
# Conversion: records → event / catalog schema
# --------------------------------------------------------------------------------------------


def _missing_columns_reason(frame: pd.DataFrame, required: list[str], what: str) -> str:
    found = sorted(map(str, (c for c in frame.columns if c != "source_row")))
    reason = f"missing required columns {[c for c in required if c not in frame.columns]}; found {found}"
    for delimiter in (";", "\t", "|"):
        if any(delimiter in c and set(required) <= set(c.split(delimiter)) for c in found):
            reason += f" (the header looks {delimiter!r}-separated: {what} must be comma-separated)"
    return reason


def _nested(raw: pd.Series) -> np.ndarray:
    """Rows holding a list or mapping where a scalar belongs."""
    if isinstance(raw.dtype, pd.ArrowDtype):
        nested = pa.types.is_nested(raw.dtype.pyarrow_dtype)
        return raw.notna().to_numpy(dtype=bool) if nested else np.zeros(len(raw), dtype=bool)
    if raw.dtype == object:
        return raw.map(lambda v: isinstance(v, (dict, list, tuple, np.ndarray))).to_numpy(dtype=bool)
    return np.zeros(len(raw), dtype=bool)


def _as_text(raw: pd.Series, lower: bool = False) -> pd.Series:
    """Strings, stripped; empty strings become missing."""
    if raw.dtype == object:  # careful path: mixed types; bool/float ids read as written
        raw = raw.map(lambda v: v if v is None or isinstance(v, str) or v is pd.NA else
                      (None if isinstance(v, float) and np.isnan(v) else str(v)))
    text = raw.astype("string").str.strip()
    if lower:
        text = text.str.lower()
    return text.mask(text == "")


def _is_number_dtype(raw: pd.Series) -> bool:
    dtype = raw.dtype
    if isinstance(dtype, pd.ArrowDtype):
        kind = dtype.pyarrow_dtype
        return pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)
    return pd.api.types.is_numeric_dtype(dtype) or pd.api.types.is_bool_dtype(dtype)


def _is_datetime_dtype(raw: pd.Series) -> bool:
    dtype = raw.dtype
    if isinstance(dtype, pd.ArrowDtype):
        return pa.types.is_timestamp(dtype.pyarrow_dtype) or pa.types.is_date(dtype.pyarrow_dtype)
    return pd.api.types.is_datetime64_any_dtype(dtype)


def _as_number(raw: pd.Series) -> tuple[pd.Series, np.ndarray]:
    """(float64 values, rows that held something that is not a number)."""
    if _is_number_dtype(raw):
        return raw.astype("float64[pyarrow]").astype("float64"), np.zeros(len(raw), dtype=bool)
    text = _as_text(raw)
    number = pd.to_numeric(text, errors="coerce").astype("float64")
    bad = (text.notna() & number.isna()).to_numpy(dtype=bool) | _nested(raw)
    return number.mask(pd.Series(bad, index=number.index)), bad


def _epoch_seconds(moments: pd.Series) -> pd.Series:
    """UTC datetimes → Int64 epoch seconds (naive ones are taken as UTC)."""
    moments = pd.to_datetime(moments, utc=True)
    seconds = (moments - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)
    return seconds.astype("Int64")


def _as_timestamp(raw: pd.Series) -> tuple[pd.Series, np.ndarray]:
    """(Int64 epoch seconds, rows that are neither a number nor an ISO 8601 date-time)."""
    if _is_datetime_dtype(raw):
        return _epoch_seconds(raw.astype(object)), np.zeros(len(raw), dtype=bool)
    number, bad = _as_number(raw)
    out_of_range = number.abs() > 9e18  # would overflow int64
    seconds = number.mask(out_of_range).round().astype("Int64")
    bad = bad | out_of_range.to_numpy(dtype=bool)
    if bad.any() and not _is_number_dtype(raw):
        text = _as_text(raw)[bad]
        parsed = pd.to_datetime(text, format="ISO8601", utc=True, errors="coerce")
        ok = parsed.notna()
        if ok.any():
            seconds.loc[ok[ok].index] = _epoch_seconds(parsed[ok]).to_numpy()
            bad[np.flatnonzero(bad)[ok.to_numpy()]] = False
    return seconds, bad


def _clean_text(raw: pd.Series) -> tuple[pd.Series, int]:
    """Free text without control characters, at most MAX_TEXT_CHARS, scrubbed of contact
    data; returns (text, how many were truncated)."""
    text = _as_text(raw)
    if not text.notna().any():
        return text, 0
    text = text.str.replace(_TEXT_CONTROL, "", regex=True)
    too_long = (text.str.len() > MAX_TEXT_CHARS).fillna(False)
    if too_long.any():
        text = text.mask(too_long, text.str.slice(0, MAX_TEXT_CHARS))
    return scrub_texts(text), int(too_long.sum())


def coerce_events(parsed: ParsedFile) -> tuple[pd.DataFrame, dict]:
    """Shape parsed records to the event schema plus ``source_row`` and ``problem``.

    Values that do not convert get a ``problem`` (row validation then quarantines the row);
    missing required columns fail the whole file. Ids and event types are stripped, event
    types lower-cased, ``timestamp`` accepts epoch seconds (rounded) and ISO 8601 date-times.
    Returns (events, stats) where stats counts truncated texts.
    """
    frame = parsed.frame
    missing = [c for c in REQUIRED_EVENT_COLUMNS if c not in frame.columns]
    if missing:
        raise UnreadableFile(_missing_columns_reason(frame, REQUIRED_EVENT_COLUMNS, "CSV files"))
    index = frame.index
    problem = np.full(len(frame), None, dtype=object)

    def note(mask: np.ndarray, text: str) -> None:
        problem[mask & (problem == None)] = text  # noqa: E711  (elementwise on an object array)

    def column(name: str) -> pd.Series:
        return frame[name] if name in frame.columns else pd.Series(None, index=index, dtype=object)

    out = pd.DataFrame({"source_row": frame["source_row"].astype("int64")}, index=index)
    for name in ("user_id", "item_id", "event_type", "session_id"):
        raw = column(name)
        note(_nested(raw), f"{name} is not a string or number")
        out[name] = _as_text(raw, lower=name == "event_type")
    out["value"], bad = _as_number(column("value"))
    note(bad, "value is not a number")
    out["timestamp"], bad = _as_timestamp(column("timestamp"))
    note(bad, "timestamp is neither epoch seconds nor an ISO 8601 date-time")
    note(_nested(column("text")), "text is not a string")
    out["text"], truncated = _clean_text(column("text"))
    out["problem"] = pd.array(problem, dtype="string")

    if parsed.bad:
        rows, reasons = zip(*parsed.bad)
        bad_rows = pd.DataFrame({"source_row": np.asarray(rows, dtype=np.int64), "problem": list(reasons)})
        out = pd.concat([out, bad_rows.astype({"problem": "string"})], ignore_index=True)
        out = out.sort_values("source_row", kind="stable")
    out = out.astype({"user_id": "string", "item_id": "string", "event_type": "string", "session_id": "string",
                      "text": "string", "value": "float64", "timestamp": "Int64", "problem": "string"})
    return out[["source_row", *EVENT_COLUMNS, "problem"]].reset_index(drop=True), {"texts_truncated": truncated}


def coerce_catalog(parsed: ParsedFile) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(catalog rows, rows without an item id or that failed to parse, with a ``reason``).
    Titles and descriptions are scrubbed of contact data like event texts."""
    frame = parsed.frame
    if "item_id" not in frame.columns or "title" not in frame.columns:
        raise UnreadableFile(_missing_columns_reason(frame, ["item_id", "title"], "catalog CSV files"))
    out = pd.DataFrame({"source_row": frame["source_row"].astype("int64")}, index=frame.index)
    for name in CATALOG_COLUMNS:
        raw = frame[name] if name in frame.columns else pd.Series(None, index=frame.index, dtype=object)
        if name == "tags":
            out[name] = [_as_tag_list(value) for value in raw]
        elif name in ("title", "description"):
            out[name] = _clean_text(raw)[0]
        else:
            out[name] = _as_text(raw)
    bad = out["item_id"].isna() | pd.Series(_nested(frame["item_id"]), index=frame.index)
    rejected = out[bad].assign(reason="missing item_id")
    if parsed.bad:
        rows, reasons = zip(*parsed.bad)
        rejected = pd.concat([rejected, pd.DataFrame({"source_row": list(rows), "reason": list(reasons)})],
                             ignore_index=True)
    return out[~bad].drop(columns="source_row").reset_index(drop=True), rejected.reset_index(drop=True)


def _as_tag_list(value) -> list[str]:
    if isinstance(value, (list, tuple, np.ndarray)):
        return [str(v) for v in value if v is not None and str(v)]
    if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)):
        return []
    return [t.strip() for t in str(value).split("|") if t.strip()]


# --------------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------------


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


class FeedbackStore:
    """Reads the landing zone into the lake and keeps the ledger of what was read.

    ``pseudonym_key`` overrides the key otherwise taken from ``$RECSYS_PSEUDONYM_KEY`` or
    ``key_file`` (default ``<lake>/secrets/pseudonym.key``; generated on first use).
    """

    def __init__(self, landing_zone: Path | str, lake: Path | str, pseudonym_key: bytes | str | None = None,
                 key_file: Path | str | None = None):
        self.lake = Path(lake)
        self.remote = RemoteLandingZone(str(landing_zone), self.lake / "landing-mirror") if is_remote_url(str(landing_zone)) else None
        self.landing_zone = self.remote.mirror if self.remote else Path(str(landing_zone).removeprefix("file://"))
        self.ledger_path = self.lake / "ledger.jsonl"
        self.key_file = Path(key_file) if key_file else key_file_of(self.lake)
        self._configured_key = pseudonym_key
        self._key: bytes | None = None

    # -- privacy -------------------------------------------------------------------------
    def pseudonym_key(self) -> bytes:
        if self._key is None:
            self._key, _ = resolve_pseudonym_key(self.key_file, self._configured_key)
        return self._key

    def pseudonymizer(self) -> Callable:
        """``f(raw_user_ids) -> pseudonyms`` with this lake's key: what serving and evaluation
        call before looking up a user (a list in, a list out; a Series in, a Series out)."""
        key = self.pseudonym_key()
        return lambda user_ids: pseudonymize(user_ids, key, USER_PREFIX)

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

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.lake.mkdir(parents=True, exist_ok=True)
        with open(self.lake / ".lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

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
    def ready_files(self, kind: str) -> list[Path]:
        """Complete landing files of ``kind`` (a remote zone is mirrored first)."""
        if self.remote is not None:
            self.remote.sync(kind)
        folder = self.landing_zone / kind
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.iterdir() if is_ready(p))

    def _pending(self, kind: str, entries: list[dict]) -> list[tuple[Path, str | None]]:
        """(path, sha256 if it had to be computed) of ready files the ledger has not seen."""
        entries = [e for e in entries if e["kind"] == kind]
        seen = {(e["file"], e["sha256"]) for e in entries}
        seen_stats = {(e["file"], e["size"], e.get("mtime_ns")) for e in entries}
        pending = []
        for path in self.ready_files(kind):
            rel, stat = self._relative(path), path.stat()
            # Cheap path first: an untouched file keeps name, size and mtime; hash only otherwise.
            if (rel, stat.st_size, stat.st_mtime_ns) in seen_stats:
                continue
            sha = file_sha256(path)
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
        """Move every pending file of ``kind`` into the lake, exactly once."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        with self._locked():
            entries = self.ledger()
            if kind == "events":
                self._check_lake(entries)
            report = IngestReport(kind=kind)
            known_hashes = {e["sha256"]: e["file"] for e in entries if e["kind"] == kind and e["status"] == "ingested"}
            for path, sha in self._pending(kind, entries):
                self._ingest_file(kind, path, sha, known_hashes, report)
            return report

    def _ingest_file(self, kind: str, path: Path, sha: str, known_hashes: dict, report: IngestReport) -> None:
        rel, stat = self._relative(path), path.stat()
        report.files.append(rel)
        entry = {"kind": kind, "file": rel, "sha256": sha, "size": stat.st_size,
                 "mtime_ns": stat.st_mtime_ns, "ingested_at": time.time()}
        if sha in known_hashes:  # same bytes under another name: nothing new to read
            report.duplicate_files.append(rel)
            self._append_ledger({**entry, "status": "duplicate", "duplicate_of": known_hashes[sha]})
            return
        try:
            if not is_supported(path):
                raise UnreadableFile(f"unsupported file type (expected {', '.join(SUFFIXES)}, optionally .gz)")
            parsed = read_table(path)
            batch_id = f"{Path(rel).name.split('.')[0]}-{sha[:8]}"
            if kind == "events":
                table, stats = coerce_events(parsed)
                extra = self._write_event_batch(batch_id, table, stats)
            else:
                catalog, rejected = coerce_catalog(parsed)
                extra = self._write_catalog_batch(batch_id, catalog, rejected)
        except UnreadableFile as exc:
            reason = str(exc)
            report.quarantined_files.append({"file": rel, "reason": reason})
            write_json_atomic(self.lake / "quarantine" / "files" / f"{rel}.{sha[:8]}.json",
                               {**entry, "reason": reason, "replay_from": str(path)})
            self._append_ledger({**entry, "status": "quarantined", "reason": reason})
            return
        report.batches.append(batch_id)
        report.rows_in += extra["rows"]
        report.texts_truncated += extra.get("texts_truncated", 0)
        known_hashes[sha] = rel
        self._append_ledger({**entry, "status": "ingested", "batch_id": batch_id, "format": LAKE_FORMAT, **extra})

    def _write_event_batch(self, batch_id: str, table: pd.DataFrame, stats: dict) -> dict:
        key = self.pseudonym_key()
        table["user_id"] = pseudonymize(table["user_id"], key, USER_PREFIX)
        table["session_id"] = pseudonymize(table["session_id"], key, SESSION_PREFIX)
        table.insert(0, "batch_id", batch_id)
        _write_parquet_atomic(table, self.lake / "events" / f"{batch_id}.parquet")
        return {"rows": len(table), "key_id": key_id(key), **stats}

    def _write_catalog_batch(self, batch_id: str, catalog: pd.DataFrame, rejected: pd.DataFrame) -> dict:
        catalog.insert(0, "batch_id", batch_id)
        if len(rejected):
            _write_parquet_atomic(rejected.assign(batch_id=batch_id), self.lake / "quarantine" / "rows" / f"{batch_id}.parquet")
        _write_parquet_atomic(catalog, self.lake / "catalog" / f"{batch_id}.parquet")
        return {"rows": len(catalog) + len(rejected), "rows_valid": len(catalog), "rows_quarantined": len(rejected)}

    # -- validation ----------------------------------------------------------------------
    def _account_path(self, batch_id: str) -> Path:
        return self.lake / "validated" / f"{batch_id}.json"

    def account(self, batch_id: str) -> dict | None:
        """The validation accounting of a batch (None while it is not validated)."""
        path = self._account_path(batch_id)
        return json.loads(path.read_text()) if path.exists() else None

    def accounts(self) -> list[dict]:
        """Accounting of every validated events batch, in ingestion order."""
        return [a for a in map(self.account, self.batches("events")) if a is not None]

    def validate_pending(
        self,
        *,
        now: float | None = None,
        min_timestamp: int = DEFAULT_MIN_TIMESTAMP,
        max_clock_skew_s: int = MAX_CLOCK_SKEW_S,
        run_id: str | None = None,
    ) -> list[dict]:
        """Validate every ingested events batch that is not validated yet, each exactly once;
        return their accounting (rows_in = rows_valid + rows_quarantined, reasons)."""
        with self._locked():
            entries = self.ledger()
            self._check_lake(entries)
            ingested = [e for e in entries if e["kind"] == "events" and e["status"] == "ingested"]
            todo = [e for e in ingested if not self._account_path(e["batch_id"]).exists()]
            if not todo:
                return []
            seen = self._validated_keys()
            accounts = []
            for entry in todo:
                batch_id = entry["batch_id"]
                rows = pd.read_parquet(self.lake / "events" / f"{batch_id}.parquet")
                keys = event_keys(rows)
                valid, quarantined = split_valid_rows(rows, now=now, min_timestamp=min_timestamp,
                                                      max_clock_skew_s=max_clock_skew_s, seen_keys=seen, keys=keys)
                if len(valid) + len(quarantined) != len(rows):
                    raise AssertionError(f"row accounting broken for {batch_id}: "
                                         f"{len(rows)} in, {len(valid)} valid, {len(quarantined)} quarantined")
                valid_keys = keys[valid.index.to_numpy()]
                _write_parquet_atomic(valid.assign(key_hash=valid_keys), self.lake / "validated" / f"{batch_id}.parquet")
                self._write_quarantined_rows(batch_id, quarantined)
                seen = np.concatenate([seen, valid_keys])
                account = {
                    "batch_id": batch_id, "file": entry["file"], "rows_in": len(rows), "rows_valid": len(valid),
                    "rows_quarantined": len(quarantined),
                    "reasons": {str(k): int(v) for k, v in quarantined["reason"].value_counts().items()},
                    "texts_truncated": int(entry.get("texts_truncated", 0)),
                    "min_timestamp": int(min_timestamp), "max_clock_skew_s": int(max_clock_skew_s),
                    "validated_at": time.time(), "run_id": run_id,
                }
                write_json_atomic(self._account_path(batch_id), account)
                accounts.append(account)
            return accounts

    def _validated_keys(self) -> np.ndarray:
        paths = [self.lake / "validated" / f"{a['batch_id']}.parquet" for a in self.accounts() if not a.get("rejected")]
        parts = [pq.read_table(p, columns=["key_hash"]).column(0).to_numpy() for p in paths if p.exists()]
        return np.concatenate(parts).astype(np.uint64) if parts else np.zeros(0, dtype=np.uint64)

    def reject_batches(self, batch_ids: Iterable[str], reason: str) -> list[str]:
        """Move validated batches into quarantine whole (every row with ``reason``), so they
        never reach training; returns the batches rejected now. The raw files stay for replay."""
        rejected = []
        with self._locked():
            for batch_id in batch_ids:
                account = self.account(batch_id)
                if account is None or account.get("rejected"):
                    continue
                path = self.lake / "validated" / f"{batch_id}.parquet"
                valid = pd.read_parquet(path).drop(columns="key_hash")
                earlier = self.quarantined_rows(batch_id)
                rows = pd.concat([earlier, valid.assign(reason=reason)], ignore_index=True)
                rows = rows.sort_values("source_row", kind="stable") if "source_row" in rows else rows
                self._write_quarantined_rows(batch_id, rows)
                account.update(rows_valid=0, rows_quarantined=account["rows_in"], rejected=reason,
                               reasons={**account["reasons"], reason: len(valid)})
                write_json_atomic(self._account_path(batch_id), account)
                path.unlink()
                rejected.append(batch_id)
        return rejected

    def _write_quarantined_rows(self, batch_id: str, rows: pd.DataFrame) -> None:
        path = self.lake / "quarantine" / "rows" / f"{batch_id}.parquet"
        if len(rows):
            _write_parquet_atomic(rows.reset_index(drop=True), path)
        elif path.exists():
            path.unlink()

    # -- reading the lake ----------------------------------------------------------------
    def batches(self, kind: str) -> list[str]:
        """Ingested batch ids of ``kind`` in ingestion order."""
        return [e["batch_id"] for e in self.ledger() if e["kind"] == kind and e["status"] == "ingested"]

    def read(self, kind: str) -> pd.DataFrame:
        """Every ingested row of ``kind`` in ingestion order (with a ``batch_id`` column; events
        also carry ``source_row`` and ``problem``)."""
        frames = [pd.read_parquet(self.lake / kind / f"{b}.parquet") for b in self.batches(kind)]
        if not frames:
            columns = [*ROW_COLUMNS, "problem"] if kind == "events" else ["batch_id", *CATALOG_COLUMNS]
            return pd.DataFrame(columns=columns)
        return pd.concat(frames, ignore_index=True)

    def read_validated(self, batch_ids: Iterable[str] | None = None) -> pd.DataFrame:
        """Validated events of every (or the given) validated, not rejected batch, in ingestion
        order: the training data's source."""
        wanted = None if batch_ids is None else set(batch_ids)
        paths = [self.lake / "validated" / f"{a['batch_id']}.parquet" for a in self.accounts()
                 if not a.get("rejected") and (wanted is None or a["batch_id"] in wanted)]
        frames = [pd.read_parquet(p, columns=ROW_COLUMNS) for p in paths]
        if not frames:
            return _empty_events()
        return pd.concat(frames, ignore_index=True)

    def quarantined_rows(self, batch_id: str | None = None) -> pd.DataFrame:
        """Quarantined rows (with ``reason``) of one batch, or of all batches."""
        folder = self.lake / "quarantine" / "rows"
        paths = [folder / f"{batch_id}.parquet"] if batch_id else sorted(folder.glob("*.parquet"))
        frames = [pd.read_parquet(p) for p in paths if p.exists()]
        return pd.concat(frames, ignore_index=True) if frames else _empty_events().assign(reason=pd.Series(dtype="string"))

    def catalog(self) -> pd.DataFrame:
        """The current catalog: later entries for an item replace earlier ones."""
        rows = self.read("catalog")
        rows = rows.drop_duplicates("item_id", keep="last").reset_index(drop=True)
        rows["tags"] = [_as_tag_list(v) for v in rows["tags"]]
        return rows


def key_file_of(lake: Path | str) -> Path:
    """Where a lake keeps its generated pseudonym key (when ``$RECSYS_PSEUDONYM_KEY`` is unset)."""
    return Path(lake) / "secrets" / "pseudonym.key"


def load_pseudonym_key(lake: Path | str) -> bytes:
    """The key a lake's user ids are pseudonymised with ($RECSYS_PSEUDONYM_KEY or the lake's
    key file): ``rec_models.privacy.pseudonymize(raw_ids, load_pseudonym_key(lake))`` gives the
    ids the lake, the training data and the served model know users by. Never creates a key:
    a lake without one has ingested nothing (LakeError)."""
    key = existing_pseudonym_key(key_file_of(lake))
    if key is None:
        raise LakeError(f"no pseudonym key: {KEY_ENV} is not set and {key_file_of(lake)} does not exist "
                        "(nothing ingested yet)")
    return key


def _empty_events() -> pd.DataFrame:
    frame = pd.DataFrame({c: pd.Series(dtype="string") for c in ROW_COLUMNS})
    return frame.astype({"source_row": "int64", "value": "float64", "timestamp": "Int64"})


def _write_parquet_atomic(frame: pd.DataFrame, path: Path) -> None:
    """LZ4: as small as the default Snappy here, and reads back about twice as fast."""
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False, compression="lz4")
