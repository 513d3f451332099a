"""Row rules with quarantine reasons, and the Great Expectations suite behind the check."""

import time

import numpy as np
import pandas as pd

from rec_pipelines.validation import run_expectations, split_valid_rows

NOW = int(time.time())


def events(**overrides):
    base = {"user_id": ["u1"], "item_id": ["i1"], "event_type": ["view"], "value": [3.0],
            "timestamp": [NOW - 100], "session_id": [None], "text": [None]}
    base.update({k: [v] for k, v in overrides.items()})
    frame = pd.DataFrame(base)
    return frame.astype({"user_id": "string", "item_id": "string", "event_type": "string",
                         "value": "float64", "timestamp": "Int64"})


def test_good_rows_pass_and_bad_rows_carry_a_reason():
    frame = pd.concat([
        events(),
        events(user_id=None),
        events(event_type="teleport"),
        events(event_type="rating", value=7.0),
        events(timestamp=NOW + 10 * 86400),
        events(timestamp=1000),
        events(value=np.inf),
        events(),  # exact duplicate of the first row
    ], ignore_index=True)
    valid, quarantined = split_valid_rows(frame, now=NOW)
    assert len(valid) + len(quarantined) == len(frame)
    assert valid.index.tolist() == [0]
    assert quarantined["reason"].tolist() == [
        "missing user_id", "unknown event_type", "rating outside [0.5, 5.0]", "timestamp in the future",
        "timestamp before the floor", "non-finite value", "duplicate event",
    ]


def test_expectations_pass_on_valid_rows_and_fail_with_examples():
    good = pd.concat([events(), events(item_id="i2", event_type="rating", value=4.0)], ignore_index=True)
    ok, results = run_expectations(good)
    assert ok and all(r["success"] for r in results)
    bad = pd.concat([good, events(event_type="teleport")], ignore_index=True)
    ok, results = run_expectations(bad)
    failed = [r for r in results if not r["success"]]
    assert not ok and [r["expectation"] for r in failed] == ["expect_column_values_to_be_in_set"]
    assert failed[0]["examples"] == ["teleport"]
