"""From feedback events to per-user item sequences (stable time order) and the leave-last-out
split (docs/data.md)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from rec_models.data.arrays import narrowest, split_at
from rec_models.data.schema import (
    DEFAULT_EVENT_WEIGHTS,
    EVENT_TYPE_INDEX,
    NEGATIVE_EVENT_TYPES,
)

MIN_RATING = 2.5
"""Ratings below this value are not positive interactions."""


class ItemVocab:
    """Maps string item ids to integer indices ``1..n``; index 0 is reserved for padding.

    Indices are append-only: ``extend`` gives new ids the next free indices and never changes
    an existing one, so a trained model's embedding tables can be grown for new items.
    """

    def __init__(self, ids: Iterable[str] = ()) -> None:
        self.ids: list[str] = []
        self._index: dict[str, int] = {}
        self.extend(ids)

    def extend(self, ids: Iterable[str]) -> int:
        """Append the ids not yet known, in the given order; return how many were added."""
        added = 0
        for item_id in ids:
            if item_id not in self._index:
                self.ids.append(item_id)
                self._index[item_id] = len(self.ids)
                added += 1
        return added

    def index(self, ids: Iterable[str], unknown: int | None = 0) -> np.ndarray:
        """Indices of ``ids`` as int64; unknown ids map to ``unknown`` (None: raise KeyError)."""
        ids = list(ids)
        if unknown is None:
            missing = [item_id for item_id in ids if item_id not in self._index]
            if missing:
                raise KeyError(f"{len(missing)} unknown item ids, e.g. {missing[:5]}")
        return np.fromiter(
            (self._index.get(item_id, unknown) for item_id in ids), dtype=np.int64, count=len(ids)
        )

    def __len__(self) -> int:
        """Number of real items (padding not counted)."""
        return len(self.ids)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._index

    def to_dict(self) -> dict:
        return {"ids": list(self.ids)}

    @classmethod
    def from_dict(cls, data: dict) -> ItemVocab:
        return cls(data["ids"])


def interactions(events: pd.DataFrame, min_rating: float | None = MIN_RATING) -> pd.DataFrame:
    """Positive interactions with a ``weight`` column, stably sorted by (user_id, timestamp).

    Drops negative event types (``schema.NEGATIVE_EVENT_TYPES``) and ratings below
    ``min_rating`` (or without a value); ``min_rating=None`` keeps every rating row, as the
    evaluation protocol does (the value then reaches the model as a feature). ``weight`` comes from ``schema.DEFAULT_EVENT_WEIGHTS``; a rating's weight
    is scaled by ``value / 5``. Rows with equal (user, timestamp) keep their input order.
    """
    unknown = set(events["event_type"].dropna().unique()) - set(DEFAULT_EVENT_WEIGHTS)
    if unknown:
        raise ValueError(f"unknown event types: {sorted(unknown)}")
    if "value" in events:
        value = events["value"].astype("float64")
    else:
        value = pd.Series(np.nan, index=events.index)
    is_rating = (events["event_type"] == "rating").fillna(False).astype(bool)
    is_negative = events["event_type"].isin(NEGATIVE_EVENT_TYPES).fillna(False).astype(bool)
    rating_ok = value.notna() if min_rating is None else value >= min_rating
    keep = ~is_negative & events["event_type"].notna() & (~is_rating | rating_ok)

    out = events.loc[keep].copy()
    weight = out["event_type"].map(DEFAULT_EVENT_WEIGHTS).astype("float64")
    out["weight"] = weight.where(~is_rating[keep], weight * value[keep] / 5.0)
    return out.sort_values(["user_id", "timestamp"], kind="stable").reset_index(drop=True)


@dataclass
class UserSequences:
    """One chronological sequence per user: item indices and aligned event-type indices."""

    user_ids: list[str]
    items: list[np.ndarray]
    event_types: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.user_ids)

    def __getstate__(self) -> dict:
        """Pickled as two flat arrays (as narrow as the values allow) and the lengths, not one
        small array per user: at 250k users 4x faster to write and to load, and a third of the
        size (assets hand these between run steps)."""
        lengths = [len(a) for a in self.items]
        if (not all(isinstance(a, np.ndarray) and a.ndim == 1 for a in [*self.items, *self.event_types])
                or lengths != [len(a) for a in self.event_types]
                or len({a.dtype for a in self.items}) > 1 or len({a.dtype for a in self.event_types}) > 1):
            return dict(self.__dict__)  # hand-built sequences (lists, mixed dtypes, unaligned): as they are
        lengths = np.asarray(lengths, dtype=np.int64)
        return {"user_ids": self.user_ids, "lengths": lengths,
                "items": _Packed(self.items), "event_types": _Packed(self.event_types)}

    def __setstate__(self, state: dict) -> None:
        if "lengths" not in state:  # pickled per user
            self.__dict__.update(state)
            return
        offsets = np.r_[0, np.cumsum(state["lengths"])]
        self.user_ids = state["user_ids"]
        self.items, self.event_types = (split_at(state[name].unpack(), offsets) for name in ("items", "event_types"))

    def subset(self, positions: Sequence[int] | np.ndarray) -> UserSequences:
        """The sequences of the users at ``positions`` (in that order)."""
        return UserSequences(
            user_ids=[self.user_ids[p] for p in positions],
            items=[self.items[p] for p in positions],
            event_types=[self.event_types[p] for p in positions],
        )


class _Packed:
    """Arrays concatenated in the narrowest integer type that holds them, with their dtype."""

    def __init__(self, arrays: list[np.ndarray]) -> None:
        flat = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
        self.dtype = flat.dtype.str
        self.values = narrowest(flat)

    def unpack(self) -> np.ndarray:
        return self.values.astype(self.dtype, copy=False)


def build_sequences(interactions_df: pd.DataFrame, vocab: ItemVocab) -> UserSequences:
    """Group interactions into per-user chronological sequences of vocab indices.

    Items missing from ``vocab`` are added to it first, in order of first appearance (after
    the stable (user_id, timestamp) sort). Users come out sorted by user_id.
    """
    df = interactions_df.sort_values(["user_id", "timestamp"], kind="stable")
    vocab.extend(df["item_id"].drop_duplicates())
    items = vocab.index(df["item_id"], unknown=None)
    event_types = df["event_type"].map(EVENT_TYPE_INDEX).to_numpy(dtype=np.int64)

    users = df["user_id"].to_numpy(dtype=object)
    new_user = np.r_[True, users[1:] != users[:-1]] if len(users) else np.zeros(0, dtype=bool)
    starts = np.flatnonzero(new_user)
    bounds = np.r_[starts, len(users)]
    return UserSequences(
        user_ids=[str(users[s]) for s in starts],
        items=[items[s:e] for s, e in zip(bounds[:-1], bounds[1:])],
        event_types=[event_types[s:e] for s, e in zip(bounds[:-1], bounds[1:])],
    )


@dataclass
class LeaveLastOutSplit:
    """Per user: training history, validation target (second last) and test target (last).

    ``val_targets``, ``val_event_types`` and ``test_targets`` are aligned with
    ``train.user_ids``.
    """

    train: UserSequences
    val_targets: np.ndarray
    val_event_types: np.ndarray
    test_targets: np.ndarray

    def val_histories(self) -> UserSequences:
        """What the model sees when predicting the validation target: the training history."""
        return self.train

    def subset(self, positions: Sequence[int] | np.ndarray) -> LeaveLastOutSplit:
        """The split of the users at ``positions`` only (e.g. a validation or evaluation sample)."""
        positions = np.asarray(positions, dtype=np.int64)
        return LeaveLastOutSplit(self.train.subset(positions), self.val_targets[positions],
                                 self.val_event_types[positions], self.test_targets[positions])

    def test_histories(self) -> UserSequences:
        """What the model sees when predicting the test target: training history + val item."""
        return UserSequences(
            user_ids=list(self.train.user_ids),
            items=[np.append(h, t) for h, t in zip(self.train.items, self.val_targets)],
            event_types=[
                np.append(h, t) for h, t in zip(self.train.event_types, self.val_event_types)
            ],
        )


def leave_last_out(seqs: UserSequences, min_interactions: int = 5) -> LeaveLastOutSplit:
    """Drop users with fewer than ``min_interactions`` and hold out each user's last two items."""
    if min_interactions < 3:
        raise ValueError("min_interactions must be at least 3 (history + val + test)")
    kept = [i for i, items in enumerate(seqs.items) if len(items) >= min_interactions]
    seqs = seqs.subset(kept)
    return LeaveLastOutSplit(
        train=UserSequences(
            user_ids=seqs.user_ids,
            items=[items[:-2] for items in seqs.items],
            event_types=[types[:-2] for types in seqs.event_types],
        ),
        val_targets=np.array([items[-2] for items in seqs.items], dtype=np.int64),
        val_event_types=np.array([types[-2] for types in seqs.event_types], dtype=np.int64),
        test_targets=np.array([items[-1] for items in seqs.items], dtype=np.int64),
    )


def collapse_repeats(interactions_df: pd.DataFrame) -> pd.DataFrame:
    """One interaction per (user, item): placed at the first contact, carrying the strongest
    event (highest weight). A view followed by a purchase of the same item is one step of the
    user's journey, not two; without this, repeat targets that the protocol masks from the
    ranking make up a fifth of the simulator's test targets and can never be hit."""
    key = ["user_id", "item_id"]
    strongest = (
        interactions_df.sort_values("weight", ascending=False, kind="stable")
        .drop_duplicates(key)[[*key, "event_type", "value", "weight"]]
    )
    first = interactions_df.drop_duplicates(key, keep="first").drop(columns=["event_type", "value", "weight"])
    return first.merge(strongest, on=key, how="left")[list(interactions_df.columns)].reset_index(drop=True)
