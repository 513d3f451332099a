"""The serving bundle and the MLflow pyfunc: history from the request counts at once, cold
starts, exclusions, explanations, warnings, and clear errors for malformed requests."""

import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from mlflow.exceptions import MlflowException

from rec_models.data import (
    ItemVocab,
    LeaveLastOutSplit,
    UserSequences,
    build_sequences,
    collapse_repeats,
    interactions,
    leave_last_out,
)
from rec_models.evaluation import evaluate_split
from rec_models.models import HybridRecommender, RecommenderConfig, load_backbone, save_backbone, train_recommender
from rec_models.models.recommender import BACKBONE_FILE
from rec_models.serving import (
    EXPLANATION_PREFIX,
    OUTPUT_COLUMNS,
    InvalidRequest,
    Recommender,
    RecommenderPyfunc,
    parse_requests,
    write_bundle,
)
from rec_models.serving.recommender import USERS_FILE


@dataclass
class TinyBundle:
    path: Path
    sequences: UserSequences
    vocab: ItemVocab
    catalog: pd.DataFrame
    popularity: np.ndarray
    text: torch.Tensor  # [n_items + 1, 16] unit text vectors, row 0 = padding
    model: HybridRecommender
    split: LeaveLastOutSplit


# One EASE weight: pure EASE ranks with ties, where served lists and the pessimistic protocol differ.
TINY = dict(d_model=16, max_len=20, batch_size=32, loss="ce", id_init="default", ease_lambdas=(10.0, 100.0),
            ease_weights=(0.5,))


def make_bundle(path: Path, max_epochs: int = 2, **settings) -> TinyBundle:
    """A real bundle over a 100-item simulated catalog: the recommender trained by
    ``train_recommender`` (SASRec + content + EASE) for ``max_epochs``."""
    from rec_models.simulator import FeedbackSimulator, SimulatorConfig

    simulator = FeedbackSimulator(SimulatorConfig(n_items=100, n_users=60, events_per_user=20))
    catalog, events = simulator.catalog(), simulator.events(0)
    vocab = ItemVocab(catalog["item_id"])
    sequences = build_sequences(collapse_repeats(interactions(events)), vocab)
    split = leave_last_out(sequences)
    text = torch.nn.functional.normalize(torch.randn(len(vocab) + 1, 16, generator=torch.Generator().manual_seed(0)), dim=1)
    text[0] = 0
    config = RecommenderConfig(**{**TINY, "max_epochs": max_epochs, **settings})
    model, _ = train_recommender(split, text, config)
    histories = dict(zip(sequences.user_ids, zip(sequences.items, sequences.event_types)))
    write_bundle(path, model, vocab, catalog.set_index("item_id")["title"], histories)
    return TinyBundle(path, sequences, vocab, catalog, model.item_counts.astype(np.float32), text, model, split)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> TinyBundle:
    return make_bundle(tmp_path_factory.mktemp("bundle"))


@pytest.fixture(scope="module")
def recommender(bundle) -> Recommender:
    return Recommender(bundle.path)


def popular(bundle: TinyBundle, k: int) -> list[str]:
    return [bundle.vocab.ids[i - 1] for i in np.argsort(-bundle.popularity[1:], kind="stable")[:k] + 1]


def test_bundle_histories_load_as_written_and_older_bundles_still_load(bundle, recommender, tmp_path):
    """Histories are written as Arrow lists of narrow integers from one flat array and served
    as int64; a bundle whose users table was written by the older writer (a pandas column of
    Python lists of int64) loads the same histories."""
    sequences = bundle.sequences
    schema = pq.read_schema(bundle.path / USERS_FILE)
    assert schema.field("items").type.value_type.bit_width < 64 and schema.field("event_types").type.value_type == pa.int8()
    assert len(recommender.histories) == len(sequences.user_ids) and "nobody" not in recommender.histories
    assert list(recommender.histories) == sequences.user_ids
    for (items, types), want_items, want_types in zip(recommender.histories.values(), sequences.items, sequences.event_types):
        assert items.dtype == types.dtype == np.int64
        assert items.tolist() == list(want_items) and types.tolist() == list(want_types)
    older = tmp_path / "older"
    shutil.copytree(bundle.path, older)
    pd.DataFrame({"user_id": sequences.user_ids, "items": [a.tolist() for a in sequences.items],
                  "event_types": [a.tolist() for a in sequences.event_types]}).to_parquet(older / USERS_FILE, index=False)
    loaded = Recommender(older).histories
    assert {u: (i.tolist(), t.tolist()) for u, (i, t) in loaded.items()} == \
        {u: (i.tolist(), t.tolist()) for u, (i, t) in recommender.histories.items()}


