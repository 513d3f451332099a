"""Tests for rec_models.evaluation: exact HR/NDCG/coverage, masking, batching, popularity."""

import math

import numpy as np
import pytest
import torch

from rec_models.data import UserSequences
from rec_models.evaluation import (
    PopularityRecommender,
    RankingMetrics,
    evaluate_ranking,
)

N_ITEMS = 20


def ranked_scores(order: list[int]) -> np.ndarray:
    """Scores [N_ITEMS + 1] so that items in ``order`` come first, in that order."""
    scores = np.zeros(N_ITEMS + 1, dtype=np.float32)
    for position, item in enumerate(order):
        scores[item] = 100.0 - position
    return scores


def ndcg_at(rank: int) -> float:
    return 1.0 / math.log2(rank + 1)


def fixed_score_fn(rows: list[np.ndarray]):
    """A score function returning predefined rows for the users in order."""
    table = np.stack(rows)
    calls = {"start": 0}

    def score_fn(batch_histories):
        start = calls["start"]
        calls["start"] += len(batch_histories)
        return table[start : start + len(batch_histories)]

    return score_fn


def test_known_ranks_give_exact_hr_and_ndcg():
    # Scores rank items 1, 2, 3, ... in that order (item i has rank i).
    scores = ranked_scores(list(range(1, N_ITEMS + 1)))
    targets = np.array([1, 3, 11, 10])
    histories = [np.zeros(0, dtype=np.int64)] * 4
    result = evaluate_ranking(fixed_score_fn([scores] * 4), histories, targets, N_ITEMS)

    expected_ndcg = (ndcg_at(1) + ndcg_at(3) + 0.0 + ndcg_at(10)) / 4
    assert result["hr@10"] == pytest.approx(3 / 4)
    assert result["ndcg@10"] == pytest.approx(expected_ndcg)
    assert result["n_users"] == 4
    assert result["n_items"] == N_ITEMS
    assert result["coverage@10"] == pytest.approx(10 / N_ITEMS)


def test_history_items_are_masked_from_the_ranking():
    # Item 7 has the top score but is in the history; target 5 is second → effective rank 1.
    scores = ranked_scores([7, 5, 1, 2, 3])
    histories = [np.array([7, 9])]
    result = evaluate_ranking(fixed_score_fn([scores]), histories, np.array([5]), N_ITEMS)
    assert result["hr@10"] == 1.0
    assert result["ndcg@10"] == pytest.approx(ndcg_at(1))

    # Without the history, the same scores put the target at rank 2.
    unmasked = evaluate_ranking(
        fixed_score_fn([scores]), [np.zeros(0, dtype=np.int64)], np.array([5]), N_ITEMS
    )
    assert unmasked["ndcg@10"] == pytest.approx(ndcg_at(2))


def test_target_in_history_is_a_miss_and_padding_column_never_ranks():
    scores = ranked_scores([4, 6])
    scores[0] = 1000.0  # the padding column must be ignored even with the top score
    result = evaluate_ranking(
        fixed_score_fn([scores]), [np.array([4])], np.array([4]), N_ITEMS, k=3
    )
    assert result["hr@3"] == 0.0
    assert result["ndcg@3"] == 0.0

    hit = evaluate_ranking(fixed_score_fn([scores]), [np.array([4])], np.array([6]), N_ITEMS, k=3)
    assert hit["ndcg@3"] == pytest.approx(ndcg_at(1))


def test_coverage_counts_distinct_items_across_users_and_keys_use_k():
    rows = [ranked_scores([1, 2]), ranked_scores([2, 3]), ranked_scores([1, 3])]
    histories = [np.zeros(0, dtype=np.int64)] * 3
    result = evaluate_ranking(fixed_score_fn(rows), histories, np.array([1, 2, 3]), N_ITEMS, k=2)
    assert set(result) == {"hr@2", "ndcg@2", "coverage@2", "n_users", "n_items"}
    assert result["coverage@2"] == pytest.approx(3 / N_ITEMS)
    assert result["hr@2"] == 1.0


