"""Offline ranking evaluation (leave-last-out, full ranking) and a popularity baseline.

The protocol every accuracy figure follows: for each user, score ALL catalog items, mask the
padding column 0 and every item in the user's input history, take the top k. Then

* HR@k   = 1 if the target is in the top k, else 0;
* NDCG@k = 1 / log2(rank + 1) if the target is at ``rank`` (1-based) in the top k, else 0;
* coverage@k = share of catalog items that appear in at least one user's top k,

with HR and NDCG averaged over users. ``RankingMetrics`` accumulates these batch by batch
(the Lightning validation loop uses it directly); ``evaluate_ranking`` runs a score function
over all users with it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from rec_models.data import UserSequences

ScoreFn = Callable[..., "torch.Tensor | np.ndarray"]
"""``score_fn(batch_histories[, batch_event_types]) -> scores [B, n_items + 1]``."""


def pad_histories(histories: Sequence[np.ndarray]) -> torch.Tensor:
    """Right-pad variable-length item-index arrays with 0 into a [B, max_len] int64 tensor."""
    width = max((len(h) for h in histories), default=0)
    padded = np.zeros((len(histories), max(width, 1)), dtype=np.int64)
    for row, history in enumerate(histories):
        padded[row, : len(history)] = history
    return torch.from_numpy(padded)


class RankingMetrics:
    """Accumulates HR@k, NDCG@k and coverage@k over batches of users."""

    def __init__(self, n_items: int, k: int = 10) -> None:
        self.n_items = n_items
        self.k = k
        self.reset()

    def reset(self) -> None:
        self._hits = 0.0
        self._ndcg = 0.0
        self._n_users = 0
        self._recommended = torch.zeros(self.n_items + 1, dtype=torch.bool)

    def update(
        self,
        scores: torch.Tensor | np.ndarray,
        histories: Sequence[np.ndarray],
        targets: torch.Tensor | np.ndarray,
    ) -> None:
        """Add a batch: ``scores`` [B, n_items + 1], the users' input histories, targets [B]."""
        scores = torch.as_tensor(scores).detach().float().cpu()
        targets = torch.as_tensor(targets, dtype=torch.int64).cpu()
        if scores.shape != (len(targets), self.n_items + 1):
            raise ValueError(
                f"scores must be [{len(targets)}, {self.n_items + 1}], got {tuple(scores.shape)}"
            )
        if len(targets) and (targets.min() < 1 or targets.max() > self.n_items):
            raise ValueError("targets must be item indices in 1..n_items")

        # Column 0 is padding; history items are not recommended again.
        masked = scores.scatter(1, pad_histories(histories), -math.inf)
        masked[:, 0] = -math.inf
        top_scores, top_items = masked.topk(min(self.k, self.n_items), dim=1)
        valid = top_scores > -math.inf
        hit = (top_items == targets[:, None]) & valid
        ranks = torch.arange(1, top_items.shape[1] + 1, dtype=torch.float32)
        gains = hit.float() / torch.log2(ranks + 1)

        self._hits += hit.any(dim=1).float().sum().item()
        self._ndcg += gains.sum().item()
        self._n_users += len(targets)
        self._recommended[top_items[valid]] = True

    def compute(self) -> dict:
        """``{"hr@k", "ndcg@k", "coverage@k", "n_users", "n_items"}``; NaN HR/NDCG without users."""
        n = self._n_users
        return {
            f"hr@{self.k}": self._hits / n if n else math.nan,
            f"ndcg@{self.k}": self._ndcg / n if n else math.nan,
            f"coverage@{self.k}": self._recommended[1:].sum().item() / self.n_items,
            "n_users": n,
            "n_items": self.n_items,
        }


def evaluate_ranking(
    score_fn: ScoreFn,
    histories: Sequence[np.ndarray],
    targets: np.ndarray,
    n_items: int,
    k: int = 10,
    batch_size: int = 512,
    event_types: Sequence[np.ndarray] | None = None,
) -> dict:
    """Full-ranking HR@k / NDCG@k / coverage@k of ``score_fn`` for the given users.

    ``score_fn(batch_histories)`` returns scores [B, n_items + 1] (column 0 = padding). When
    ``event_types`` (aligned with ``histories``) is given, it is called as
    ``score_fn(batch_histories, batch_event_types)``. Works for any subset of users.
    """
    if len(histories) != len(targets):
        raise ValueError("histories and targets must have the same length")
    metrics = RankingMetrics(n_items, k)
    for start in range(0, len(histories), batch_size):
        batch = histories[start : start + batch_size]
        if event_types is None:
            scores = score_fn(batch)
        else:
            scores = score_fn(batch, event_types[start : start + batch_size])
        metrics.update(scores, batch, targets[start : start + batch_size])
    return metrics.compute()


class PopularityRecommender:
    """Scores every item by its number of training interactions (same ranking for everyone).

    A baseline, and the fallback for users without history at serving time.
    """

    def __init__(self) -> None:
        self.counts: np.ndarray | None = None

    def fit(self, seqs: UserSequences, n_items: int) -> PopularityRecommender:
        all_items = np.concatenate([*seqs.items, np.zeros(0, dtype=np.int64)])
        counts = np.bincount(all_items, minlength=n_items + 1).astype(np.float32)
        counts[0] = 0.0
        self.counts = counts[: n_items + 1]
        return self

    def score(
        self, histories: Sequence[np.ndarray], event_types: Sequence[np.ndarray] | None = None
    ) -> np.ndarray:
        """Scores [len(histories), n_items + 1]; ``event_types`` is accepted and ignored."""
        if self.counts is None:
            raise RuntimeError("call fit() first")
        return np.broadcast_to(self.counts, (len(histories), len(self.counts))).copy()
