"""Per-user and per-item features from validated feedback (counts, recency, weighted
engagement, rating habits), with bot-like users flagged, never dropped (docs/data.md)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from rec_models.data import MIN_RATING, unique_sorted
from rec_models.data.schema import DEFAULT_EVENT_WEIGHTS, EVENT_TYPES

DAY_S = 86_400
RECENCY_HALF_LIFE_DAYS = 30.0


@dataclass
class FeedbackFeatures:
    """Per-user and per-item feature tables, the weights used and the reference time."""

    users: pd.DataFrame
    items: pd.DataFrame
    weights: dict[str, float]
    as_of: int  # epoch seconds recency is measured from (the newest event)
    max_events_per_minute: int = 30  # the bot rule the flags follow (``flag_bots``)
    sustained_minutes: int = 3

    def bot_users(self) -> set[str]:
        """The users flagged bot-like."""
        return set(self.users.loc[self.users["bot_like"], "user_id"].astype(str))

    def flag_bots(self, events: pd.DataFrame) -> set[str]:
        """The bot-like users of ``events`` (all rows of each user in it) under this rule."""
        flags = flag_bots(events, self.max_events_per_minute, self.sustained_minutes)
        return set(flags.index[flags["bot_like"]].astype(str))


def resolve_weights(overrides: Mapping[str, float] | None = None) -> dict[str, float]:
    """``DEFAULT_EVENT_WEIGHTS`` with ``overrides`` applied; unknown event types are an error."""
    unknown = sorted(set(overrides or {}) - set(EVENT_TYPES))
    if unknown:
        raise ValueError(f"weights for unknown event types {unknown}; known: {EVENT_TYPES}")
    return {**DEFAULT_EVENT_WEIGHTS, **{k: float(v) for k, v in (overrides or {}).items()}}


def event_weights(events: pd.DataFrame, weights: Mapping[str, float] | None = None) -> np.ndarray:
    """One weight per event: its type's weight, a rating's scaled by ``value / 5``."""
    weights = resolve_weights(weights)
    weight = events["event_type"].map(weights).to_numpy(dtype="float64", na_value=np.nan)
    value = events["value"].to_numpy(dtype="float64", na_value=np.nan)
    is_rating = (events["event_type"] == "rating").fillna(False).to_numpy(dtype=bool)
    return np.where(is_rating, weight * value / 5.0, weight)


def flag_bots(events: pd.DataFrame, max_events_per_minute: int = 30, sustained_minutes: int = 3) -> pd.DataFrame:
    """Per user: ``peak_events_per_minute`` (events in their busiest clock minute),
    ``busy_minutes`` (minutes with at least ``max_events_per_minute`` events) and ``bot_like``
    (``busy_minutes >= sustained_minutes``). Indexed by user_id."""
    codes, users = pd.factorize(events["user_id"])
    minute = events["timestamp"].to_numpy(dtype="int64") // 60
    if not len(codes):
        return pd.DataFrame({"peak_events_per_minute": [], "busy_minutes": [], "bot_like": []},
                            index=pd.Index([], name="user_id"))
    key = codes.astype(np.int64) * (int(minute.max() - minute.min()) + 1) + (minute - minute.min())
    buckets, counts = np.unique(key, return_counts=True)
    bucket_user = buckets // (int(minute.max() - minute.min()) + 1)
    peak = np.zeros(len(users), dtype=np.int64)
    np.maximum.at(peak, bucket_user, counts)
    busy = np.bincount(bucket_user, weights=counts >= max_events_per_minute, minlength=len(users)).astype(np.int64)
    return pd.DataFrame({"peak_events_per_minute": peak, "busy_minutes": busy,
                         "bot_like": busy >= sustained_minutes},
                        index=pd.Index(np.asarray(users, dtype=object), name="user_id"))


def _per_group(codes: np.ndarray, n: int, values: np.ndarray) -> np.ndarray:
    return np.bincount(codes, weights=values, minlength=n)


def _distinct_per_group(codes: np.ndarray, other: pd.Series, n: int) -> np.ndarray:
    other_codes, _ = pd.factorize(other)
    pairs = unique_sorted(codes.astype(np.int64) * (int(other_codes.max()) + 1) + other_codes)
    return np.bincount(pairs // (int(other_codes.max()) + 1), minlength=n)


def _sessions(user_codes: np.ndarray, timestamps: np.ndarray, n: int, gap_s: int) -> np.ndarray:
    order = np.lexsort((timestamps, user_codes))
    u, t = user_codes[order], timestamps[order]
    starts = np.r_[True, (u[1:] != u[:-1]) | (np.diff(t) > gap_s)] if len(u) else np.zeros(0, dtype=bool)
    return np.bincount(u[starts], minlength=n)


def compute_features(
    events: pd.DataFrame,
    weights: Mapping[str, float] | None = None,
    *,
    as_of: int | None = None,
    max_events_per_minute: int = 30,
    sustained_minutes: int = 3,
    session_gap_s: int = 1800,
) -> FeedbackFeatures:
    """User and item features of validated ``events`` (columns of ``schema.EVENT_COLUMNS``)."""
    resolved = resolve_weights(weights)
    timestamps = events["timestamp"].to_numpy(dtype="int64")
    as_of = int(timestamps.max()) if as_of is None and len(timestamps) else int(as_of or 0)
    weight = event_weights(events, resolved)
    value = events["value"].to_numpy(dtype="float64", na_value=np.nan)
    is_rating = (events["event_type"] == "rating").fillna(False).to_numpy(dtype=bool)
    positive = (weight > 0) & ~(is_rating & ~(value >= MIN_RATING))
    negative = weight < 0
    rated = is_rating & ~np.isnan(value)

    user_codes, user_ids = pd.factorize(events["user_id"])
    n_users = len(user_ids)
    bots = flag_bots(events, max_events_per_minute, sustained_minutes).reindex(np.asarray(user_ids, dtype=object))
    first = np.full(n_users, np.iinfo(np.int64).max)
    last = np.full(n_users, np.iinfo(np.int64).min)
    np.minimum.at(first, user_codes, timestamps)
    np.maximum.at(last, user_codes, timestamps)
    counts = np.bincount(user_codes, minlength=n_users)
    active_days = _distinct_per_group(user_codes, pd.Series(timestamps // DAY_S), n_users) if n_users else counts
    ratings = _per_group(user_codes, n_users, rated.astype(float))
    engagement = _per_group(user_codes, n_users, weight)
    users = pd.DataFrame({
        "user_id": pd.array(np.asarray(user_ids, dtype=object), dtype="string"),
        "events": counts,
        "positive_events": _per_group(user_codes, n_users, positive.astype(float)).astype(np.int64),
        "negative_events": _per_group(user_codes, n_users, negative.astype(float)).astype(np.int64),
        "items": _distinct_per_group(user_codes, events["item_id"], n_users) if n_users else counts,
        "sessions": _sessions(user_codes, timestamps, n_users, session_gap_s),
        "first_timestamp": first,
        "last_timestamp": last,
        "recency_days": (as_of - last) / DAY_S,
        "active_days": active_days,
        "engagement": engagement,
        "mean_rating": np.divide(_per_group(user_codes, n_users, np.where(rated, value, 0.0)), ratings,
                                 out=np.full(n_users, np.nan), where=ratings > 0),
        "peak_events_per_minute": bots["peak_events_per_minute"].to_numpy(),
        "busy_minutes": bots["busy_minutes"].to_numpy(),
        "bot_like": bots["bot_like"].to_numpy(dtype=bool),
    })
    users["recency_weight"] = 0.5 ** (users["recency_days"] / RECENCY_HALF_LIFE_DAYS)
    users["activity_pct"] = users["events"].rank(pct=True)

    item_codes, item_ids = pd.factorize(events["item_id"])
    n_items = len(item_ids)
    human = ~bots["bot_like"].to_numpy(dtype=bool)[user_codes] if n_users else np.ones(0, dtype=bool)
    item_counts = np.bincount(item_codes, minlength=n_items)
    item_first = np.full(n_items, np.iinfo(np.int64).max)
    item_last = np.full(n_items, np.iinfo(np.int64).min)
    np.minimum.at(item_first, item_codes, timestamps)
    np.maximum.at(item_last, item_codes, timestamps)
    item_ratings = _per_group(item_codes, n_items, rated.astype(float))
    items = pd.DataFrame({
        "item_id": pd.array(np.asarray(item_ids, dtype=object), dtype="string"),
        "events": item_counts,
        "users": _distinct_per_group(item_codes, events["user_id"], n_items) if n_items else item_counts,
        "positive_events": _per_group(item_codes, n_items, positive.astype(float)).astype(np.int64),
        "negative_events": _per_group(item_codes, n_items, negative.astype(float)).astype(np.int64),
        "weighted_popularity": _per_group(item_codes, n_items, np.where(human, weight, 0.0)),
        "bot_event_share": np.divide(_per_group(item_codes, n_items, (~human).astype(float)), item_counts,
                                     out=np.zeros(n_items), where=item_counts > 0),
        "first_timestamp": item_first,
        "last_timestamp": item_last,
        "recency_days": (as_of - item_last) / DAY_S,
        "mean_rating": np.divide(_per_group(item_codes, n_items, np.where(rated, value, 0.0)), item_ratings,
                                 out=np.full(n_items, np.nan), where=item_ratings > 0),
    })
    items["popularity_pct"] = items["weighted_popularity"].rank(pct=True)
    return FeedbackFeatures(users=users, items=items, weights=resolved, as_of=as_of,
                            max_events_per_minute=max_events_per_minute, sustained_minutes=sustained_minutes)
