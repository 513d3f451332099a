"""The protocol pieces behind ``recsys evaluate`` (cold-start slice, beyond-accuracy metrics,
every-row sequences) and one smoke run of the command on a tiny synthetic MovieLens folder."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from rec_models.data import ItemVocab, UserSequences, leave_last_out
from rec_models.data.schema import EVENT_TYPE_INDEX
from rec_models.evaluation import (
    PopularityRecommender,
    RankingMetrics,
    cold_start_split,
    cold_start_users,
    evaluate_split,
    item_popularity,
    protocol_sequences,
    select_cold_items,
)
from rec_models.models import (
    EASE,
    RATING_FEATURE_OFFSET,
    ContentRecommender,
    HybridScorer,
    event_features,
    training_counts,
)

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models train fastest on one thread

N_ITEMS = 40


def cycle_split(n_users: int = 80, seed: int = 0):
    """Users walk the cycle 1..N_ITEMS in order from a random start: next = current + 1."""
    rng = np.random.default_rng(seed)
    items = [((rng.integers(N_ITEMS) + np.arange(rng.integers(6, 12))) % N_ITEMS + 1) for _ in range(n_users)]
    seqs = UserSequences([f"u{i}" for i in range(n_users)], [s.astype(np.int64) for s in items],
                         [np.full(len(s), 4, dtype=np.int64) for s in items])
    return leave_last_out(seqs)


def circle_embeddings() -> torch.Tensor:
    """Items on a circle, so each item's nearest neighbours are its cycle neighbours."""
    angle = 2 * math.pi * torch.arange(N_ITEMS + 1, dtype=torch.float32) / N_ITEMS
    table = torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    table[0] = 0.0
    return table


def test_cold_item_selection_is_seeded_and_takes_a_tenth_of_the_items():
    split = cycle_split()
    cold = select_cold_items(split, 0.1, seed=7)
    np.testing.assert_array_equal(cold, select_cold_items(split, 0.1, seed=7))
    assert not np.array_equal(cold, select_cold_items(split, 0.1, seed=8))
    assert len(cold) == round(0.1 * N_ITEMS) and len(set(cold.tolist())) == len(cold)
    assert np.all(np.diff(cold) > 0) and cold.min() >= 1 and cold.max() <= N_ITEMS
    with pytest.raises(ValueError):
        select_cold_items(split, 1.5)


def test_cold_split_removes_training_interactions_only():
    split = cycle_split()
    cold = select_cold_items(split, 0.1, seed=0)
    cold_split = cold_start_split(split, cold)
    for before, after, types in zip(split.train.items, cold_split.train.items, cold_split.train.event_types):
        assert not np.isin(after, cold).any()
        np.testing.assert_array_equal(after, before[~np.isin(before, cold)])  # order kept
        assert len(types) == len(after)
    np.testing.assert_array_equal(cold_split.val_targets, split.val_targets)
    np.testing.assert_array_equal(cold_split.test_targets, split.test_targets)

    users = cold_start_users(split, cold)
    assert len(users) > 0
    assert np.isin(split.test_targets[users], cold).all()
    others = np.setdiff1d(np.arange(len(split.train)), users)
    assert not np.isin(split.test_targets[others], cold).any()


def test_id_only_models_score_exactly_zero_on_the_cold_slice_and_text_does_not():
    split = cycle_split()
    cold = select_cold_items(split, 0.1, seed=0)
    cold_split, users = cold_start_split(split, cold), cold_start_users(split, cold)

    popularity = PopularityRecommender().fit(cold_split.train, N_ITEMS)
    ease = EASE(1.0).fit(cold_split.train, N_ITEMS)
    # Popularity on the full split is a fair ID-only model too: it never met a cold item.
    for model in (popularity, ease):
        result = evaluate_split(model.score, cold_split, N_ITEMS, "test", users=users)
        assert result["n_users"] == len(users)
        assert result["hr@10"] == 0.0 and result["ndcg@10"] == 0.0
    # The content model reads item text: the next item is the current one's text neighbour.
    content = ContentRecommender(circle_embeddings(), window=1)
    assert evaluate_split(content.score, cold_split, N_ITEMS, "test", users=users)["hr@10"] == 1.0
    # A hybrid lets the text model speak for items its ID-only partner never saw, even at alpha 1.
    unseen = torch.from_numpy(training_counts(cold_split, N_ITEMS) == 0)
    assert unseen[torch.from_numpy(cold)].all()
    hybrid = HybridScorer(popularity.score, content.score, 1.0, unseen)
    assert evaluate_split(hybrid.score, cold_split, N_ITEMS, "test", users=users)["ndcg@10"] > 0.0


