"""Diversity re-ranking: Maximal Marginal Relevance over item text embeddings, with a
``diversity`` knob (0 keeps the model's order)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from rec_models.evaluation import ScoreFn, pad_histories


class MMRReranker:
    """MMR re-ranking of the top ``n_candidates`` into a list of ``k``."""

    def __init__(
        self,
        item_embeddings: np.ndarray | torch.Tensor,
        diversity: float = 0.3,
        k: int = 10,
        n_candidates: int = 100,
    ) -> None:
        if not 0.0 <= diversity <= 1.0:
            raise ValueError("diversity must be in [0, 1]")
        if k < 1 or n_candidates < k:
            raise ValueError("need 1 <= k <= n_candidates")
        self.embeddings = F.normalize(torch.as_tensor(item_embeddings, dtype=torch.float32), dim=1)
        self.diversity = diversity
        self.k = k
        self.n_candidates = n_candidates

    def rerank(self, scores: torch.Tensor | np.ndarray, histories: Sequence[np.ndarray]) -> torch.Tensor:
        """Item indices [B, k] (int64), best first; -1 where fewer than k items can be ranked.

        Column 0 (padding) and each user's history items are never recommended.
        """
        scores = torch.as_tensor(scores, dtype=torch.float32).clone()
        scores[:, 0] = -math.inf
        scores = scores.scatter(1, pad_histories(histories), -math.inf)
        n = min(self.n_candidates, scores.shape[1])
        candidate_scores, candidates = scores.topk(n, dim=1)
        valid = candidate_scores > -math.inf

        low = candidate_scores.masked_fill(~valid, math.inf).min(dim=1, keepdim=True).values
        high = candidate_scores.max(dim=1, keepdim=True).values
        relevance = (candidate_scores - low) / (high - low).clamp(min=1e-12)
        vectors = self.embeddings[candidates]  # [B, n, d]
        similarity = vectors @ vectors.transpose(1, 2)  # [B, n, n]

        rows = torch.arange(len(scores))
        chosen = ~valid
        max_similarity = torch.zeros_like(relevance)
        picks = torch.full((len(scores), self.k), -1, dtype=torch.int64)
        for step in range(min(self.k, n)):
            objective = (1.0 - self.diversity) * relevance - self.diversity * max_similarity
            objective = objective.masked_fill(chosen, -math.inf)
            best = objective.argmax(dim=1)
            ok = ~chosen[rows, best]
            picks[ok, step] = candidates[rows, best][ok]
            chosen[rows, best] = True
            max_similarity = torch.maximum(max_similarity, similarity[rows, best])
        return picks

    def wrap(self, score_fn: ScoreFn) -> ScoreFn:
        """A score function whose top k is the MMR list of ``score_fn``'s scores.

        The re-ranked items get scores above every other item, in list order; the rest keep
        the original scores. Called as ``(histories, event_types)``.
        """

        def reranked(histories: Sequence[np.ndarray], event_types: Sequence[np.ndarray] | None = None):
            scores = torch.as_tensor(score_fn(histories, event_types), dtype=torch.float32).clone()
            picks = self.rerank(scores, histories)
            finite = scores.masked_fill(~torch.isfinite(scores), -math.inf).max(dim=1).values
            top = torch.where(torch.isfinite(finite), finite, torch.zeros_like(finite)) + 1.0
            for step in range(picks.shape[1]):
                rows = picks[:, step] >= 0
                scores[rows, picks[rows, step]] = top[rows] + float(picks.shape[1] - step)
            return scores

        return reranked
