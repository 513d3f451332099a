"""The simulator's size (``SimulatorConfig``), the behaviour knobs that shape its world, its
random streams and its internal item and user tables."""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import TypeVar

import numpy as np

from rec_models.data.schema import (
    EVENT_TYPES,
)
from rec_models.simulator.vocabulary import CATEGORIES


@dataclass(frozen=True)
class SimulatorConfig:
    """Sizes and seed of the simulated world (the defaults give ~80k events in batch 0)."""

    n_items: int = 3000
    n_users: int = 2000
    seed: int = 7
    events_per_user: int = 40  # mean length of a user's initial history (batch 0)
    batch_users: int = 150  # users active in each later batch, ~10% of them brand new
    batch_events_per_user: int = 6
    batch_new_items: int = 25  # catalog additions in each later batch
    start_time: int = 1_700_000_000  # epoch seconds at which batch 0 begins

    def __post_init__(self) -> None:
        if self.n_items < len(CATEGORIES):
            raise ValueError(f"n_items must be at least {len(CATEGORIES)} (one item per category)")
        for name in ("n_users", "events_per_user", "batch_users", "batch_events_per_user"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.batch_new_items < 0:
            raise ValueError("batch_new_items must not be negative")


# --------------------------------------------------------------------------------------------
# Behaviour knobs (documented here rather than in the config: they shape the world, not its size)
# --------------------------------------------------------------------------------------------

BATCH0_DAYS = 90  # span of the initial history
BATCH_HOURS = 6  # span of each later micro-batch
DRIFT_DAYS = 60  # time for a user's taste to move fully from early to late mixture
NEW_USER_SHARE = 0.1  # share of brand-new users among a later batch's active users
DRIFT_USER_SHARE = 0.4  # users who pick up a new favourite category over time
DRIFT_CATEGORY_WEIGHT = 0.3
FAVOURITE_COUNT_PROBS = (0.3, 0.45, 0.25)  # P(1, 2, 3 favourite categories)
FAVOURITE_TAG_DRAWS = 5  # tags drawn (with repeats) from a user's favourite categories
STYLE_DIM = 8

ZIPF_EXPONENT = 1.0  # popularity of the item of popularity rank r is ~ (r + 1) ** -ZIPF_EXPONENT
TAG_WEIGHT = 1.0  # preference per tag shared by the user and the item
STYLE_WEIGHT = 0.6
POPULARITY_WEIGHT = 0.4  # a mild global popularity term
NEW_ITEM_BOOST = 2.0  # extra preference for an item in its arrival batch, halving each batch after

P_NEW_SESSION = 1 / 7  # chance an event opens a new session (mean session length ~7)
P_STAY_IN_CATEGORY = 0.75  # within a session: keep browsing the previous event's category
P_FOLLOW_SIMILAR = 0.6  # when staying: open one of the previous item's nearest neighbours
P_EXPLORE = 0.08  # a new category is drawn uniformly instead of from the user's taste
N_NEIGHBOURS = 10
NEIGHBOUR_STYLE_WEIGHT = 0.5  # item similarity = tag cosine + this * style cosine

IN_SESSION_GAP_MIN_S = 5.0  # seconds between events of one session: min + exponential(mean)
IN_SESSION_GAP_MEAN_S = 60.0
ACTIVE_SPAN_RANGE = (0.5, 1.0)  # share of their remaining window a user's sessions spread over

# How much a user likes an item: sigmoid(bias + weights * evidence + noise) in (0, 1).
LIKING_BIAS = -1.8
LIKING_IN_TASTE = 2.5  # the item's category is in the user's current taste at all
LIKING_CATEGORY_WEIGHT = 1.5  # times the category's share of the current taste
LIKING_TAG = 0.7  # per shared tag (capped at 3)
LIKING_NOISE = 0.6
# Event-type mixtures (in EVENT_TYPES order) for a fully liked and a fully disliked item; an
# event's mixture interpolates between them by its liking.
_MIX_LIKED = {"view": 0.44, "click": 0.24, "like": 0.12, "rating": 0.07, "purchase": 0.06,
              "review": 0.03, "skip": 0.03, "dislike": 0.01}
_MIX_DISLIKED = {"view": 0.40, "click": 0.08, "like": 0.01, "rating": 0.06, "purchase": 0.005,
                 "review": 0.015, "skip": 0.32, "dislike": 0.11}
EVENT_MIX_LIKED = np.array([_MIX_LIKED[t] for t in EVENT_TYPES])
EVENT_MIX_DISLIKED = np.array([_MIX_DISLIKED[t] for t in EVENT_TYPES])

# Independent random streams: (seed, stream, batch) seeds one numpy Generator.
_STREAM_SHARES, _STREAM_ITEMS, _STREAM_USERS, _STREAM_EVENTS = 1, 2, 3, 4
_EVENTS_FILE = re.compile(r"events-(\d+)\.jsonl")


def _rng(seed: int, stream: int, batch: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream, batch])


# --------------------------------------------------------------------------------------------
# Internal tables: dataclasses of equal-length numpy arrays, one row per item / user
# --------------------------------------------------------------------------------------------

_Table = TypeVar("_Table")


def _stack(parts: list[_Table]) -> _Table:
    """Concatenate tables of the same dataclass field by field."""
    return type(parts[0])(**{f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(parts[0])})


def _take(table: _Table, rows: np.ndarray) -> _Table:
    return type(table)(**{f.name: getattr(table, f.name)[rows] for f in fields(table)})


@dataclass
class _Items:
    ids: np.ndarray  # "i00017" strings (object)
    category: np.ndarray  # index into CATEGORIES
    tags: np.ndarray  # (n, len(TAG_VOCABULARY)) 0/1 float32
    style: np.ndarray  # (n, STYLE_DIM) unit vectors
    log_popularity: np.ndarray
    arrival: np.ndarray  # batch in which the item joined the catalog
    lead_theme: np.ndarray  # the item's main theme (object), quoted by reviews


@dataclass
class _Users:
    index: np.ndarray  # global user number: "u{index:05d}"
    early_taste: np.ndarray  # (n, n_categories) category mixture when the user joins
    late_taste: np.ndarray  # (n, n_categories) mixture DRIFT_DAYS later
    tags: np.ndarray  # (n, len(TAG_VOCABULARY)) 0/1 float32: favourite tags
    style: np.ndarray  # (n, STYLE_DIM)
    join_time: np.ndarray  # epoch seconds of the user's first event
