"""Row-level validation of feedback events and the Great Expectations suite behind the checks.

Rows that break a rule are never dropped silently: ``split_valid_rows`` returns them with a
``reason`` so the caller can quarantine them, and ``rows_in = rows_valid + rows_quarantined``
always holds. The Great Expectations suite then re-checks the rows that went on, inside a
blocking Dagster asset check, so a defect in the row rules cannot slip into training.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pandas as pd

from rec_models.schema import EVENT_TYPES, RATING_RANGE

DEFAULT_MIN_TIMESTAMP = 946_684_800  # 2000-01-01: anything older is a unit mistake
MAX_CLOCK_SKEW_S = 3600
DUPLICATE_KEY = ["user_id", "item_id", "event_type", "timestamp", "value"]


def split_valid_rows(
    events: pd.DataFrame,
    *,
    now: float | None = None,
    min_timestamp: int = DEFAULT_MIN_TIMESTAMP,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return (valid rows, quarantined rows with a ``reason`` column). Order is preserved."""
    now = time.time() if now is None else now
    reason = pd.Series(pd.NA, index=events.index, dtype="string")

    def flag(mask, text: str) -> None:
        mask = pd.Series(mask, index=events.index).fillna(False).astype(bool)
        reason.loc[mask & reason.isna()] = text

    for column in ("user_id", "item_id", "event_type", "timestamp"):
        flag(events[column].isna(), f"missing {column}")
    flag(~events["event_type"].isin(EVENT_TYPES), "unknown event_type")
    is_rating = events["event_type"] == "rating"
    low, high = RATING_RANGE
    flag(is_rating & ~events["value"].between(low, high), f"rating outside [{low}, {high}]")
    flag(events["value"].notna() & ~np.isfinite(events["value"].astype("float64")), "non-finite value")
    flag(events["value"] < 0, "negative value")
    flag(events["timestamp"] > now + MAX_CLOCK_SKEW_S, "timestamp in the future")
    flag(events["timestamp"] < min_timestamp, "timestamp before the floor")
    flag(events.duplicated(DUPLICATE_KEY, keep="first") & reason.isna(), "duplicate event")

    bad = reason.notna()
    quarantined = events[bad].assign(reason=reason[bad])
    return events[~bad], quarantined


def expectation_suite(min_timestamp: int = DEFAULT_MIN_TIMESTAMP):
    """The Great Expectations suite every validated feedback table must pass."""
    import great_expectations as gx

    low, high = RATING_RANGE
    suite = gx.ExpectationSuite(name="validated_feedback")
    for column in ("user_id", "item_id", "event_type", "timestamp"):
        suite.add_expectation(gx.expectations.ExpectColumnValuesToNotBeNull(column=column))
    suite.add_expectation(gx.expectations.ExpectColumnValuesToBeInSet(column="event_type", value_set=EVENT_TYPES))
    suite.add_expectation(
        gx.expectations.ExpectColumnValuesToBeBetween(
            column="timestamp", min_value=min_timestamp, max_value=int(time.time()) + MAX_CLOCK_SKEW_S
        )
    )
    suite.add_expectation(
        gx.expectations.ExpectColumnValuesToBeBetween(
            column="value", min_value=low, max_value=high, row_condition='event_type=="rating"',
            condition_parser="pandas",
        )
    )
    suite.add_expectation(gx.expectations.ExpectCompoundColumnsToBeUnique(column_list=DUPLICATE_KEY))
    return suite


def run_expectations(events: pd.DataFrame, min_timestamp: int = DEFAULT_MIN_TIMESTAMP) -> tuple[bool, list[dict]]:
    """Validate ``events`` with Great Expectations; return (success, one summary per expectation)."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = {"globally": False}
    batch_definition = (
        context.data_sources.add_pandas("feedback")
        .add_dataframe_asset("events")
        .add_batch_definition_whole_dataframe("all_rows")
    )
    frame = events.astype({"value": "float64", "timestamp": "int64"})
    result = batch_definition.get_batch(batch_parameters={"dataframe": frame}).validate(
        expectation_suite(min_timestamp)
    )
    summaries = []
    for item in result.results:
        config = item.expectation_config
        summaries.append({
            "expectation": config.type,
            "column": config.kwargs.get("column") or config.kwargs.get("column_list"),
            "success": bool(item.success),
            "unexpected_count": int(item.result.get("unexpected_count") or 0),
            "examples": [str(v) for v in (item.result.get("partial_unexpected_list") or [])[:5]],
        })
    return bool(result.success), summaries
