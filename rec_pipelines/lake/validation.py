"""Row rules for feedback batches (vectorised, each failing row quarantined with its reason)
and the Great Expectations suite that blocks training on a bad batch (docs/lake.md)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from rec_models.data.arrays import unique_sorted
from rec_models.data.privacy import PSEUDONYM_PATTERN
from rec_models.data.schema import EVENT_COLUMNS, EVENT_TYPES, RATING_RANGE

DEFAULT_MIN_TIMESTAMP = 788_918_400  # 1995-01-01: older stamps are unit mistakes (0, days, ...)
MAX_CLOCK_SKEW_S = 3600
MILLISECONDS_FROM = 100_000_000_000  # "epoch seconds" past this (year 5138) are milliseconds
MAX_ID_CHARS = 256
MAX_TEXT_CHARS = 5000  # longer review texts are truncated at ingest (and counted)
DUPLICATE_KEY = ["user_id", "item_id", "event_type", "timestamp", "value"]
GE_MAX_ROWS = 100_000
_CONTROL_CHARS = r"[\x00-\x1f\x7f]"


def event_keys(events: pd.DataFrame) -> np.ndarray:
    """A 64-bit hash per row of its ``DUPLICATE_KEY`` columns (stable across processes for the
    lake's dtypes), for finding duplicates within and across batches."""
    if not len(events):
        return np.zeros(0, dtype=np.uint64)
    return pd.util.hash_pandas_object(events[DUPLICATE_KEY], index=False).to_numpy()


class KeySet:
    """A growing set of ``event_keys`` with fast membership: a sorted array searched with
    ``searchsorted`` plus a small recent part, merged in when it reaches a quarter of the sorted
    one, so validating many small batches costs O(n log n) overall instead of re-sorting every
    key ever seen for each batch."""

    def __init__(self, keys: np.ndarray | None = None):
        self._sorted = unique_sorted(np.asarray(keys if keys is not None else [], dtype=np.uint64))
        self._recent: list[np.ndarray] = []
        self._recent_size = 0

    @classmethod
    def from_sorted(cls, keys: np.ndarray) -> KeySet:
        """A set of ``keys`` that are already sorted and distinct (``sorted_keys()``): no sort."""
        keyset = cls()
        keyset._sorted = np.asarray(keys, dtype=np.uint64)
        return keyset

    def sorted_keys(self) -> np.ndarray:
        """Every key, sorted and distinct: the recent ones merged into the sorted array by
        position, O(n), not a sort of all."""
        if not self._recent_size:
            return self._sorted
        recent = unique_sorted(np.concatenate(self._recent))
        recent = recent[~self.contains_sorted(recent)]
        return np.insert(self._sorted, np.searchsorted(self._sorted, recent), recent)

    def contains_sorted(self, keys: np.ndarray) -> np.ndarray:
        """Membership of ``keys`` in the sorted part only."""
        keys = np.asarray(keys, dtype=np.uint64)
        if not len(self._sorted):
            return np.zeros(len(keys), dtype=bool)
        at = np.minimum(np.searchsorted(self._sorted, keys), len(self._sorted) - 1)
        return self._sorted[at] == keys

    def __len__(self) -> int:
        return len(self._sorted) + self._recent_size

    def add(self, keys: np.ndarray) -> None:
        self._recent.append(np.asarray(keys, dtype=np.uint64))
        self._recent_size += len(keys)
        if self._recent_size > max(len(self._sorted) // 4, 4096):
            self._sorted = unique_sorted(np.concatenate([self._sorted, *self._recent]))
            self._recent, self._recent_size = [], 0

    def contains(self, keys: np.ndarray) -> np.ndarray:
        keys = np.asarray(keys, dtype=np.uint64)
        found = self.contains_sorted(keys)
        if self._recent_size:
            found |= np.isin(keys, np.concatenate(self._recent))
        return found


def _mask(values) -> np.ndarray:
    if isinstance(values, pd.Series):
        return values.fillna(False).to_numpy(dtype=bool)
    return np.asarray(values, dtype=bool)


def split_valid_rows(
    events: pd.DataFrame,
    *,
    now: float | None = None,
    min_timestamp: int = DEFAULT_MIN_TIMESTAMP,
    max_clock_skew_s: int = MAX_CLOCK_SKEW_S,
    seen_keys: KeySet | np.ndarray | None = None,
    keys: np.ndarray | None = None,
    batches: np.ndarray | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return (valid rows, quarantined rows with a ``reason`` column), order preserved.

    A ``problem`` column (text, missing where fine), as the lake stores it, is the first
    rule; it is not part of either output. ``seen_keys`` are ``event_keys`` of events validated
    before (a ``KeySet`` or an array); ``keys`` may pass this frame's ``event_keys`` when the
    caller has them already. ``batches`` (one number per row, rows of a batch contiguous and in
    batch order) validates several batches at once with the reasons one-by-one validation
    gives: a repeat within a batch is a "duplicate event", a repeat of a valid row of an
    earlier batch a "duplicate of an event in an earlier batch".
    """
    now = time.time() if now is None else now
    n = len(events)
    reasons = [""]
    code = np.zeros(n, dtype=np.int16)

    def flag(mask, text: str) -> None:
        reasons.append(text)
        code[(code == 0) & _mask(mask)] = len(reasons) - 1

    problem = events["problem"] if "problem" in events else pd.Series(pd.NA, index=events.index, dtype="string")
    has_problem = _mask(problem.notna())
    code[has_problem] = -1
    for column in ("user_id", "item_id", "event_type", "timestamp"):
        flag(events[column].isna(), f"missing {column}")
    item = events["item_id"].astype("string")
    flag(item.str.len() > MAX_ID_CHARS, f"item_id longer than {MAX_ID_CHARS} characters")
    if "request_id" in events:
        flag(events["request_id"].astype("string").str.len() > MAX_ID_CHARS,
             f"request_id longer than {MAX_ID_CHARS} characters")
    flag(item.str.contains(_CONTROL_CHARS, regex=True), "control characters in item_id")
    flag(~events["event_type"].isin(EVENT_TYPES), "unknown event_type")

    value = events["value"].to_numpy(dtype="float64", na_value=np.nan)
    is_rating = _mask(events["event_type"] == "rating")
    low, high = RATING_RANGE
    flag(is_rating & np.isnan(value), "rating without a value")
    with np.errstate(invalid="ignore"):
        flag(is_rating & ~((value >= low) & (value <= high)), f"rating outside [{low}, {high}]")
        flag(~np.isnan(value) & ~np.isfinite(value), "non-finite value")
        flag(value < 0, "negative value")

    stamp = events["timestamp"].to_numpy(dtype="float64", na_value=np.nan)
    with np.errstate(invalid="ignore"):
        flag(stamp >= MILLISECONDS_FROM, "timestamp in the future (milliseconds? expected epoch seconds)")
        flag(stamp > now + max_clock_skew_s, "timestamp in the future")
        flag(stamp < min_timestamp, f"timestamp before the floor ({_date(min_timestamp)})")

    keys = event_keys(events) if keys is None else keys
    batches = np.zeros(n, dtype=np.int64) if batches is None else np.asarray(batches)
    fine = code == 0
    repeats = pd.DataFrame({"batch": batches[fine], "key": keys[fine]})
    within, anywhere = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
    within[fine] = repeats.duplicated(keep="first").to_numpy()
    anywhere[fine] = repeats["key"].duplicated(keep="first").to_numpy()
    flag(within, "duplicate event")
    earlier = anywhere & ~within
    if seen_keys is not None and len(seen_keys):
        seen_keys = seen_keys if isinstance(seen_keys, KeySet) else KeySet(seen_keys)
        earlier |= seen_keys.contains(keys)
    flag(earlier, "duplicate of an event in an earlier batch")

    bad = code != 0
    text = np.asarray(reasons, dtype=object)[np.maximum(code, 0)]
    text[has_problem] = problem.to_numpy(dtype=object)[has_problem]
    columns = [c for c in events.columns if c != "problem"]
    quarantined = events.loc[bad, columns].assign(reason=pd.array(text[bad], dtype="string"))
    return events.loc[~bad, columns], quarantined


def _date(epoch: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(epoch))


def expectation_suite(min_timestamp: int = DEFAULT_MIN_TIMESTAMP, now: float | None = None):
    """The Great Expectations suite every validated feedback table must pass."""
    import great_expectations as gx

    now = time.time() if now is None else now
    low, high = RATING_RANGE
    e = gx.expectations
    rating = {"row_condition": 'event_type=="rating"', "condition_parser": "pandas"}
    suite = gx.ExpectationSuite(name="validated_feedback")
    for column in EVENT_COLUMNS:
        suite.add_expectation(e.ExpectColumnToExist(column=column))
    for column in ("user_id", "item_id", "event_type", "timestamp"):
        suite.add_expectation(e.ExpectColumnValuesToNotBeNull(column=column))
    suite.add_expectation(e.ExpectColumnValuesToBeOfType(column="timestamp", type_="int64"))
    suite.add_expectation(e.ExpectColumnValuesToBeOfType(column="value", type_="float64"))
    suite.add_expectation(e.ExpectColumnValuesToBeInSet(column="event_type", value_set=EVENT_TYPES))
    # Privacy: raw user ids never reach training (the row rules cannot see this: stricter).
    suite.add_expectation(e.ExpectColumnValuesToMatchRegex(column="user_id", regex=PSEUDONYM_PATTERN))
    suite.add_expectation(e.ExpectColumnValueLengthsToBeBetween(column="item_id", min_value=1, max_value=MAX_ID_CHARS))
    suite.add_expectation(e.ExpectColumnValueLengthsToBeBetween(column="text", max_value=MAX_TEXT_CHARS))
    suite.add_expectation(e.ExpectColumnValuesToBeBetween(
        column="timestamp", min_value=min_timestamp, max_value=int(now) + MAX_CLOCK_SKEW_S))
    suite.add_expectation(e.ExpectColumnValuesToBeBetween(column="value", min_value=0))
    suite.add_expectation(e.ExpectColumnValuesToNotBeNull(column="value", **rating))
    suite.add_expectation(e.ExpectColumnValuesToBeBetween(column="value", min_value=low, max_value=high, **rating))
    suite.add_expectation(e.ExpectCompoundColumnsToBeUnique(column_list=DUPLICATE_KEY))
    return suite


@dataclass
class SuiteResult:
    """What ``run_expectations`` found: overall success, one summary per expectation, and
    which rows it looked at."""

    success: bool
    results: list[dict] = field(default_factory=list)
    rows_total: int = 0
    rows_checked: int = 0
    sampled: bool = False

    @property
    def failed(self) -> list[dict]:
        return [r for r in self.results if not r["success"]]


def _for_ge(events: pd.DataFrame) -> pd.DataFrame:
    """Plain numpy/object columns (GE's pandas backend predates Arrow strings); ``timestamp``
    stays int64 unless it holds missing values, which the suite then reports."""
    frame = events.copy()
    for column in frame.columns:
        if column == "timestamp":
            has_na = frame[column].isna().any()
            frame[column] = frame[column].astype("float64" if has_na else "int64")
        elif column == "value":
            frame[column] = frame[column].astype("float64")
        elif not pd.api.types.is_numeric_dtype(frame[column]):
            frame[column] = frame[column].astype(object).where(frame[column].notna(), None)
    return frame


def run_expectations(
    events: pd.DataFrame,
    min_timestamp: int = DEFAULT_MIN_TIMESTAMP,
    *,
    now: float | None = None,
    max_rows: int = GE_MAX_ROWS,
    seed: int = 0,
) -> SuiteResult:
    """Validate ``events`` (or a seeded sample of ``max_rows`` of them) with Great Expectations."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx

    sampled = len(events) > max_rows
    rows = events.sample(n=max_rows, random_state=seed).sort_index() if sampled else events
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = {"globally": False}
    batch_definition = (
        context.data_sources.add_pandas("feedback")
        .add_dataframe_asset("events")
        .add_batch_definition_whole_dataframe("all_rows")
    )
    result = batch_definition.get_batch(batch_parameters={"dataframe": _for_ge(rows)}).validate(
        expectation_suite(min_timestamp, now)
    )
    summaries = []
    for item in result.results:
        config = item.expectation_config
        summaries.append({
            "expectation": config.type,
            "column": config.kwargs.get("column") or config.kwargs.get("column_list"),
            "condition": config.kwargs.get("row_condition"),
            "success": bool(item.success),
            "unexpected_count": int(item.result.get("unexpected_count") or 0),
            "examples": [str(v) for v in (item.result.get("partial_unexpected_list") or [])[:5]],
        })
    return SuiteResult(bool(result.success), summaries, len(events), len(rows), sampled)