def test_known_user_gets_k_unseen_titled_items(bundle, recommender):
    user = bundle.sequences.user_ids[0]
    recs = recommender.recommend(pd.DataFrame({"user_id": [user], "k": [5]}))
    assert list(recs.columns) == OUTPUT_COLUMNS
    assert recs["rank"].tolist() == [1, 2, 3, 4, 5]
    seen = set(bundle.vocab.ids[i - 1] for i in bundle.sequences.items[0][-20:])
    assert not seen & set(recs["item_id"])
    titles = bundle.catalog.set_index("item_id")["title"]
    assert recs["title"].tolist() == titles.loc[recs["item_id"]].tolist()
    assert recs["score"].is_monotonic_decreasing
    assert recs["warnings"].map(len).eq(0).all()


def test_recent_items_in_the_request_change_the_list(bundle, recommender):
    user = bundle.sequences.user_ids[0]
    before = recommender.recommend(pd.DataFrame({"user_id": [user]}))
    fresh = before["item_id"].head(3).tolist()  # the user just consumed the top 3
    after = recommender.recommend(pd.DataFrame({"user_id": [user], "recent_item_ids": [fresh]}))
    assert not set(fresh) & set(after["item_id"])
    assert after["item_id"].tolist() != before["item_id"].tolist()


def test_unknown_user_gets_popular_items_and_unknown_ids_are_reported(bundle, recommender):
    recs = recommender.recommend(pd.DataFrame({"user_id": ["nobody"], "recent_item_ids": [["no-such-item"]], "k": [3]}))
    assert recs["item_id"].tolist() == popular(bundle, 3)
    assert recs["explanation"].tolist() == ["", "", ""]
    for warnings in recs["warnings"]:
        assert len(warnings) == 1 and "no-such-item" in warnings[0] and "recent_item_ids" in warnings[0]


def test_unknown_user_with_known_recent_items_gets_model_recommendations(bundle, recommender):
    recent = [bundle.vocab.ids[i - 1] for i in bundle.sequences.items[0][-3:]]
    recs = recommender.recommend(pd.DataFrame({"user_id": ["newcomer"], "recent_item_ids": [recent], "k": [5]}))
    assert not set(recent) & set(recs["item_id"])
    assert recs["explanation"].str.startswith(EXPLANATION_PREFIX).all()


def test_exclude_removes_items_for_warm_and_cold_users(bundle, recommender):
    user = bundle.sequences.user_ids[1]
    top = recommender.recommend(pd.DataFrame({"user_id": [user], "k": [5]}))["item_id"].tolist()
    requests = pd.DataFrame({"user_id": [user, "nobody"], "k": [5, 3],
                             "exclude": [top[:2] + ["ghost"], popular(bundle, 1)]})
    recs = recommender.recommend(requests)
    warm, cold = recs[recs["user_id"] == user], recs[recs["user_id"] == "nobody"]
    assert warm["item_id"].tolist()[:3] == top[2:]
    assert any("ghost" in w and "exclude" in w for w in warm["warnings"].iloc[0])
    assert cold["item_id"].tolist() == popular(bundle, 4)[1:]
    assert cold["warnings"].map(len).eq(0).all()


def test_explanation_names_the_history_item_nearest_by_text(bundle, recommender):
    user, history = bundle.sequences.user_ids[2], bundle.sequences.items[2][-20:]
    recs = recommender.recommend(pd.DataFrame({"user_id": [user], "k": [5]}))
    titles = bundle.catalog.set_index("item_id")["title"]
    for item_id, explanation in zip(recs["item_id"], recs["explanation"]):
        similarity = bundle.text[history] @ bundle.text[bundle.vocab.index([item_id])[0]]
        nearest = bundle.vocab.ids[history[int(similarity.argmax())] - 1]
        assert explanation == EXPLANATION_PREFIX + titles[nearest]


