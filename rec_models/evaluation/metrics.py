"""Ranking metrics under the protocol (full ranking, history masked, pessimistic ties):
HR@k, NDCG@k, coverage@k, ILD@k, novelty@k, paired differences, and most-popular."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from rec_models.data import UserSequences

ScoreFn = Callable[..., "torch.Tensor | np.ndarray"]
"""``score_fn(batch_histories[, batch_event_types]) -> scores [B, n_items + 1]``."""
EVAL_BATCH = 512
SCORE_BUDGET = 1 << 22


def eval_batch_size(n_items: int) -> int:
    """Users scored together in validation and evaluation: ``EVAL_BATCH``, fewer for large
    catalogs so that one float32 score tensor [users, n_items + 1] stays within
    ``SCORE_BUDGET`` elements (16 MiB; a blended validation keeps about six alive at once):
    246 users at 17k items, 41 at 100k. Validation's passes over a batch (standardise, blend,
    mask, top k) then find it in the CPU's cache more often: at 100k items, 500 users, a
    fine-tune's blend check took 0.89 instead of 1.14 s with 32 MiB (83 users); 12 MiB was
    about as fast, and at 30k items or in the gate, where the content model's matrix product
    dominates, the size made no difference."""
    return max(16, min(EVAL_BATCH, SCORE_BUDGET // (n_items + 1)))


def pad_histories(histories: Sequence[np.ndarray]) -> torch.Tensor:
    """Right-pad variable-length item-index arrays with 0 into a [B, max_len] int64 tensor."""
    width = max((len(h) for h in histories), default=0)
    padded = np.zeros((len(histories), max(width, 1)), dtype=np.int64)
    for row, history in enumerate(histories):
        padded[row, : len(history)] = history
    return torch.from_numpy(padded)


class RankingMetrics:
    """Accumulates HR@k, NDCG@k and coverage@k over batches of users.

    With ``item_embeddings`` [n_items + 1, d] it also reports ``ild@k``, with
    ``item_popularity`` [n_items + 1] (see ``item_popularity``) ``novelty@k``.
    """

    def __init__(
        self,
        n_items: int,
        k: int = 10,
        item_embeddings: np.ndarray | torch.Tensor | None = None,
        item_popularity: np.ndarray | None = None,
        keep_per_user: bool = False,
    ) -> None:
        self.n_items = n_items
        self.k = k
        self.keep_per_user = keep_per_user
        self._embeddings = None
        if item_embeddings is not None:
            embeddings = torch.as_tensor(item_embeddings, dtype=torch.float32)
            if embeddings.shape[0] != n_items + 1:
                raise ValueError(f"item_embeddings must have {n_items + 1} rows")
            self._embeddings = F.normalize(embeddings, dim=1)
        self._self_information = None
        if item_popularity is not None:
            popularity = torch.as_tensor(item_popularity, dtype=torch.float64)
            if popularity.shape != (n_items + 1,) or (popularity[1:] <= 0).any():
                raise ValueError(f"item_popularity must be [{n_items + 1}] and positive")
            self._self_information = -torch.log2(popularity.clamp(min=1e-12))
        self.reset()

    def reset(self) -> None:
        self._hits = 0.0
        self._ndcg = 0.0
        self._n_users = 0
        self._recommended = torch.zeros(self.n_items + 1, dtype=torch.bool)
        self._ild_sum, self._ild_users = 0.0, 0
        self._novelty_sum, self._novelty_items = 0.0, 0
        self._per_user: list[np.ndarray] = []

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
        # The protocol's tie rule: rank = 1 + the other items scoring >= the target (pessimistic,
        # independent of topk's order among equal scores). A masked target (-inf) is never a hit.
        target_scores = masked.gather(1, targets[:, None])
        # A target scoring below the k-th best has k items strictly above it: rank > k, no hit.
        # Only the other rows need the exact rank (counting all columns is the costly pass).
        reachable = (target_scores[:, 0] >= top_scores[:, -1]) & (target_scores[:, 0] > -math.inf)
        ranks = torch.full((len(targets),), self.k + 1, dtype=torch.int64)
        if bool(reachable.any()):
            rows = reachable.nonzero()[:, 0]
            ranks[rows] = (masked[rows] >= target_scores[rows]).sum(dim=1)  # counts the target itself: 1 + others
        hit = (ranks <= self.k) & reachable
        gains = torch.where(hit, 1.0 / torch.log2(ranks.double() + 1), torch.zeros((), dtype=torch.float64))

        self._hits += hit.sum().item()
        self._ndcg += gains.sum().item()
        if self.keep_per_user:
            self._per_user.append(gains.numpy().astype(np.float64))
        self._n_users += len(targets)
        self._recommended[top_items[valid]] = True
        if self._embeddings is not None:
            self._update_ild(top_items, valid)
        if self._self_information is not None:
            self._novelty_sum += self._self_information[top_items[valid]].sum().item()
            self._novelty_items += int(valid.sum())

    def _update_ild(self, top_items: torch.Tensor, valid: torch.Tensor) -> None:
        vectors = self._embeddings[top_items]  # [B, k, d]
        distance = 1.0 - vectors @ vectors.transpose(1, 2)
        pairs = valid[:, :, None] & valid[:, None, :]
        pairs &= ~torch.eye(top_items.shape[1], dtype=torch.bool)[None]
        n_pairs = pairs.sum(dim=(1, 2))
        has_pairs = n_pairs > 0
        per_user = (distance * pairs).sum(dim=(1, 2))[has_pairs] / n_pairs[has_pairs]
        self._ild_sum += per_user.sum().item()
        self._ild_users += int(has_pairs.sum())

    def per_user_ndcg(self) -> np.ndarray:
        """NDCG@k of every user so far, in update order (needs ``keep_per_user=True``)."""
        if not self.keep_per_user:
            raise RuntimeError("construct RankingMetrics(keep_per_user=True) to keep per-user NDCG")
        return np.concatenate(self._per_user) if self._per_user else np.zeros(0)

    def compute(self) -> dict:
        """``{"hr@k", "ndcg@k", "coverage@k", "n_users", "n_items"}`` (+ ``ild@k`` /
        ``novelty@k`` when configured); NaN HR/NDCG (ILD, novelty) without users."""
        n = self._n_users
        result = {
            f"hr@{self.k}": self._hits / n if n else math.nan,
            f"ndcg@{self.k}": self._ndcg / n if n else math.nan,
            f"coverage@{self.k}": self._recommended[1:].sum().item() / self.n_items,
            "n_users": n,
            "n_items": self.n_items,
        }
        if self._embeddings is not None:
            result[f"ild@{self.k}"] = self._ild_sum / self._ild_users if self._ild_users else math.nan
        if self._self_information is not None:
            items = self._novelty_items
            result[f"novelty@{self.k}"] = self._novelty_sum / items if items else math.nan
        return result


def evaluate_ranking(
    score_fn: ScoreFn,
    histories: Sequence[np.ndarray],
    targets: np.ndarray,
    n_items: int,
    k: int = 10,
    batch_size: int | None = None,
    event_types: Sequence[np.ndarray] | None = None,
    per_user: bool = False,
    metrics: RankingMetrics | None = None,
) -> dict:
    """Full-ranking HR@k / NDCG@k / coverage@k of ``score_fn`` for the given users.

    ``score_fn(batch_histories)`` returns scores [B, n_items + 1] (column 0 = padding). When
    ``event_types`` (aligned with ``histories``) is given, it is called as
    ``score_fn(batch_histories, batch_event_types)``. Works for any subset of users. With
    ``per_user`` the result also holds ``per_user_ndcg@k``: each user's NDCG, in input order
    (for paired comparisons of two models on the same users, see ``paired_difference``).
    ``metrics`` continues an earlier call's ``RankingMetrics`` (same ``n_items`` and ``k``): the
    result then covers the users of every call, e.g. an evaluation that scores users in steps.
    """
    if len(histories) != len(targets):
        raise ValueError("histories and targets must have the same length")
    metrics = metrics if metrics is not None else RankingMetrics(n_items, k, keep_per_user=per_user)
    if (metrics.n_items, metrics.k) != (n_items, k) or (per_user and not metrics.keep_per_user):
        raise ValueError("metrics must be a RankingMetrics for the same n_items and k (keep_per_user for per_user)")
    batch_size = batch_size or eval_batch_size(n_items)
    for start in range(0, len(histories), batch_size):
        batch = histories[start : start + batch_size]
        if event_types is None:
            scores = score_fn(batch)
        else:
            scores = score_fn(batch, event_types[start : start + batch_size])
        metrics.update(scores, batch, targets[start : start + batch_size])
    result = metrics.compute()
    if per_user:
        result[f"per_user_ndcg@{k}"] = metrics.per_user_ndcg()
    return result


def paired_difference(candidate: np.ndarray, baseline: np.ndarray) -> dict:
    """Mean per-user difference ``candidate - baseline`` of a metric measured on the same users,
    with its standard error: ``{"diff", "se", "users"}``. Pairing removes the between-user
    variance, so a small real difference shows as one, and a small noisy one as noise."""
    candidate, baseline = np.asarray(candidate, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if candidate.shape != baseline.shape:
        raise ValueError("both models must be measured on the same users")
    diff = candidate - baseline
    n = len(diff)
    se = float(diff.std(ddof=1) / math.sqrt(n)) if n > 1 else math.inf
    return {"diff": float(diff.mean()) if n else math.nan, "se": se, "users": n}


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