def test_ild_and_novelty_have_exact_values():
    emb = torch.zeros(N_ITEMS + 1, 2)
    emb[1] = emb[2] = torch.tensor([1.0, 0.0])
    emb[3] = torch.tensor([0.0, 1.0])
    popularity = np.full(N_ITEMS + 1, 0.5)
    popularity[3] = 0.125
    metrics = RankingMetrics(N_ITEMS, k=3, item_embeddings=emb, item_popularity=popularity)
    scores = torch.zeros(1, N_ITEMS + 1)
    scores[0, 1:4] = torch.tensor([3.0, 2.0, 1.0])
    metrics.update(scores, [np.zeros(0, dtype=np.int64)], np.array([1]))
    result = metrics.compute()
    # Pairs (1,2): distance 0, (1,3) and (2,3): distance 1 -> mean 2/3.
    assert result["ild@3"] == pytest.approx(2 / 3)
    assert result["novelty@3"] == pytest.approx((1 + 1 + 3) / 3)  # -log2 of 0.5, 0.5, 0.125

    seqs = UserSequences(["a", "b", "c"], [np.array([1, 1, 2]), np.array([1]), np.array([3])],
                         [np.ones(3, np.int64), np.ones(1, np.int64), np.ones(1, np.int64)])
    np.testing.assert_allclose(item_popularity(seqs, 4), [0.25, 0.75, 0.5, 0.5, 0.25])


def test_protocol_sequences_keep_every_row_in_stable_time_order_with_rating_features():
    events = pd.DataFrame({
        "user_id": ["b", "a", "a", "a", "a", "b"],
        "item_id": ["x", "y", "x", "z", "y", "z"],
        "event_type": ["rating"] * 5 + ["click"],
        "value": [0.5, 1.0, 5.0, 3.5, 2.0, np.nan],
        "timestamp": [5, 2, 1, 2, 2, 1],
    })
    vocab = ItemVocab(["z"])
    seqs = protocol_sequences(events, vocab, features=event_features)
    assert seqs.user_ids == ["a", "b"]
    # Ties (timestamp 2 for user a) keep file order; low ratings and repeats are kept.
    assert [vocab.ids[i - 1] for i in seqs.items[0]] == ["x", "y", "z", "y"]
    assert [vocab.ids[i - 1] for i in seqs.items[1]] == ["z", "x"]
    assert seqs.event_types[0].tolist() == [RATING_FEATURE_OFFSET + b for b in (9, 1, 6, 3)]
    assert seqs.event_types[1].tolist() == [EVENT_TYPE_INDEX["click"], RATING_FEATURE_OFFSET + 0]
    plain = protocol_sequences(events, ItemVocab())
    assert plain.event_types[0].tolist() == [EVENT_TYPE_INDEX["rating"]] * 4


def write_tiny_movielens(folder, n_users: int = 40, n_movies: int = 30, seed: int = 0):
    """ratings.csv / movies.csv / tags.csv where users rate movies along a cycle."""
    rng = np.random.default_rng(seed)
    folder.mkdir()
    rows = []
    for user in range(1, n_users + 1):
        start = rng.integers(n_movies)
        for step in range(int(rng.integers(6, 12))):
            movie = (start + step) % n_movies + 1
            rows.append((user, movie, float(rng.integers(1, 11)) / 2, 1_600_000_000 + 60 * step))
    pd.DataFrame(rows, columns=["userId", "movieId", "rating", "timestamp"]).to_csv(folder / "ratings.csv", index=False)
    genres = ["Action", "Comedy", "Drama"]
    pd.DataFrame({
        "movieId": range(1, n_movies + 1),
        "title": [f"Movie {m} ({1950 + m})" for m in range(1, n_movies + 1)],
        "genres": [genres[m % 3] for m in range(1, n_movies + 1)],
    }).to_csv(folder / "movies.csv", index=False)
    pd.DataFrame({"userId": [1, 2], "movieId": [1, 1], "tag": ["funny", "Funny"], "timestamp": [1, 2]}).to_csv(
        folder / "tags.csv", index=False
    )
    return folder