def test_a_batch_answers_each_row_as_if_alone(bundle, recommender):
    users = bundle.sequences.user_ids[:4] + ["nobody"]
    together = recommender.recommend(pd.DataFrame({"user_id": users, "k": [4, 6, 3, 5, 2]}))
    for user, k in zip(users, [4, 6, 3, 5, 2]):
        alone = recommender.recommend(pd.DataFrame({"user_id": [user], "k": [k]}))
        mine = together[together["user_id"] == user]
        assert mine["item_id"].tolist() == alone["item_id"].tolist()
        np.testing.assert_allclose(mine["score"], alone["score"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("diversity", [0.0, 0.3])
def test_served_pyfunc_scores_held_out_users_as_the_offline_scorer_does(bundle, tmp_path, diversity):
    """Serving is the model that was measured: the pyfunc's lists for the held-out users give the
    NDCG@10 the offline evaluation gives (blend, EASE and MMR included)."""
    split = bundle.split
    test = split.test_histories()
    histories = dict(zip(test.user_ids, zip(test.items, test.event_types)))  # what the test ranks from
    path = write_bundle(tmp_path / "b", bundle.model, bundle.vocab, bundle.catalog.set_index("item_id")["title"], histories)
    pyfunc = RecommenderPyfunc()
    pyfunc.load_context(SimpleNamespace(artifacts={"bundle": str(path)}))
    answer = pyfunc.predict(None, pd.DataFrame({"user_id": test.user_ids, "k": 10, "diversity": diversity}))
    targets = dict(zip(test.user_ids, [bundle.vocab.ids[t - 1] for t in split.test_targets]))
    hits = answer[answer["item_id"] == answer["user_id"].map(targets)]
    served_ndcg = float((1.0 / np.log2(hits["rank"] + 1.0)).sum() / len(test.user_ids))
    offline = evaluate_split(bundle.model.ranker(diversity), split, len(bundle.vocab), "test")["ndcg@10"]
    assert len(hits) > 0
    assert served_ndcg == pytest.approx(offline, abs=1e-6)
    assert answer.groupby("user_id").size().eq(10).all()


def test_diversity_knob_changes_the_list_and_lowers_its_similarity(bundle, recommender):
    users = bundle.sequences.user_ids[:20]
    plain = recommender.recommend(pd.DataFrame({"user_id": users, "k": 10, "diversity": 0.0}))
    diverse = recommender.recommend(pd.DataFrame({"user_id": users, "k": 10, "diversity": 0.9}))
    text = torch.nn.functional.normalize(bundle.text, dim=1).numpy()

    def mean_similarity(answer):
        sims = []
        for _, rows in answer.groupby("user_id"):
            vectors = text[bundle.vocab.index(rows["item_id"])]
            similarity = vectors @ vectors.T
            sims.append((similarity.sum() - np.trace(similarity)) / (len(rows) * (len(rows) - 1)))
        return float(np.mean(sims))

    assert plain["item_id"].tolist() != diverse["item_id"].tolist()
    assert mean_similarity(diverse) < mean_similarity(plain)


@pytest.fixture(scope="module")
def text_bundle(tmp_path_factory, tiny_encoder_dir):
    """A bundle whose item vectors come from a (tiny) text encoder that travels in the bundle,
    with one stored user-context vector for a user the model has no history of."""
    from rec_models.text import (
        DEFAULT_ITEM_TEMPLATE,
        TextEncoder,
        as_matrix,
        embed_catalog,
    )

    small = make_bundle(tmp_path_factory.mktemp("plain"), max_epochs=1)
    encoder = TextEncoder(str(tiny_encoder_dir))
    frame, _ = embed_catalog(small.catalog, encoder, DEFAULT_ITEM_TEMPLATE)
    text = torch.zeros(len(small.vocab) + 1, encoder.dim)
    text[torch.from_numpy(small.vocab.index(frame["item_id"]))] = torch.from_numpy(as_matrix(frame))
    model, _ = train_recommender(small.split, text, RecommenderConfig(**{**TINY, "max_epochs": 1}))
    histories = dict(zip(small.sequences.user_ids, zip(small.sequences.items, small.sequences.event_types)))
    newcomer = encoder.encode(["Loves quiet jazz records and poetry"])[0]
    path = write_bundle(tmp_path_factory.mktemp("text"), model, small.vocab, small.catalog.set_index("item_id")["title"],
                        histories, user_contexts=pd.DataFrame({"user_id": ["newcomer"], "embedding": [newcomer]}),
                        text_encoder_dir=tiny_encoder_dir)
    return SimpleNamespace(path=path, model=model, encoder=encoder, newcomer=newcomer, vocab=small.vocab)


def expected_cold(bundle, vector, k):
    scores = bundle.model.cold_scores(torch.from_numpy(np.asarray(vector))[None], 1)
    return [bundle.vocab.ids[i - 1] for i in scores[0].topk(k).indices.tolist()]


def test_a_user_without_history_is_served_from_context_text(text_bundle):
    served = Recommender(text_bundle.path)
    popular_only = served.recommend(pd.DataFrame({"user_id": ["stranger"], "k": [8]}))["item_id"].tolist()
    jazz, cooking = "Loves quiet jazz records and poetry", "Into cooking shows and camping gear"
    answer = served.recommend(pd.DataFrame({"user_id": ["stranger", "stranger"], "k": 8, "context_text": [jazz, cooking]}))
    lists = [rows["item_id"].tolist() for _, rows in answer.groupby(answer.index // 8)]
    assert lists[0] == expected_cold(text_bundle, text_bundle.encoder.encode([jazz])[0], 8)
    assert lists[1] == expected_cold(text_bundle, text_bundle.encoder.encode([cooking])[0], 8)
    assert lists[0] != popular_only and lists[0] != lists[1]
    assert answer["warnings"].map(len).eq(0).all()


def test_a_user_known_by_a_stored_context_vector_gets_it(text_bundle):
    answer = Recommender(text_bundle.path).recommend(pd.DataFrame({"user_id": ["newcomer"], "k": [6]}))
    assert answer["item_id"].tolist() == expected_cold(text_bundle, text_bundle.newcomer, 6)


def test_context_text_without_a_bundled_encoder_is_ignored_with_a_warning(bundle, recommender):
    answer = recommender.recommend(pd.DataFrame({"user_id": ["stranger"], "k": [5], "context_text": ["jazz"]}))
    assert answer["item_id"].tolist() == popular(bundle, 5)
    assert "without a text encoder" in answer["warnings"][0][0]


def test_optional_fields_may_be_left_out_per_row():
    parsed = parse_requests(pd.DataFrame({"user_id": ["a", "b"], "k": [np.nan, 3.0],
                                          "recent_item_ids": [None, ["x", 7]]}))
    assert [(p.k, p.recent_item_ids, p.exclude) for p in parsed] == [(10, [], []), (3, ["x", "7"], [])]


@pytest.mark.parametrize("request_row, field", [
    ({"k": 5}, "user_id"),
    ({"user_id": None}, "user_id"),
    ({"user_id": ["u1"]}, "user_id"),
    ({"user_id": "u1", "k": 0}, "k"),
    ({"user_id": "u1", "k": -3}, "k"),
    ({"user_id": "u1", "k": 2.5}, "k"),
    ({"user_id": "u1", "k": "5"}, "k"),
    ({"user_id": "u1", "k": True}, "k"),
    ({"user_id": "u1", "k": 10_000}, "k"),
    ({"user_id": "u1", "recent_item_ids": "i00001"}, "recent_item_ids"),
    ({"user_id": "u1", "recent_item_ids": ["i00001", None]}, "recent_item_ids"),
    ({"user_id": "u1", "exclude": {"i00001": 1}}, "exclude"),
    ({"user_id": "u1", "diversity": 1.5}, "diversity"),
    ({"user_id": "u1", "diversity": "high"}, "diversity"),
    ({"user_id": "u1", "context_text": ["jazz"]}, "context_text"),
    ({"user_id": "u1", "context_text": "x" * 5000}, "context_text"),
])
def test_malformed_rows_are_rejected_with_the_field_named(request_row, field):
    with pytest.raises(InvalidRequest, match=field):
        parse_requests(pd.DataFrame([request_row]))


def test_pyfunc_maps_bad_requests_to_400_and_hides_internal_errors(bundle, monkeypatch):
    model = RecommenderPyfunc()
    model.load_context(SimpleNamespace(artifacts={"bundle": str(bundle.path)}))
    good = model.predict(None, pd.DataFrame({"user_id": [bundle.sequences.user_ids[0]], "k": [2]}))
    assert len(good) == 2

    with pytest.raises(MlflowException) as bad:
        model.predict(None, pd.DataFrame({"user_id": ["u1"], "k": [-1]}))
    assert bad.value.get_http_status_code() == 400 and "k must be an integer" in bad.value.message

    def broken(requests):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(model.recommender, "recommend", broken)
    with pytest.raises(MlflowException) as internal:
        model.predict(None, pd.DataFrame({"user_id": ["u1"]}))
    assert internal.value.get_http_status_code() == 500
    assert "disk on fire" not in internal.value.serialize_as_json()
    assert "Traceback" not in internal.value.serialize_as_json()


def test_raw_user_ids_are_pseudonymised_with_the_servers_key_and_a_wrong_key_is_refused(bundle, tmp_path, monkeypatch):
    from rec_models.data.privacy import key_id, pseudonymize
    from rec_models.serving import KEY_FILE_ENV, serving_pseudonym_key

    key = b"k" * 32
    raw = bundle.sequences.user_ids[:3]
    pseudonyms = pseudonymize(raw, key)
    histories = {p: (items, types) for p, items, types in
                 zip(pseudonyms, bundle.sequences.items, bundle.sequences.event_types)}
    titles = bundle.catalog.set_index("item_id")["title"]
    path = write_bundle(tmp_path / "b", bundle.model, bundle.vocab, titles, histories, key_id(key))

    by_pseudonym = Recommender(path).recommend(pd.DataFrame({"user_id": [pseudonyms[1]], "k": [5]}))
    assert Recommender(path).recommend(pd.DataFrame({"user_id": [raw[1]], "k": [5]}))["item_id"].tolist() \
        == popular(bundle, 5)  # without the key a raw id is a stranger
    key_file = tmp_path / "pseudonym.key"
    key_file.write_text(key.hex())
    monkeypatch.delenv("RECSYS_PSEUDONYM_KEY", raising=False)
    monkeypatch.setenv(KEY_FILE_ENV, str(key_file))
    with_key = Recommender(path, serving_pseudonym_key())
    by_raw = with_key.recommend(pd.DataFrame({"user_id": [raw[1]], "k": [5]}))
    assert by_raw["item_id"].tolist() == by_pseudonym["item_id"].tolist()
    with pytest.raises(ValueError, match="not the one"):
        Recommender(path, b"another key, long enough")


def test_the_networks_of_a_model_write_their_text_table_once(bundle, tmp_path):
    """The networks of one model read the same text table: the first network's file holds it,
    the others leave it out and share it again when loaded, with the same scores."""
    model = bundle.model
    assert len(model.backbones) == 2
    first, second = torch.load(bundle.path / BACKBONE_FILE, weights_only=True), \
        torch.load(bundle.path / "backbone_1.pt", weights_only=True)
    assert "text_embeddings" in first["state_dict"] and "text_embeddings" not in second["state_dict"]
    assert second["text_saved_in"] == BACKBONE_FILE
    loaded = HybridRecommender.load(bundle.path)
    assert loaded.more_backbones[0].text_embeddings.data_ptr() == loaded.backbone.text_embeddings.data_ptr()  # one copy
    histories = bundle.split.train.items[:5]
    assert torch.equal(loaded.score(histories), model.score(histories))
    with pytest.raises(ValueError, match="no text table"):
        load_backbone(bundle.path / "backbone_1.pt")
    # a network saved alone (or by an earlier version) still carries its table
    save_backbone(model.more_backbones[0], tmp_path / "alone.pt")
    assert torch.equal(load_backbone(tmp_path / "alone.pt").text_embeddings, model.backbone.text_embeddings)
