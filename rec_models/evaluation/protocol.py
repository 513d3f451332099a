"""The protocol from raw events (every row, stable time order), the cold-start slice, and
evaluating a score function on a split's validation or test targets."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from rec_models.data import ItemVocab, LeaveLastOutSplit, UserSequences, build_sequences, unique_sorted
from rec_models.evaluation.metrics import RankingMetrics, ScoreFn, eval_batch_size

# --- the protocol from raw events, the cold-start slice, beyond-accuracy metrics


def protocol_sequences(
    events: pd.DataFrame,
    vocab: ItemVocab,
    features: Callable[[pd.DataFrame], np.ndarray] | None = None,
) -> UserSequences:
    """Every event row as one interaction, per user in stable timestamp order.

    Unlike ``data.interactions`` (the pipeline's implicit-feedback view, which drops low
    ratings and negative events) nothing is dropped: the protocol keeps every rating row.
    Ties keep the input (file) order. ``features(sorted_events)`` may replace the event-type
    indices with other per-event integer features (e.g. ``sasrec.event_features``, which
    also encodes the rating); it receives the events in sequence order.
    """
    ordered = events.sort_values(["user_id", "timestamp"], kind="stable").reset_index(drop=True)
    seqs = build_sequences(ordered, vocab)  # its own stable sort keeps this order
    if features is not None:
        values = np.asarray(features(ordered), dtype=np.int64)
        bounds = np.cumsum([0] + [len(items) for items in seqs.items])
        seqs.event_types = [values[s:e] for s, e in zip(bounds[:-1], bounds[1:])]
    return seqs


def select_cold_items(split: LeaveLastOutSplit, fraction: float = 0.1, seed: int = 0) -> np.ndarray:
    """A seeded random ``fraction`` of the items with any interaction in ``split`` (sorted).

    The same split, fraction and seed always give the same items.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError("fraction must be in (0, 1)")
    items = unique_sorted(np.concatenate([*split.train.items, split.val_targets, split.test_targets]))
    items = items[items > 0]
    n_cold = max(1, int(round(fraction * len(items))))
    return np.sort(np.random.default_rng(seed).choice(items, size=n_cold, replace=False))


def cold_start_split(split: LeaveLastOutSplit, cold_items: np.ndarray) -> LeaveLastOutSplit:
    """The same split with every interaction with ``cold_items`` removed from training.

    Validation and test targets are unchanged (the validation item is still part of the test
    input history), so a model trained on the result has never seen a cold item as a target.
    """
    cold = np.asarray(cold_items, dtype=np.int64)
    keep = [~np.isin(items, cold) for items in split.train.items]
    return LeaveLastOutSplit(
        train=UserSequences(
            user_ids=list(split.train.user_ids),
            items=[items[k] for items, k in zip(split.train.items, keep)],
            event_types=[types[k] for types, k in zip(split.train.event_types, keep)],
        ),
        val_targets=split.val_targets,
        val_event_types=split.val_event_types,
        test_targets=split.test_targets,
    )


def cold_start_users(split: LeaveLastOutSplit, cold_items: np.ndarray) -> np.ndarray:
    """Positions (in ``split.train``) of the users whose test target is a cold item."""
    return np.flatnonzero(np.isin(split.test_targets, np.asarray(cold_items, dtype=np.int64)))


def evaluate_split(
    score_fn: ScoreFn,
    split: LeaveLastOutSplit,
    n_items: int,
    stage: str = "test",
    users: Sequence[int] | np.ndarray | None = None,
    k: int = 10,
    item_embeddings: np.ndarray | torch.Tensor | None = None,
    item_popularity: np.ndarray | None = None,
) -> dict:
    """The protocol's metrics of ``score_fn`` on the validation or test targets of ``split``.

    ``stage="val"`` ranks for the validation target from the training history; ``"test"``
    for the test target from training history + validation item. ``users`` (positions in
    ``split.train``) restricts the users, e.g. to ``cold_start_users``. ``score_fn`` is
    called with (histories, event types). With ``item_embeddings`` / ``item_popularity``
    the result also holds ``ild@k`` / ``novelty@k`` (see ``RankingMetrics``).
    """
    if stage not in ("val", "test"):
        raise ValueError("stage must be 'val' or 'test'")
    histories = split.val_histories() if stage == "val" else split.test_histories()
    targets = split.val_targets if stage == "val" else split.test_targets
    if users is not None:
        histories = histories.subset(np.asarray(users, dtype=np.int64))
        targets = targets[np.asarray(users, dtype=np.int64)]
    metrics = RankingMetrics(n_items, k, item_embeddings, item_popularity)
    size = eval_batch_size(n_items)
    for start in range(0, len(histories), size):
        batch = histories.items[start : start + size]
        scores = score_fn(batch, histories.event_types[start : start + size])
        metrics.update(scores, batch, targets[start : start + size])
    return metrics.compute()


def item_popularity(seqs: UserSequences, n_items: int) -> np.ndarray:
    """Per item, the add-one smoothed share of users who interacted with it:
    (users + 1) / (all users + 1), float64 [n_items + 1] (row 0 = padding)."""
    distinct = [np.unique(items) for items in seqs.items]
    all_items = np.concatenate([*distinct, np.zeros(0, dtype=np.int64)])
    counts = np.bincount(all_items, minlength=n_items + 1)[: n_items + 1].astype(np.float64)
    return (counts + 1.0) / (len(seqs) + 1.0)