def test_recsys_evaluate_smoke_run(recsys_env, tmp_path, tiny_encoder_dir, capsys):
    from rec_pipelines.cli import main

    data = write_tiny_movielens(tmp_path / "ml-tiny")
    out = tmp_path / "report" / "eval.json"
    common = ["--data", str(data), "--out", str(out), "--text-model", str(tiny_encoder_dir), "--threads", "1",
              "--d-model", "16", "--max-len", "8", "--max-epochs", "2", "--patience", "1", "--batch-size", "32",
              "--ease-lambdas", "1", "10"]
    assert main(["evaluate", *common, "--checkpoint", str(tmp_path / "main.pt")]) == 0
    printed = capsys.readouterr().out
    assert "sequences/s" in printed and "peak RSS" in printed and "cold_ndcg@10" in printed

    report = json.loads(out.read_text())
    dataset = report["dataset"]
    assert (dataset["layout"], dataset["protocol_users"], dataset["protocol_items"]) == ("csv", 40, 30)
    assert dataset["cold_items"] == 3 and dataset["text_encoded"] == 30
    assert list(report["models"]) == ["popularity", "ease", "content", "sasrec", "main", "main+mmr"]
    for name, metrics in report["models"].items():
        for key in ("hr@10", "ndcg@10", "coverage@10", "ild@10", "novelty@10", "cold_ndcg@10"):
            assert 0.0 <= metrics[key] or key == "novelty@10", (name, key)
            assert key == "novelty@10" or metrics[key] <= 1.0
        assert metrics["train_s"] >= 0.0 and metrics["eval_s"] >= 0.0
        assert metrics["ndcg@10"] <= metrics["hr@10"]
    assert report["models"]["popularity"]["cold_ndcg@10"] == 0.0
    assert report["models"]["ease"]["cold_ndcg@10"] == 0.0
    assert 0.0 <= report["tuning"]["main"]["alpha"] <= 1.0
    assert report["tuning"]["sasrec"]["config"]["rating_features"] is True
    assert (tmp_path / "main.pt").exists()

    # A second run reuses the cached text embeddings (default cache: beside --out).
    assert main(["evaluate", *common, "--skip-cold", "--max-epochs", "1"]) == 0
    again = json.loads(out.read_text())
    assert again["dataset"]["text_encoded"] == 0 and again["dataset"]["text_cached"] == 30
    assert "cold_ndcg@10" not in again["models"]["main"]
    assert (out.parent / "cache" / "item_embeddings.parquet").exists()


def test_svd_item_factors_follow_co_occurrence_and_leave_unseen_items_at_zero():
    from rec_models.models import svd_item_factors

    torch.manual_seed(0)
    # Items 1-3 are always read together, items 4-6 together; item 7 never.
    histories = [np.array([1, 2, 3])] * 5 + [np.array([4, 5, 6])] * 5 + [np.array([1, 2])]
    factors = svd_item_factors(histories, 7, dim=4)
    assert factors.shape == (8, 4)
    assert torch.equal(factors[7], torch.zeros(4)) and factors[0].abs().max() < 1e-5
    assert factors.norm(dim=1).max() == pytest.approx(3.0)
    similarity = factors @ factors.T
    assert similarity[1, 2] > 1.0 and similarity[4, 5] > 1.0
    assert abs(similarity[1, 4]) < 1e-4  # never together


def test_item_bias_rating_features_and_svd_init_survive_grow_and_save(tmp_path):
    from rec_models.models import (
        SASRecBackbone,
        SASRecConfig,
        load_backbone,
        save_backbone,
    )

    config = SASRecConfig(n_items=6, text_dim=4, d_model=8, max_len=5, item_bias=True, rating_features=True)
    text = torch.randn(7, 4, generator=torch.Generator().manual_seed(0))
    backbone = SASRecBackbone(config, text)
    backbone.init_item_bias(np.array([0, 3, 0, 1, 0, 0, 7]))
    torch.testing.assert_close(backbone.item_bias.detach(), torch.log1p(torch.tensor([0, 3, 0, 1, 0, 0, 7.0])))
    assert backbone.event_type_embedding.num_embeddings == RATING_FEATURE_OFFSET + 10

    factors = torch.randn(7, 8)
    backbone.init_id_embeddings(factors)
    assert torch.equal(backbone.id_embedding.weight[1:].detach(), factors[1:])
    assert backbone.text_projection.weight.abs().sum() == 0  # text side starts silent

    # Scores are representation dot products plus the item bias.
    history = [np.array([1, 2])]
    features = [np.array([RATING_FEATURE_OFFSET + 9, RATING_FEATURE_OFFSET])]
    scores = backbone.score_histories(history, features)
    backbone.item_bias.data.zero_()
    torch.testing.assert_close(scores - backbone.score_histories(history, features),
                               torch.log1p(torch.tensor([[0, 3, 0, 1, 0, 0, 7.0]])))

    backbone.grow(torch.cat([text, torch.randn(2, 4)]))
    assert backbone.item_bias.shape == (9,) and backbone.config.n_items == 8
    save_backbone(backbone, tmp_path / "b.pt")
    restored = load_backbone(tmp_path / "b.pt")
    assert restored.config.item_bias and restored.config.rating_features
    torch.testing.assert_close(restored.score_histories(history, features), backbone.score_histories(history, features))


