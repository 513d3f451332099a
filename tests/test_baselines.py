"""Tests for the baselines (EASE, content-only), the hybrid blend and MMR re-ranking."""

import math
import pickle

import numpy as np
import pytest
import torch

from rec_models.data import UserSequences, leave_last_out
from rec_models.evaluation import RankingMetrics, evaluate_split
from rec_models.models import (
    EASE,
    ContentRecommender,
    HybridScorer,
    MMRReranker,
    binary_matrix,
    blend,
    standardize_scores,
    tune_content,
    tune_ease,
    tune_hybrid,
)

N_ITEMS = 12


def random_histories(n_users: int, n_items: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [
        rng.choice(np.arange(1, n_items + 1), size=rng.integers(2, n_items // 2), replace=False)
        for _ in range(n_users)
    ]


def sequences(histories: list[np.ndarray]) -> UserSequences:
    return UserSequences(
        [f"u{i}" for i in range(len(histories))],
        [np.asarray(h, dtype=np.int64) for h in histories],
        [np.full(len(h), 4, dtype=np.int64) for h in histories],
    )


def direct_ease_weights(x: np.ndarray, lam: float) -> np.ndarray:
    """EASE column by column: ridge regression of item j on every other item (B_jj = 0)."""
    m = x.shape[1]
    weights = np.zeros((m, m))
    for j in range(m):
        others = [i for i in range(m) if i != j]
        xo = x[:, others]
        weights[others, j] = np.linalg.solve(xo.T @ xo + lam * np.eye(m - 1), xo.T @ x[:, j])
    return weights


@pytest.mark.parametrize("n_users", [5, 30])  # fewer users than items: dual form; more: primal
@pytest.mark.parametrize("dual", [None, True, False])
def test_ease_closed_form_matches_a_direct_solve(n_users, dual):
    histories = random_histories(n_users, N_ITEMS - 2, seed=n_users)  # items 11, 12 never seen
    lam = 3.0
    model = EASE(lam, dual=dual).fit(sequences(histories), N_ITEMS)

    seen = np.unique(np.concatenate(histories))
    column_of = np.full(N_ITEMS + 1, -1)
    column_of[seen] = np.arange(len(seen))
    x = binary_matrix(histories, len(seen), column_of).numpy()
    expected = direct_ease_weights(x, lam)
    np.testing.assert_allclose(model.weights().numpy(), expected, atol=1e-9)

    queries = [np.array([1, 2]), np.array([seen[-1]]), np.zeros(0, dtype=np.int64)]
    scores = model.score(queries).numpy()
    assert scores.shape == (3, N_ITEMS + 1)
    xq = binary_matrix(queries, len(seen), column_of).numpy()
    np.testing.assert_allclose(scores[:, seen], xq @ expected, atol=1e-5)
    unseen = np.setdiff1d(np.arange(N_ITEMS + 1), seen)
    assert np.isneginf(scores[:, unseen]).all()  # padding and never-trained items


def test_ease_requires_fit_and_positive_lambda():
    with pytest.raises(ValueError):
        EASE(0.0)
    with pytest.raises(RuntimeError):
        EASE().score([np.array([1])])


def split_with_pattern(n_users: int = 40, seed: int = 0):
    """Users read pairs (2k-1, 2k) together: a co-occurrence pattern EASE can learn."""
    rng = np.random.default_rng(seed)
    histories = []
    for _ in range(n_users):
        pairs = rng.choice(np.arange(1, N_ITEMS // 2 + 1), size=3, replace=False)
        histories.append(np.concatenate([[2 * p - 1, 2 * p] for p in pairs]).astype(np.int64))
    return leave_last_out(sequences(histories))


def test_tune_ease_keeps_the_best_validation_lambda():
    split = split_with_pattern()
    model, results = tune_ease(split, N_ITEMS, lambdas=(0.5, 5.0, 5000.0))
    assert set(results) == {0.5, 5.0, 5000.0}
    assert results[model.lam] == max(results.values())
    # The pair pattern makes the validation target (first of the last pair) hard, but the test
    # target (its partner) easy once the validation item is in the history.
    assert evaluate_split(model.score, split, N_ITEMS, "test")["hr@10"] == 1.0


def unit_embeddings(n_items: int, dim: int = 8, seed: int = 0) -> torch.Tensor:
    raw = torch.randn(n_items + 1, dim, generator=torch.Generator().manual_seed(seed))
    table = torch.nn.functional.normalize(raw, dim=1)
    table[0] = 0.0
    return table


def test_content_profile_is_a_recency_weighted_mean():
    emb = unit_embeddings(N_ITEMS)
    model = ContentRecommender(emb, window=2, decay=0.5)
    profile = model.profiles([np.array([7, 3, 5])])[0]
    expected = torch.nn.functional.normalize(0.5 * emb[3] + 1.0 * emb[5], dim=0)
    torch.testing.assert_close(profile, expected)

    scores = model.score([np.array([7, 3, 5]), np.zeros(0, dtype=np.int64)])
    torch.testing.assert_close(scores[0], emb @ expected)
    assert torch.equal(scores[1], torch.zeros(N_ITEMS + 1))  # empty history: no preference


def test_content_scores_items_nobody_interacted_with():
    emb = unit_embeddings(N_ITEMS)
    emb[12] = emb[4]  # item 12 never occurs anywhere, but reads like item 4
    model = ContentRecommender(emb, window=1)
    scores = model.score([np.array([4])])
    scores[0, 4] = -math.inf  # (the history item itself is masked in evaluation)
    assert scores[0].argmax().item() == 12


def test_tune_content_picks_the_best_window():
    split = split_with_pattern()
    emb = unit_embeddings(N_ITEMS)
    model, results = tune_content(split, emb, windows=(1, 2, 50))
    assert results[model.window] == max(results.values())


def _standardized_reference(row: np.ndarray) -> np.ndarray:
    """The definition, in float64 numpy: z over the finite real items, the rest the lowest z."""
    values = row[1:].astype(np.float64)
    finite = np.isfinite(values)
    out = np.zeros_like(values)
    if finite.any():
        mean, std = values[finite].mean(), max(values[finite].std(), 1e-12)
        out[finite] = (values[finite] - mean) / std
        out[~finite] = out[finite].min()
    return np.concatenate([[0.0], out])


def test_standardize_scores_fast_and_masked_paths_follow_the_definition():
    """Rows of finite scores take the fast path, rows with -inf/NaN/+inf the masked one; both
    give the definition's values (padding column ignored), constant and empty rows included."""
    rng = np.random.default_rng(0)
    finite = rng.normal(3.0, 2.0, size=(40, 301)).astype(np.float32)
    finite[:, 0] = -np.inf  # padding: never part of the statistics
    finite[5] = 7.0  # a constant row: std 0, all zeros
    mixed = finite.copy()
    mixed[::3, 10:40] = -np.inf
    mixed[1, 50] = np.nan
    mixed[2, 60] = np.inf
    mixed[4, 1:] = -np.inf  # nothing scorable: zeros
    for scores in (finite, mixed):
        got = standardize_scores(torch.from_numpy(scores)).numpy()
        expected = np.stack([_standardized_reference(row) for row in scores])
        np.testing.assert_allclose(got, expected, atol=2e-5)
    assert standardize_scores(finite).dtype == torch.float32  # numpy in, float32 tensor out


def test_standardize_scores_and_hybrid_blend():
    raw = torch.tensor([[5.0, 1.0, 2.0, 3.0, -math.inf]])
    z = standardize_scores(raw)
    assert z[0, 0] == 0.0
    finite = torch.tensor([1.0, 2.0, 3.0])
    torch.testing.assert_close(z[0, 1:4], (finite - finite.mean()) / finite.std(unbiased=False))
    assert z[0, 4] == z[0, 1:4].min()  # an unscorable item becomes the row's lowest

    first = lambda h, t=None: torch.tensor([[0.0, 1.0, 2.0, 3.0]])  # noqa: E731
    second = lambda h, t=None: torch.tensor([[0.0, 30.0, 20.0, 10.0]])  # noqa: E731
    assert HybridScorer(first, second, 1.0).score([[]]).argmax().item() == 3
    assert HybridScorer(first, second, 0.0).score([[]]).argmax().item() == 1
    with pytest.raises(ValueError):
        HybridScorer(first, second, 1.5)

    # Item 1 never occurred in the first model's training: the second model's score stands in.
    unseen = torch.tensor([True, True, False, False])
    fallback = HybridScorer(first, second, 1.0, unseen).score([[]])
    assert fallback.argmax().item() == 1
    torch.testing.assert_close(fallback[0, 2:], standardize_scores(first([[]]))[0, 2:])
    torch.testing.assert_close(fallback[0, 1], standardize_scores(second([[]]))[0, 1])
    # Any alpha: the definition on seen columns, the second model's score on unseen ones.
    primary, secondary = torch.randn(3, 4), torch.randn(3, 4)
    mixed = blend(primary, secondary, 0.3, unseen)
    torch.testing.assert_close(mixed[:, 2:], 0.3 * primary[:, 2:] + 0.7 * secondary[:, 2:])
    torch.testing.assert_close(mixed[:, :2], secondary[:, :2])


def test_tune_hybrid_picks_the_blend_when_each_part_knows_one_user():
    # Validation targets: user 0 -> item 4, user 1 -> item 3. Model A knows user 0's taste
    # and has a flat, uninformative ramp for user 1; model B the other way round.
    split = leave_last_out(sequences([np.array([7, 1, 9, 4, 5]), np.array([7, 2, 9, 3, 6])]))
    ramp = torch.linspace(0.0, 0.01, N_ITEMS + 1)  # prefers high item ids, i.e. not the targets
    a_scores, b_scores = ramp.repeat(2, 1), ramp.repeat(2, 1)
    a_scores[0, 4] = 1.0
    b_scores[1, 3] = 1.0

    def rows(table):
        return lambda histories, types=None: table[: len(histories)]

    scorer, results = tune_hybrid(rows(a_scores), rows(b_scores), split, N_ITEMS, alphas=(0.0, 0.5, 1.0))
    assert results[0.5] == pytest.approx(1.0)  # both targets at rank 1
    assert results[0.0] < 1.0 and results[1.0] < 1.0
    assert scorer.alpha == 0.5
    assert evaluate_split(scorer.score, split, N_ITEMS, "val")["ndcg@10"] == pytest.approx(1.0)


def test_mmr_without_diversity_keeps_the_model_order_and_masks_history():
    emb = unit_embeddings(N_ITEMS)
    scores = torch.arange(N_ITEMS + 1, dtype=torch.float32)[None].repeat(2, 1)  # item 12 best
    reranker = MMRReranker(emb, diversity=0.0, k=4, n_candidates=8)
    picks = reranker.rerank(scores, [np.array([12, 10]), np.zeros(0, dtype=np.int64)])
    assert picks.tolist() == [[11, 9, 8, 7], [12, 11, 10, 9]]


def test_mmr_diversity_skips_near_duplicates_and_raises_ild():
    emb = unit_embeddings(N_ITEMS)
    emb[11] = emb[12]  # the two best items are identical twins
    emb[10] = emb[12]
    scores = torch.arange(N_ITEMS + 1, dtype=torch.float32)[None]
    plain = MMRReranker(emb, diversity=0.0, k=3).rerank(scores, [np.zeros(0, dtype=np.int64)])
    diverse = MMRReranker(emb, diversity=0.7, k=3).rerank(scores, [np.zeros(0, dtype=np.int64)])
    assert plain[0].tolist() == [12, 11, 10]
    assert diverse[0, 0].item() == 12 and 11 not in diverse[0].tolist()[1:]

    def ild(top):
        metrics = RankingMetrics(N_ITEMS, k=3, item_embeddings=emb)
        table = torch.zeros(1, N_ITEMS + 1)
        table[0, top[0]] = torch.tensor([3.0, 2.0, 1.0])
        metrics.update(table, [np.zeros(0, dtype=np.int64)], np.array([1]))
        return metrics.compute()["ild@3"]

    assert ild(plain) == pytest.approx(0.0, abs=1e-6)
    assert ild(diverse) > 0.5


def test_mmr_wrap_puts_the_reranked_list_on_top():
    emb = unit_embeddings(N_ITEMS)
    emb[11] = emb[12]
    base = lambda h, t=None: torch.arange(N_ITEMS + 1, dtype=torch.float32)[None].repeat(len(h), 1)  # noqa: E731
    reranker = MMRReranker(emb, diversity=0.6, k=3)
    histories = [np.array([1])]
    wrapped = reranker.wrap(base)(histories)
    masked = wrapped.clone()
    masked[0, 0] = masked[0, 1] = -math.inf
    assert masked.topk(3).indices[0].tolist() == reranker.rerank(base(histories), histories)[0].tolist()
    with pytest.raises(ValueError):
        MMRReranker(emb, diversity=1.5)


def test_cached_scores_compute_each_set_of_histories_once_within_the_budget():
    from rec_models.models.hybrid import CachedScores

    content = ContentRecommender(unit_embeddings(12), window=2)
    calls = []

    def score(histories, event_types=None):
        calls.append(len(histories))
        return content.score(histories, event_types)

    batch = [np.array([1, 2, 3]), np.array([4])]
    cached = CachedScores(score)
    first = cached(batch)
    assert cached([a.copy() for a in batch]) is first and len(calls) == 1  # same histories: stored
    torch.testing.assert_close(first, content.score(batch))
    cached([np.array([1, 2]), np.array([3, 4])])  # same items, other users' split: another key
    cached(batch, [np.array([0, 0, 1]), np.array([2])])  # other event types: another key
    assert len(calls) == 3
    small = CachedScores(score, max_bytes=first.nbytes - 1)  # nothing fits: always computed
    small(batch), small(batch)
    assert len(calls) == 5
    plain = CachedScores(content.score)
    plain(batch)
    copy = pickle.loads(pickle.dumps(plain))  # (DDP ranks) an empty cache over the same function
    assert plain._scores and copy._bytes == 0 and not copy._scores
    torch.testing.assert_close(copy(batch), first)
    # Standardised once: blends read them as they are (standardized_scores), not standardised again.
    from rec_models.models.hybrid import standardize_scores, standardized_scores

    once = CachedScores(score, standardized=True)
    calls.clear()
    kept = standardized_scores(once, batch)
    assert standardized_scores(once, batch) is kept and len(calls) == 1
    torch.testing.assert_close(kept, standardize_scores(content.score(batch)))
    torch.testing.assert_close(standardized_scores(content.score, batch), kept)  # a plain function: standardised
    assert pickle.loads(pickle.dumps(CachedScores(content.score, standardized=True))).standardized


def test_training_gives_the_same_model_with_and_without_the_partner_cache(monkeypatch, tmp_path):
    from test_serving import make_bundle

    import rec_models.models.hybrid as hybrid
    from rec_models.models import RecommenderConfig, train_recommender

    small = make_bundle(tmp_path / "b", max_epochs=1, ease=False)
    config = RecommenderConfig.from_dict({**small.model.config.to_dict(), "max_epochs": 3, "patience": 3})
    calls = []
    score = ContentRecommender.score
    monkeypatch.setattr(ContentRecommender, "score", lambda self, *args: calls.append(1) or score(self, *args))
    runs, counts, default = {}, {}, hybrid.PARTNER_CACHE_BYTES
    for budget in (default, 0):
        monkeypatch.setattr(hybrid, "PARTNER_CACHE_BYTES", budget)
        calls.clear()
        full, history = train_recommender(small.split, small.text, config)
        tuned, again = train_recommender(small.split, small.text, config, init=full, users_subset=np.arange(8))
        runs[budget], counts[budget] = (full, history, tuned, again), len(calls)
    assert counts[default] < counts[0]  # the cache is used ...
    (full, history, tuned, again), (full0, history0, tuned0, again0) = runs.values()  # ... and changes nothing
    assert len(history["epochs"]) == 3 and history["blend_val_ndcg@10"]
    for a, b in ((history, history0), (again, again0)):
        assert [e["val_hybrid_ndcg@10"] for e in a["epochs"]] == [e["val_hybrid_ndcg@10"] for e in b["epochs"]]
        assert a["best_val_hybrid_ndcg@10"] == b["best_val_hybrid_ndcg@10"] and a["best_alpha"] == b["best_alpha"]
    histories = small.split.test_histories().items[:10]
    assert torch.equal(full.score(histories), full0.score(histories))
    assert torch.equal(tuned.score(histories), tuned0.score(histories))
