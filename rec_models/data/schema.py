"""The shapes every stage agrees on: feedback events, catalog items, event types.

An *event* is one piece of user feedback. In memory it is a row of a pandas DataFrame with
the columns of ``EVENT_COLUMNS``; on disk a line of JSON Lines (or a CSV/Parquet row) with the
same names. Timestamps are integer epoch seconds (int64, never float32: float32 merges
neighbouring seconds).

A *catalog item* is a row with the columns of ``CATALOG_COLUMNS``; ``tags`` is a list of
strings.
"""

from __future__ import annotations

EVENT_COLUMNS = ["user_id", "item_id", "event_type", "value", "timestamp", "session_id", "text"]
REQUIRED_EVENT_COLUMNS = ["user_id", "item_id", "event_type", "timestamp"]
# Optional: the ``request_id`` of the served list an event answers (from ``recsys serve``'s
# answer); the lake keeps it, so online metrics can attribute the event to that list.
OPTIONAL_EVENT_COLUMNS = ["request_id"]
EVENT_DTYPES = {
    "user_id": "string",
    "item_id": "string",
    "event_type": "string",
    "value": "float64",
    "timestamp": "int64",
    "session_id": "string",
    "text": "string",
}

# Ordered: the position is the event type's index as a model input feature (0 is padding).
EVENT_TYPES = ["view", "click", "like", "rating", "purchase", "review", "skip", "dislike"]
EVENT_TYPE_INDEX = {name: i + 1 for i, name in enumerate(EVENT_TYPES)}
NEGATIVE_EVENT_TYPES = frozenset({"skip", "dislike"})

# How much an event says about a user's taste; negatives are excluded from sequences.
DEFAULT_EVENT_WEIGHTS = {
    "view": 0.5,
    "click": 1.0,
    "like": 2.0,
    "rating": 1.5,  # scaled by the rating value in preprocessing
    "purchase": 3.0,
    "review": 2.0,
    "skip": -1.0,
    "dislike": -2.0,
}
RATING_RANGE = (0.5, 5.0)

CATALOG_COLUMNS = ["item_id", "title", "description", "category", "tags"]

# What ``recsys serve`` served: one row per recommended item of one answered request row.
IMPRESSION_COLUMNS = ["request_id", "user_id", "item_id", "rank", "model_version", "arm", "timestamp"]
REQUIRED_IMPRESSION_COLUMNS = ["request_id", "user_id", "item_id", "rank", "arm", "timestamp"]