def test_train_sasrec_with_svd_init_and_bias_learns_the_cycle():
    from rec_models.models import SASRecConfig, train_sasrec

    split = cycle_split(n_users=120)
    config = SASRecConfig(n_items=N_ITEMS, text_dim=2, d_model=16, max_len=8, dropout=0.1, lr=1e-2, batch_size=32,
                          max_epochs=6, patience=6, loss="sampled", n_negatives=16, item_bias=True, id_init="svd")
    backbone, history = train_sasrec(split, config, circle_embeddings())
    assert history["best_val_ndcg@10"] > 0.5  # the next item is always current + 1
    assert evaluate_split(backbone.score_histories, split, N_ITEMS, "test")["hr@10"] > 0.8


def test_frozen_svd_ids_stay_fixed_while_text_and_transformer_learn():
    import lightning as L

    from rec_models.models import (
        SASRecBackbone,
        SASRecConfig,
        svd_item_factors,
        train_sasrec,
    )

    split = cycle_split(n_users=60)
    config = SASRecConfig(n_items=N_ITEMS, text_dim=2, d_model=8, max_len=6, batch_size=32, max_epochs=2,
                          loss="sampled", n_negatives=8, item_bias=True, id_init="svd", freeze_ids=True,
                          id_dropout=0.5)
    # train_sasrec seeds, builds the backbone, then draws the SVD factors: replay that order.
    L.seed_everything(config.seed, verbose=False)
    SASRecBackbone(config, circle_embeddings())
    expected = svd_item_factors(split.train.items, N_ITEMS, config.d_model)

    backbone, _ = train_sasrec(split, config, circle_embeddings())
    assert not backbone.id_embedding.weight.requires_grad
    torch.testing.assert_close(backbone.id_embedding.weight[1:].detach(), expected[1:])
    assert backbone.text_projection.weight.abs().sum() > 0  # started at zero, learned
    with pytest.raises(ValueError, match="text side"):
        SASRecBackbone(SASRecConfig(n_items=3, id_dropout=0.1))


def test_training_with_a_blend_partner_picks_alpha_with_the_epoch():
    from rec_models.models import (
        DEFAULT_ALPHAS,
        HybridScorer,
        SASRecConfig,
        train_sasrec,
    )

    split = cycle_split(n_users=60)
    content = ContentRecommender(circle_embeddings(), window=1)
    config = SASRecConfig(n_items=N_ITEMS, d_model=8, max_len=6, batch_size=32, max_epochs=2, loss="sampled",
                          n_negatives=8)
    backbone, history = train_sasrec(split, config, blend_with=content.score)
    blend = history["blend_val_ndcg@10"]
    assert set(blend) == set(DEFAULT_ALPHAS)
    assert history["best_val_hybrid_ndcg@10"] == max(blend.values()) == blend[history["best_alpha"]]
    assert history["best_val_ndcg@10"] == blend[1.0]
    assert blend[0.0] == pytest.approx(evaluate_split(content.score, split, N_ITEMS, "val")["ndcg@10"])
    hybrid = HybridScorer(backbone.score_histories, content.score, history["best_alpha"])
    assert evaluate_split(hybrid.score, split, N_ITEMS, "val")["ndcg@10"] == pytest.approx(
        history["best_val_hybrid_ndcg@10"], abs=1e-6
    )
    # A fine-tune keeps its alpha and never returns a blend worse on validation than its start.
    alpha = history["best_alpha"]
    tuned, again = train_sasrec(split, config, init_backbone=backbone, blend_with=content.score, alphas=(alpha,))
    assert set(again["blend_val_ndcg@10"]) == {alpha}
    assert again["best_val_hybrid_ndcg@10"] >= history["best_val_hybrid_ndcg@10"] - 1e-9