def test_batching_does_not_change_results_and_event_types_are_passed():
    rng = np.random.default_rng(0)
    table = rng.normal(size=(50, N_ITEMS + 1)).astype(np.float32)
    histories = [
        rng.choice(np.arange(1, N_ITEMS + 1), size=rng.integers(0, 6), replace=False)
        for _ in range(50)
    ]
    targets = rng.integers(1, N_ITEMS + 1, size=50)
    event_types = [np.full(len(h), 2) for h in histories]

    seen_types = []

    def score_with_types(batch_histories, batch_event_types):
        seen_types.extend(batch_event_types)
        return torch.from_numpy(table[len(seen_types) - len(batch_histories) : len(seen_types)])

    whole = evaluate_ranking(fixed_score_fn(list(table)), histories, targets, N_ITEMS)
    batched = evaluate_ranking(
        score_with_types, histories, targets, N_ITEMS, batch_size=7, event_types=event_types
    )
    assert batched == pytest.approx(whole)
    assert len(seen_types) == 50


def test_ranking_metrics_accumulates_like_a_single_pass():
    rows = [ranked_scores([3, 1]), ranked_scores([2, 5])]
    metrics = RankingMetrics(N_ITEMS, k=10)
    metrics.update(rows[0][None], [np.array([3])], np.array([1]))
    metrics.update(torch.from_numpy(rows[1][None]), [np.zeros(0, dtype=np.int64)], np.array([5]))
    result = metrics.compute()
    assert result["hr@10"] == 1.0
    assert result["ndcg@10"] == pytest.approx((ndcg_at(1) + ndcg_at(2)) / 2)

    metrics.reset()
    assert metrics.compute()["n_users"] == 0


def test_empty_user_set_and_invalid_inputs():
    score_fn = fixed_score_fn([ranked_scores([1])])
    empty = evaluate_ranking(score_fn, [], np.array([], dtype=np.int64), N_ITEMS)
    assert empty["n_users"] == 0
    assert math.isnan(empty["hr@10"]) and math.isnan(empty["ndcg@10"])

    with pytest.raises(ValueError, match="targets"):
        evaluate_ranking(score_fn, [np.array([1])], np.array([0]), N_ITEMS)
    with pytest.raises(ValueError, match="scores must be"):
        evaluate_ranking(lambda batch: np.zeros((1, 5)), [np.array([1])], np.array([2]), N_ITEMS)


def test_popularity_recommender_ranks_by_training_counts():
    seqs = UserSequences(
        user_ids=["a", "b", "c"],
        items=[np.array([3, 3, 1]), np.array([3, 2]), np.array([2])],
        event_types=[np.array([1, 1, 1]), np.array([1, 1]), np.array([1])],
    )
    pop = PopularityRecommender().fit(seqs, n_items=5)
    scores = pop.score([np.array([1]), np.zeros(0, dtype=np.int64)])

    assert scores.shape == (2, 6)
    np.testing.assert_array_equal(scores[0], [0, 1, 2, 3, 0, 0])
    # Most popular unseen item first: user 0 has seen item 1 (masked), so 3 then 2.
    result = evaluate_ranking(pop.score, [np.array([3]), np.array([])], np.array([2, 3]), 5, k=1)
    assert result["hr@1"] == 1.0


def test_paired_difference_of_per_user_ndcg():
    from rec_models.evaluation import paired_difference

    histories = [np.array([1]), np.array([2]), np.array([3])]
    targets = np.array([2, 3, 4])
    perfect = lambda h: np.eye(5)[targets]  # noqa: E731 - every target ranked first
    half = lambda h: np.eye(5)[[2, 1, 4]]  # noqa: E731 - users 0 and 2 hit at rank 1, user 1 misses
    a = evaluate_ranking(perfect, histories, targets, 4, per_user=True)["per_user_ndcg@10"]
    b = evaluate_ranking(half, histories, targets, 4, k=1, per_user=True)["per_user_ndcg@1"]
    assert a.tolist() == [1.0, 1.0, 1.0] and b.tolist() == [1.0, 0.0, 1.0]
    paired = paired_difference(b, a)
    assert paired["users"] == 3 and paired["diff"] == pytest.approx(-1 / 3)
    assert paired["se"] == pytest.approx(np.std([0, -1, 0], ddof=1) / np.sqrt(3))


def masked_row(row: np.ndarray, history: np.ndarray) -> np.ndarray:
    """A copy of one user's scores with padding and history items at -inf."""
    masked = row.copy()
    masked[0] = -np.inf
    masked[history] = -np.inf
    return masked


def brute_force_ndcg(masked: np.ndarray, target: int, k: int) -> float:
    """NDCG@k of ``target`` by counting the items scoring at least its score (the tie rule)."""
    rank = int((masked >= masked[target]).sum())
    return 1 / math.log2(rank + 1) if np.isfinite(masked[target]) and rank <= k else 0.0


