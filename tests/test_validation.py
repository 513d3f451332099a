"""Row rules with quarantine reasons, and the Great Expectations suite behind the check."""

import time

import numpy as np
import pandas as pd

from rec_models.data.privacy import pseudonymize
from rec_pipelines.lake.validation import (
    MAX_TEXT_CHARS,
    event_keys,
    run_expectations,
    split_valid_rows,
)

NOW = int(time.time())
USER = pseudonymize(["u1"], "k" * 32)[0]


def events(**overrides):
    base = {"user_id": [USER], "item_id": ["i1"], "event_type": ["view"], "value": [3.0],
            "timestamp": [NOW - 100], "session_id": [None], "text": [None]}
    base.update({k: [v] for k, v in overrides.items()})
    frame = pd.DataFrame(base)
    return frame.astype({"user_id": "string", "item_id": "string", "event_type": "string", "session_id": "string",
                         "text": "string", "value": "float64", "timestamp": "Int64"})


def test_good_rows_pass_and_bad_rows_carry_a_reason():
    frame = pd.concat([
        events(),
        events(user_id=None),
        events(event_type="teleport"),
        events(event_type="rating", value=7.0),
        events(event_type="rating", value=np.nan),
        events(timestamp=NOW + 10 * 86400),
        events(timestamp=NOW * 1000),
        events(timestamp=1000),
        events(value=np.inf),
        events(value=-1.0),
        events(item_id="i\x00"),
        events(item_id="x" * 300),
        events(),  # exact duplicate of the first row
    ], ignore_index=True)
    valid, quarantined = split_valid_rows(frame, now=NOW)
    assert len(valid) + len(quarantined) == len(frame)
    assert valid.index.tolist() == [0]
    assert quarantined["reason"].tolist() == [
        "missing user_id", "unknown event_type", "rating outside [0.5, 5.0]", "rating without a value",
        "timestamp in the future", "timestamp in the future (milliseconds? expected epoch seconds)",
        "timestamp before the floor (1995-01-01)", "non-finite value", "negative value",
        "control characters in item_id", "item_id longer than 256 characters", "duplicate event",
    ]


def test_parse_problems_come_first_and_the_floor_and_skew_are_configurable():
    frame = pd.concat([events(), events(timestamp=NOW - 100), events(timestamp=NOW + 600)], ignore_index=True)
    frame["problem"] = pd.array([None, "value is not a number", None], dtype="string")
    valid, quarantined = split_valid_rows(frame, now=NOW, min_timestamp=NOW - 50, max_clock_skew_s=60)
    assert valid.empty and "problem" not in quarantined.columns
    assert quarantined["reason"].str.slice(0, 26).tolist() == [
        "timestamp before the floor", "value is not a number", "timestamp in the future"]


def test_duplicates_of_earlier_batches_are_caught_by_key():
    earlier = pd.concat([events(), events(item_id="i2")], ignore_index=True)
    batch = pd.concat([events(item_id="i2"), events(item_id="i3")], ignore_index=True)
    valid, quarantined = split_valid_rows(batch, now=NOW, seen_keys=event_keys(earlier))
    assert valid["item_id"].tolist() == ["i3"]
    assert quarantined["reason"].tolist() == ["duplicate of an event in an earlier batch"]
    assert event_keys(events()).tolist() == event_keys(events()).tolist()  # stable
    assert event_keys(events()).tolist() != event_keys(events(value=3.5)).tolist()


def test_expectations_pass_on_valid_rows_and_fail_with_examples():
    good = pd.concat([events(), events(item_id="i2", event_type="rating", value=4.0)], ignore_index=True)
    result = run_expectations(good)
    assert result.success and not result.failed and not result.sampled and result.rows_checked == 2
    bad = pd.concat([good, events(event_type="teleport")], ignore_index=True)
    result = run_expectations(bad)
    assert not result.success and [r["expectation"] for r in result.failed] == ["expect_column_values_to_be_in_set"]
    assert result.failed[0]["examples"] == ["teleport"]


def test_the_suite_is_stricter_than_the_row_rules():
    # Rows the row rules accept: a raw user id and an over-long text (ingest would have
    # pseudonymised and truncated them). The suite catches both.
    rows = pd.concat([events(user_id="u00042"), events(item_id="i2", text="x" * (MAX_TEXT_CHARS + 1))],
                     ignore_index=True)
    valid, _ = split_valid_rows(rows, now=NOW)
    assert len(valid) == 2
    failed = {(r["expectation"], r["column"]) for r in run_expectations(valid).failed}
    assert failed == {("expect_column_values_to_match_regex", "user_id"),
                      ("expect_column_value_lengths_to_be_between", "text")}


def test_large_tables_are_checked_on_a_seeded_sample():
    rows = pd.concat([events(item_id=f"i{k}") for k in range(50)], ignore_index=True)
    result = run_expectations(rows, max_rows=20)
    assert result.success and result.sampled and (result.rows_total, result.rows_checked) == (50, 20)


def test_a_key_set_merges_its_recent_keys_into_one_sorted_distinct_array():
    from rec_pipelines.lake.validation import KeySet

    rng = np.random.default_rng(0)
    first = rng.integers(0, 2**63, 50_000, dtype=np.uint64)
    keys = KeySet(np.concatenate([first, first[:10]]))  # repeats are kept once
    later = [np.concatenate([rng.integers(0, 2**63, 300, dtype=np.uint64), first[100:105]]) for _ in range(3)]
    for part in later:
        keys.add(part)
    expected = np.unique(np.concatenate([first, *later]))
    merged = keys.sorted_keys()
    assert merged.dtype == np.uint64 and np.array_equal(merged, expected)
    again = KeySet.from_sorted(merged)
    probe = np.concatenate([expected[::97], rng.integers(0, 2**63, 1_000, dtype=np.uint64)])
    assert np.array_equal(again.contains(probe), np.isin(probe, expected))
    assert np.array_equal(keys.contains(probe), again.contains(probe))
