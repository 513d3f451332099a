"""Records of a landing file → the event, impression or catalog schema: every value converted
or given a ``problem`` (events) / quarantined with a ``reason`` (impressions, catalog)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

from rec_models.data.privacy import PSEUDONYM_PATTERN, scrub_texts
from rec_models.data.schema import (
    CATALOG_COLUMNS,
    EVENT_COLUMNS,
    OPTIONAL_EVENT_COLUMNS,
    REQUIRED_EVENT_COLUMNS,
    REQUIRED_IMPRESSION_COLUMNS,
)
from rec_pipelines.lake.parsing import ParsedFile, UnreadableFile
from rec_pipelines.lake.validation import MAX_ID_CHARS, MAX_TEXT_CHARS

_TEXT_CONTROL = r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]"  # control characters except tab/newline/CR


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


def _clean_text(raw: pd.Series) -> tuple[pd.Series, np.ndarray]:
    """Free text without control characters, at most MAX_TEXT_CHARS, scrubbed of contact
    data; returns (text, which were truncated)."""
    text = _as_text(raw)
    if not text.notna().any():
        return text, np.zeros(len(text), dtype=bool)
    text = text.str.replace(_TEXT_CONTROL, "", regex=True)
    too_long = (text.str.len() > MAX_TEXT_CHARS).fillna(False)
    if too_long.any():
        text = text.mask(too_long, text.str.slice(0, MAX_TEXT_CHARS))
    return scrub_texts(text), too_long.to_numpy(dtype=bool)


def missing_event_columns(parsed: ParsedFile) -> str | None:
    """Why a file cannot hold events (required columns missing), else None."""
    if all(c in parsed.columns for c in REQUIRED_EVENT_COLUMNS):
        return None
    return _missing_columns_reason(parsed.frame, REQUIRED_EVENT_COLUMNS, "CSV files")


def combine(files: list[ParsedFile]) -> tuple[pd.DataFrame, np.ndarray]:
    """The records of several files as one frame (bad records as rows whose ``_bad`` column
    holds the reason) and each row's file index, so many small files are converted in one
    vectorised pass."""
    if all(isinstance(parsed.data, pa.Table) and not parsed.bad for parsed in files):
        numbered = [t.append_column("source_row", pa.array(np.arange(1, len(t) + 1))) for t in (p.data for p in files)]
        try:
            frame = pa.concat_tables(numbered, promote_options="permissive").to_pandas(types_mapper=pd.ArrowDtype)
            return frame, np.repeat(np.arange(len(files)), [len(t) for t in numbered])
        except (pa.ArrowTypeError, pa.ArrowInvalid):  # a column of another type in some file: pandas mixes them
            pass
    frames = []
    for parsed in files:
        frame = parsed.frame
        if parsed.bad:
            rows, reasons = zip(*parsed.bad)
            bad = pd.DataFrame({"source_row": np.asarray(rows, dtype=np.int64), "_bad": list(reasons)})
            frame = pd.concat([frame, bad], ignore_index=True)
        frames.append(frame)
    parts = np.repeat(np.arange(len(files)), [len(f) for f in frames])
    combined = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0].reset_index(drop=True)
    return combined, parts


def coerce_events(parsed: ParsedFile | list[ParsedFile]) -> tuple[pd.DataFrame, dict]:
    """Shape parsed records (of one file, or of several) to the event schema plus
    ``source_row``, ``problem``, ``part`` (the file's index in the list) and
    ``text_truncated``, sorted by file and source row.

    Values that do not convert get a ``problem`` (row validation then quarantines the row);
    missing required columns fail the whole file (check ``missing_event_columns`` per file
    first when passing several). Ids and event types are stripped, event types lower-cased,
    ``timestamp`` accepts epoch seconds (rounded) and ISO 8601 date-times.
    Returns (events, stats) where stats counts truncated texts.
    """
    files = parsed if isinstance(parsed, list) else [parsed]
    for one in files:
        if missing_event_columns(one):
            raise UnreadableFile(missing_event_columns(one))
    frame, parts = combine(files)
    index = frame.index
    problem = np.full(len(frame), None, dtype=object)
    if "_bad" in frame.columns:
        bad_rows = frame["_bad"].notna().to_numpy(dtype=bool)
        problem[bad_rows] = frame["_bad"].to_numpy(dtype=object)[bad_rows]

    def note(mask: np.ndarray, text: str) -> None:
        problem[mask & (problem == None)] = text  # noqa: E711  (elementwise on an object array)

    def column(name: str) -> pd.Series:
        return frame[name] if name in frame.columns else pd.Series(None, index=index, dtype=object)

    out = pd.DataFrame({"source_row": frame["source_row"].astype("int64")}, index=index)
    for name in ("user_id", "item_id", "event_type", "session_id", "request_id"):
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
    out["part"] = parts
    out["text_truncated"] = truncated
    if "_bad" in frame.columns:  # bad records were appended after each file's good ones
        out = out.sort_values(["part", "source_row"], kind="stable")
    out = out.astype({"user_id": "string", "item_id": "string", "event_type": "string", "session_id": "string",
                      "request_id": "string", "text": "string", "value": "float64", "timestamp": "Int64",
                      "problem": "string"})
    columns = ["source_row", *EVENT_COLUMNS, *OPTIONAL_EVENT_COLUMNS, "problem", "part", "text_truncated"]
    return out[columns].reset_index(drop=True), {"texts_truncated": int(truncated.sum())}


def coerce_impressions(parsed: ParsedFile) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(impression rows, rows that break a rule, with a ``reason``). Impressions come from
    ``recsys serve``: users by pseudonym only (a raw id is quarantined, never stored), ranks
    from 1, one row per (request, rank)."""
    frame = parsed.frame
    missing = [c for c in REQUIRED_IMPRESSION_COLUMNS if c not in frame.columns]
    if missing:
        raise UnreadableFile(_missing_columns_reason(frame, REQUIRED_IMPRESSION_COLUMNS, "impression files"))
    out = pd.DataFrame({"source_row": frame["source_row"].astype("int64")}, index=frame.index)
    reason = np.full(len(frame), None, dtype=object)

    def note(mask, text: str) -> None:
        reason[np.asarray(mask, dtype=bool) & (reason == None)] = text  # noqa: E711

    for name in ("request_id", "user_id", "item_id", "model_version", "arm"):
        raw = frame[name] if name in frame.columns else pd.Series(None, index=frame.index, dtype=object)
        note(_nested(raw), f"{name} is not a string")
        out[name] = _as_text(raw)
        if name != "model_version":
            note(out[name].isna().to_numpy(dtype=bool), f"missing {name}")
        note((out[name].str.len() > MAX_ID_CHARS).fillna(False).to_numpy(dtype=bool),
             f"{name} longer than {MAX_ID_CHARS} characters")
    raw_id = ~out["user_id"].fillna("").str.fullmatch(PSEUDONYM_PATTERN).to_numpy(dtype=bool)
    note(raw_id, "user_id is not a pseudonym (raw ids are never stored)")
    out["user_id"] = out["user_id"].mask(pd.Series(raw_id, index=out.index))  # not even in quarantine
    rank, bad = _as_number(frame["rank"])
    note(bad | ~(rank >= 1).to_numpy(dtype=bool) | (rank % 1 != 0).to_numpy(dtype=bool), "rank is not an integer >= 1")
    out["rank"] = rank.where(~pd.Series(reason != None, index=frame.index)).astype("Int64")  # noqa: E711
    out["timestamp"], bad = _as_timestamp(frame["timestamp"])
    note(bad | out["timestamp"].isna().to_numpy(dtype=bool), "timestamp is neither epoch seconds nor ISO 8601")
    note(out.duplicated(["request_id", "rank"]).to_numpy(dtype=bool) & (reason == None), "duplicate (request_id, rank)")  # noqa: E711
    bad_rows = reason != None  # noqa: E711
    out = out.astype({c: "string" for c in ("request_id", "user_id", "item_id", "model_version", "arm")})
    rejected = out[bad_rows].assign(reason=reason[bad_rows])
    if parsed.bad:
        rows, reasons = zip(*parsed.bad)
        rejected = pd.concat([rejected, pd.DataFrame({"source_row": list(rows), "reason": list(reasons)})],
                             ignore_index=True)
    return out[~bad_rows].reset_index(drop=True), rejected.reset_index(drop=True)


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
            out[name] = [as_tag_list(value) for value in raw]
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


def as_tag_list(value) -> list[str]:
    if isinstance(value, (list, tuple, np.ndarray)):
        return [str(v) for v in value if v is not None and str(v)]
    if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)):
        return []
    return [t.strip() for t in str(value).split("|") if t.strip()]