def test_per_user_ndcg_matches_a_brute_force_ranking_with_ties_and_masks():
    """Integer scores (many ties: the pessimistic rule), masked histories, targets inside the
    history, -inf items and fewer scorable items than k: every user's NDCG@10 is what counting
    the items scoring at least the target's gives."""
    rng = np.random.default_rng(7)
    n_users, n_items, k = 300, 40, 10
    scores = rng.integers(0, 6, size=(n_users, n_items + 1)).astype(np.float32)
    scores[rng.random(scores.shape) < 0.2] = -np.inf
    scores[:5, 12:] = -np.inf  # at most 11 scorable items
    histories = [rng.choice(np.arange(1, n_items + 1), size=rng.integers(0, 8), replace=False) for _ in range(n_users)]
    targets = rng.integers(1, n_items + 1, size=n_users)
    metrics = RankingMetrics(n_items, k, keep_per_user=True)
    metrics.update(torch.from_numpy(scores), histories, torch.from_numpy(targets))
    expected = [brute_force_ndcg(masked_row(row, history), target, k)
                for row, history, target in zip(scores, histories, targets)]
    np.testing.assert_allclose(metrics.per_user_ndcg(), expected)
    assert 0 < np.count_nonzero(expected) < n_users  # both hits and misses were exercised


def test_eval_batch_size_bounds_the_score_tensor_for_large_catalogs():
    from rec_models.evaluation import EVAL_BATCH, eval_batch_size
    from rec_models.evaluation.metrics import SCORE_BUDGET

    assert eval_batch_size(3_000) == EVAL_BATCH  # small catalogs: the full batch
    for n_items in (17_321, 100_000, 250_000):
        size = eval_batch_size(n_items)
        assert size < EVAL_BATCH and size * (n_items + 1) <= SCORE_BUDGET
    assert eval_batch_size(10**7) == 16  # never fewer than 16 users at a time
    # the batch size does not change results
    rng = np.random.default_rng(3)
    scores = rng.normal(size=(70, 2001)).astype(np.float32)
    histories = [rng.integers(1, 2001, size=5) for _ in range(70)]
    targets = rng.integers(1, 2001, size=70)
    runs = [evaluate_ranking(fixed_score_fn(list(scores)), histories, targets, 2000, batch_size=b) for b in (None, 7)]
    assert runs[0] == runs[1]


def test_top_k_and_ranks_match_a_masked_copy_with_repeated_history_items():
    """With histories that repeat items, hold the target or are longer than the catalog, ties
    and -inf scores, the per-user NDCG, hits and the recommended items are those of ranking a
    masked copy of each row, and the scores given are left as they were."""
    rng = np.random.default_rng(11)
    n_users, n_items, k = 400, 60, 10
    scores = rng.normal(size=(n_users, n_items + 1)).astype(np.float32)
    scores[:100] = rng.integers(0, 4, size=(100, n_items + 1))  # ties
    scores[rng.random(scores.shape) < 0.05] = -np.inf
    # repeats; the last 50 histories longer than the catalog (k + |history| > n_items)
    histories = [rng.integers(1, n_items + 1, size=rng.integers(0, 30 if u < n_users - 50 else 120))
                 for u in range(n_users)]
    targets = rng.integers(1, n_items + 1, size=n_users)
    given = torch.from_numpy(scores.copy())
    metrics = RankingMetrics(n_items, k, keep_per_user=True)
    metrics.update(given, histories, torch.from_numpy(targets))
    assert torch.equal(given, torch.from_numpy(scores))
    expected, recommended = [], set()
    for row, history, target in zip(scores, histories, targets):
        masked = masked_row(row, history)
        expected.append(brute_force_ndcg(masked, target, k))
        top = np.argsort(-masked, kind="stable")[:k]
        if len(np.unique(masked[np.isfinite(masked)])) == np.isfinite(masked).sum():  # no ties: one top k
            recommended |= set(top[np.isfinite(masked[top])].tolist())
    np.testing.assert_allclose(metrics.per_user_ndcg(), expected)
    assert metrics.compute()[f"hr@{k}"] == pytest.approx(np.count_nonzero(expected) / n_users)
    found = set(np.flatnonzero(metrics._recommended.numpy()).tolist())
    assert recommended and recommended <= found
    assert 0 not in found
