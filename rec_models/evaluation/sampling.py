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
    edges = np.unique(np.quantile(lengths, np.linspace(0.0, 1.0, strata + 1)[1:-1]))
    labels = np.searchsorted(edges, lengths, side="left")  # bins (a, b], as pandas.qcut
    counts = np.bincount(labels, minlength=len(edges) + 1)
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
