"""Which held-out users an evaluation scores: a bounded, seeded sample stratified by activity,
so the cost of comparing two models does not grow with the number of users."""

from __future__ import annotations

import numpy as np


def stratified_user_sample(history_lengths: np.ndarray, size: int, seed: int, strata: int = 5) -> np.ndarray:
    """Sorted positions of ``size`` users drawn without replacement, or of every user when
    there are at most ``size`` of them.

    Users are split into ``strata`` quantile bins of their history length (activity; users
    with equal length always share a bin, so heavy ties give fewer, larger bins) and each bin
    contributes in proportion to its size, rounded by largest remainder (ties to the lower
    bin) so the total is exactly ``size``. Light and heavy users are then represented as in
    the population, which a plain random sample of a few thousand only does on average.
    Deterministic for a given ``seed`` (``numpy.random.default_rng``).
    """
    lengths = np.asarray(history_lengths)
    if lengths.ndim != 1:
        raise ValueError("history_lengths must be one-dimensional")
    if size < 1:
        raise ValueError(f"size must be at least 1, got {size}")
    if strata < 1:
        raise ValueError(f"strata must be at least 1, got {strata}")
    n = len(lengths)
    if n <= size:
        return np.arange(n, dtype=np.int64)
    labels = _activity_bins(lengths, strata)
    counts = np.bincount(labels)
    quotas = counts * (size / n)
    take = np.floor(quotas).astype(np.int64)
    extra = size - int(take.sum())
    if extra > 0:
        take[np.argsort(-(quotas - take), kind="stable")[:extra]] += 1
    rng = np.random.default_rng(seed)
    members = np.argsort(labels, kind="stable")  # positions grouped by bin, ascending inside each
    bounds = np.r_[0, np.cumsum(counts)]
    chosen = [rng.choice(members[start:stop], size=k, replace=False)
              for start, stop, k in zip(bounds[:-1], bounds[1:], take) if k > 0]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def stratified_order(history_lengths: np.ndarray, seed: int, strata: int = 5) -> np.ndarray:
    """All positions in an order whose every prefix is itself stratified by activity (each of
    the ``strata`` bins of ``stratified_user_sample`` holds its share of the prefix, within two
    users), random within a bin; deterministic for a given ``seed``. An evaluation that scores
    users in this order can stop after any prefix."""
    lengths = np.asarray(history_lengths)
    if lengths.ndim != 1:
        raise ValueError("history_lengths must be one-dimensional")
    if len(lengths) == 0:
        return np.zeros(0, dtype=np.int64)
    labels = _activity_bins(lengths, strata)
    rng = np.random.default_rng(seed)
    key = np.empty(len(lengths))
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        # The j-th user of a bin of c comes at (j + offset) / c: in any prefix up to key t,
        # every bin has t * c users, rounded one way or the other.
        key[members] = (rng.permutation(len(members)) + rng.random()) / len(members)
    return np.argsort(key, kind="stable").astype(np.int64)


def _activity_bins(lengths: np.ndarray, strata: int) -> np.ndarray:
    """Bin of each user among ``strata`` quantile bins (a, b] of history length, as pandas.qcut;
    equal lengths share a bin, so heavy ties give fewer bins. Labels are 0..bins-1."""
    if strata < 1:
        raise ValueError(f"strata must be at least 1, got {strata}")
    edges = np.unique(np.quantile(lengths, np.linspace(0.0, 1.0, strata + 1)[1:-1]))
    labels = np.searchsorted(edges, lengths, side="left")
    return np.unique(labels, return_inverse=True)[1].astype(np.int64)
