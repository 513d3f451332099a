"""Tests for rec_models.text: the real MiniLM encoder once, everything else on a tiny BERT."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import make_tiny_encoder_dir

from rec_models import text as text_module
from rec_models.text import (
    DEFAULT_ITEM_TEMPLATE,
    EmbeddingCache,
    TextEncoder,
    TextTemplate,
    as_matrix,
    embed_catalog,
)
from rec_models.text import cache as cache_module


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_encoder_dir(tmp_path_factory.mktemp("models") / "tiny")


def make_catalog(n: int, start: int = 0) -> pd.DataFrame:
    ids = range(start, start + n)
    return pd.DataFrame(
        {
            "item_id": [f"item-{i}" for i in ids],
            "title": [f"Title number {i}" for i in ids],
            "description": ["word " * (i % 7) + f"item {i}" for i in ids],
            "category": [["books", "music", "movies"][i % 3] for i in ids],
            "tags": [[f"tag{i % 5}", f"tag{i % 11}"] for i in ids],
        }
    )


# --- the real all-MiniLM-L6-v2 ---------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm() -> TextEncoder:
    return TextEncoder(device="cpu", bf16=False)


def test_minilm_embeddings_are_unit_vectors_that_capture_meaning(minilm: TextEncoder) -> None:
    space, scifi, pasta = minilm.encode(
        ["a space opera about starships", "science fiction novel with aliens", "a cookbook of italian pasta recipes"]
    )
    assert minilm.dim == 384
    assert minilm.max_length == 256  # the model's sentence-transformers limit, as the reference uses
    assert minilm.model_id.startswith("all-MiniLM-L6-v2@")
    np.testing.assert_allclose(np.linalg.norm([space, scifi, pasta], axis=1), 1.0, atol=1e-5)
    assert space @ scifi > space @ pasta + 0.1


def test_minilm_bf16_matches_fp32(minilm: TextEncoder) -> None:
    texts = [
        "a space opera about starships",
        "jazz guitar album recorded live in paris",
        "a detective hunts a murderer through victorian london",
        "short",
        "a cookbook of italian pasta recipes | food | pasta, italian | sauces and fresh pasta",
    ]
    fp32 = minilm.encode(texts)
    bf16 = TextEncoder(device="cpu", bf16=True).encode(texts)
    assert bf16.dtype == np.float32
    assert np.all(np.sum(fp32 * bf16, axis=1) > 0.999)


# --- the encoder, on the tiny model ----------------------------------------------------------


def test_tiny_model_loads_offline_with_small_dim(tiny_model_dir: Path) -> None:
    encoder = TextEncoder(str(tiny_model_dir), bf16=False)
    vectors = encoder.encode(["hello world"])
    assert encoder.dim == 32
    assert vectors.shape == (1, 32) and vectors.dtype == np.float32
    assert encoder.model_id.startswith("tiny@")


def test_encode_keeps_input_order_despite_length_sorting(tiny_model_dir: Path) -> None:
    texts = ["a much longer text with many words in it to pad the others", "b", "medium text here", "cc dd"]
    encoder = TextEncoder(str(tiny_model_dir), batch_size=2, bf16=False)
    batched = encoder.encode(texts)
    one_by_one = np.vstack([encoder.encode([text]) for text in texts])
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)
    # Distinct texts give distinct vectors, so a row mix-up could not go unnoticed.
    assert np.abs(batched[0] - batched[1]).max() > 1e-3


def test_encode_reports_progress_after_each_batch(tiny_model_dir: Path) -> None:
    calls: list[tuple[int, int]] = []
    encoder = TextEncoder(str(tiny_model_dir), batch_size=3, bf16=False)
    encoder.encode([f"text {i}" for i in range(7)], progress=lambda done, total: calls.append((done, total)))
    assert calls == [(3, 7), (6, 7), (7, 7)]


def test_batches_respect_a_token_budget(tiny_model_dir: Path) -> None:
    # "text 3" is 4 tokens with [CLS] and [SEP]: a 12-token budget fits 3 of them per batch.
    calls: list[tuple[int, int]] = []
    encoder = TextEncoder(str(tiny_model_dir), batch_size=100, max_batch_tokens=12, bf16=False)
    texts = [f"text {i}" for i in range(7)]
    vectors = encoder.encode(texts, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(3, 7), (6, 7), (7, 7)]
    np.testing.assert_allclose(vectors, TextEncoder(str(tiny_model_dir), bf16=False).encode(texts), atol=1e-5)
    # a text longer than the budget still gets a batch of its own
    calls.clear()
    long_text = "one two three four five six seven eight nine ten eleven"
    encoder.encode([long_text, "x"], progress=lambda *call: calls.append(call))
    assert calls == [(1, 2), (2, 2)]


def test_truncation_length_defaults_to_the_model_limit_and_is_part_of_the_id(tiny_model_dir: Path) -> None:
    default = TextEncoder(str(tiny_model_dir), bf16=False)
    short = TextEncoder(str(tiny_model_dir), max_length=6, bf16=False)
    assert default.max_length == 512 and short.max_length == 6
    assert short.model_id != default.model_id and short.model_id.split("@")[0] == default.model_id.split("@")[0]
    a, b = short.encode(["alpha beta gamma delta zeta", "alpha beta gamma delta omega psi"])
    np.testing.assert_allclose(a, b, atol=1e-6)  # both cut to [CLS] + 4 word pieces + [SEP]
    a, b = default.encode(["alpha beta gamma delta zeta", "alpha beta gamma delta omega psi"])
    assert np.abs(a - b).max() > 1e-3
    assert short.describe() == {"model_id": short.model_id, "device": "cpu", "bf16": False, "max_length": 6,
                                "batch_size": 256, "max_batch_tokens": 4096}


def test_top_k_cosine_ranks_and_excludes_rows() -> None:
    vectors = np.array([[1, 0], [0.8, 0.6], [0, 1], [-1, 0]], dtype=np.float32)
    top, sims = text_module.top_k_cosine(vectors, vectors, k=2, exclude=[[0], [1], [2], [3]])
    np.testing.assert_array_equal(top, [[1, 2], [0, 2], [1, 0], [2, 1]])
    np.testing.assert_allclose(sims[0], [0.8, 0.0], atol=1e-6)
    top, sims = text_module.top_k_cosine(vectors[:1], vectors, k=10, exclude=[[0, 1, 2]])
    np.testing.assert_array_equal(top[0, :1], [3])
    assert sims.shape == (1, 4) and sims[0, 0] == -1 and np.isneginf(sims[0, 1:]).all()


def test_encode_empty_input_returns_empty_matrix_without_loading(tiny_model_dir: Path) -> None:
    encoder = TextEncoder(str(tiny_model_dir))
    vectors = encoder.encode([])
    assert vectors.shape == (0, 32) and vectors.dtype == np.float32
    assert not encoder.is_loaded


def test_model_id_is_stable_and_differs_between_models(tmp_path: Path, tiny_model_dir: Path) -> None:
    # Same folder name and architecture, different weights: the ids must still differ.
    first = make_tiny_encoder_dir(tmp_path / "a" / "tiny", seed=1)
    second = make_tiny_encoder_dir(tmp_path / "b" / "tiny", seed=2)
    assert TextEncoder(str(first)).model_id == TextEncoder(str(first)).model_id
    ids = {TextEncoder(str(path)).model_id for path in (first, second, tiny_model_dir)}
    assert len(ids) == 3


# --- templates -------------------------------------------------------------------------------


def test_default_template_renders_fields_in_order_with_tags_joined() -> None:
    catalog = pd.DataFrame(
        {
            "item_id": ["x"],
            "title": ["Dune"],
            "description": ["Desert planet  epic.\nSpice."],
            "category": ["books"],
            "tags": [["sci-fi", "classic"]],
        }
    )
    assert DEFAULT_ITEM_TEMPLATE.render(catalog) == ["Dune | books | sci-fi, classic | Desert planet epic. Spice."]
    with_reviews = catalog.assign(reviews=["Loved it. / Too long."])
    assert DEFAULT_ITEM_TEMPLATE.render(with_reviews) == [
        "Dune | books | sci-fi, classic | Desert planet epic. Spice. | Loved it. / Too long."
    ]


def test_template_drops_missing_values_with_their_separator() -> None:
    catalog = pd.DataFrame(
        {
            "item_id": ["a", "b", "c"],
            "title": ["Solaris", None, "Ubik"],
            "category": [np.nan, "books", pd.NA],
            "tags": [None, np.array(["ocean", None, "planet"], dtype=object), []],
            # no "description" column at all
        }
    )
    texts = TextTemplate(version="t", template="{title} / {category} / {tags} / {description}").render(catalog)
    assert texts == ["Solaris", "/ books / ocean, planet", "Ubik"]
    assert not any("nan" in text.lower() or "none" in text.lower() for text in texts)
    labelled = TextTemplate(version="t", template="{title}. Category: {category}. Tags: {tags}.")
    assert labelled.render(catalog.iloc[[1, 2]].assign(title=["Dune", "Ubik"])) == [
        "Dune. Category: books. Tags: ocean, planet.",
        "Ubik.",
    ]


def test_custom_template_versions_follow_the_template_text() -> None:
    first = TextTemplate.custom("{title} | {tags}")
    assert first.version.startswith("custom-") and first == TextTemplate.custom("{title} | {tags}")
    assert TextTemplate.custom("{title}").version != first.version
    assert TextTemplate.custom("{title}", version="mine").version == "mine"
    assert first.fields() == ["title", "tags"]


# --- reviews and user contexts ---------------------------------------------------------------


def make_events(rows: list[tuple]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["user_id", "item_id", "event_type", "value", "timestamp", "text"])


def test_add_reviews_keeps_the_latest_reviews_per_item_newest_first() -> None:
    events = make_events(
        [
            ("u1", "a", "review", None, 10, "First on a."),
            ("u2", "a", "review", None, 30, "Third on a."),
            ("u3", "a", "review", None, 20, "Second on a."),
            ("u4", "a", "review", None, 30, "Tied with third, later in the file."),
            ("u1", "b", "view", None, 40, "not a review"),
            ("u2", "b", "review", None, 50, "   "),
            ("u3", "c", "review", None, 60, "Only one on c."),
        ]
    )
    catalog = make_catalog(3).assign(item_id=["a", "b", "c"])
    reviews = text_module.add_reviews(catalog, events, per_item=3)["reviews"].tolist()
    assert reviews == ["Tied with third, later in the file. / Third on a. / Second on a.", "", "Only one on c."]
    assert text_module.add_reviews(catalog, events.drop(columns="text"))["reviews"].tolist() == ["", "", ""]
    repeated_index = events.set_axis(np.zeros(len(events), dtype=int))  # e.g. concatenated batches
    assert text_module.add_reviews(catalog, repeated_index, per_item=3)["reviews"].tolist() == reviews
    assert catalog.columns.tolist() == make_catalog(1).columns.tolist()  # input untouched


def test_add_reviews_without_any_review_keeps_every_item_with_empty_reviews() -> None:
    """MovieLens has ratings only: no item has a review (an Arrow-typed catalog once failed here)."""
    catalog = make_catalog(3).assign(item_id=pd.array(["a", "b", "c"], dtype="string[pyarrow]"))
    ratings = make_events([("u1", "a", "rating", 4.0, 10, None)]).astype({"item_id": "string[pyarrow]",
                                                                          "text": "string[pyarrow]"})
    assert text_module.add_reviews(catalog, ratings)["reviews"].tolist() == ["", "", ""]


def test_user_contexts_describe_users_with_few_interactions() -> None:
    catalog = pd.DataFrame(
        {
            "item_id": [f"i{i}" for i in range(8)],
            "title": [f"Book {i}" for i in range(8)],
            "category": ["Fantasy", "Jazz", None, "Fantasy", "Jazz", "Travel", "Travel", "Jazz"],
        }
    )
    heavy = [("heavy", f"i{i}", "click", None, 100 + i, None) for i in range(6)]
    events = make_events(
        heavy
        + [
            ("new", "i1", "view", None, 10, None),
            ("new", "i2", "purchase", None, 20, None),
            ("new", "i1", "like", None, 30, None),  # a repeat: still one interaction with i1
            ("new", "i3", "skip", None, 40, None),  # negative: not an interaction
            ("new", "i4", "review", None, 50, "Smooth and warm."),
            ("new", "ghost", "click", None, 60, None),  # no catalog entry: counted, not named
            ("rater", "i5", "rating", 1.0, 10, None),  # a low rating is no interaction
        ]
    )
    users = text_module.build_user_contexts(events, catalog, recent_items=2, recent_reviews=1)
    assert users.to_dict("records") == [
        {"user_id": "new", "interactions": 4, "recent_items": ["Book 4 (Jazz)", "Book 2"],
         "reviews": "Smooth and warm."}
    ]
    assert text_module.USER_CONTEXT_TEMPLATE.render(users) == [
        "Book 4 (Jazz), Book 2 | Smooth and warm. | Recommend what this user will enjoy next."
    ]
    everyone = text_module.build_user_contexts(events, catalog, max_interactions=None)
    assert everyone["user_id"].tolist() == ["heavy", "new"]
    assert everyone.iloc[0]["recent_items"] == [
        "Book 5 (Travel)", "Book 4 (Jazz)", "Book 3 (Fantasy)", "Book 2", "Book 1 (Jazz)"
    ]
    assert everyone.iloc[0]["reviews"] == ""


# --- the incremental cache -------------------------------------------------------------------


def test_embed_catalog_encodes_only_new_items(tmp_path: Path, tiny_model_dir: Path) -> None:
    cache_path = tmp_path / "cache" / "embeddings.parquet"
    catalog = make_catalog(40)

    frame, stats = embed_catalog(catalog, TextEncoder(str(tiny_model_dir), bf16=False), cache=EmbeddingCache(cache_path))
    assert (stats["encoded"], stats["cached"], stats["dim"]) == (40, 0, 32)
    assert stats["template_version"] == DEFAULT_ITEM_TEMPLATE.version
    assert frame["item_id"].tolist() == catalog["item_id"].tolist()
    assert frame["text"].tolist() == DEFAULT_ITEM_TEMPLATE.render(catalog)
    first_vectors = as_matrix(frame)
    assert first_vectors.shape == (40, 32) and first_vectors.dtype == np.float32
    direct = TextEncoder(str(tiny_model_dir), bf16=False).encode(DEFAULT_ITEM_TEMPLATE.render(catalog))
    np.testing.assert_allclose(first_vectors, direct, atol=1e-5)

    # Unchanged catalog, fresh process-like objects: nothing is encoded, the model never loads.
    encoder = TextEncoder(str(tiny_model_dir), bf16=False)
    frame, stats = embed_catalog(catalog, encoder, cache=EmbeddingCache(cache_path))
    assert (stats["encoded"], stats["cached"]) == (0, 40)
    assert not encoder.is_loaded
    np.testing.assert_allclose(as_matrix(frame), first_vectors, atol=1e-6)

    # 100 new items (shuffled in among the old ones): exactly those are encoded.
    grown = pd.concat([catalog, make_catalog(100, start=40)]).sample(frac=1.0, random_state=0)
    frame, stats = embed_catalog(grown, encoder, cache=EmbeddingCache(cache_path))
    assert (stats["encoded"], stats["cached"]) == (100, 40)
    assert frame["item_id"].tolist() == grown["item_id"].tolist()
    assert stats["items_per_s"] > 0

    # Another template version, or another model: everything is encoded again.
    other_template = TextTemplate(version="item-other", template=DEFAULT_ITEM_TEMPLATE.template)
    _, stats = embed_catalog(grown, encoder, template=other_template, cache=EmbeddingCache(cache_path))
    assert (stats["encoded"], stats["cached"]) == (140, 0)
    other_model = TextEncoder(str(make_tiny_encoder_dir(tmp_path / "other", seed=7)), bf16=False)
    _, stats = embed_catalog(grown, other_model, cache=EmbeddingCache(cache_path))
    assert (stats["encoded"], stats["cached"]) == (140, 0)

    assert len(EmbeddingCache(cache_path)) == 140 * 3
    assert [path.name for path in cache_path.parent.iterdir()] == ["embeddings.parquet"]

    # Five texts change (e.g. new reviews): those five are encoded, and pruning forgets their
    # old vectors for this model and template only.
    first_five = grown["item_id"].isin(catalog["item_id"][:5])
    changed = grown.assign(description=np.where(first_five, "changed", grown["description"]))
    _, stats = embed_catalog(changed, encoder, cache=EmbeddingCache(cache_path), prune=True)
    assert (stats["encoded"], stats["cached"], stats["pruned"]) == (5, 135, 5)
    assert len(EmbeddingCache(cache_path)) == 140 * 3


def test_embed_catalog_without_cache_encodes_shared_texts_once(tiny_model_dir: Path) -> None:
    catalog = make_catalog(5)
    catalog = pd.concat([catalog, catalog.assign(item_id=lambda f: f["item_id"] + "-copy")])
    frame, stats = embed_catalog(catalog, TextEncoder(str(tiny_model_dir), bf16=False))
    assert (stats["items"], stats["encoded"], stats["cached"]) == (10, 5, 0)
    vectors = as_matrix(frame)
    np.testing.assert_array_equal(vectors[:5], vectors[5:])


def test_failed_cache_write_keeps_previous_file(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache_path = tmp_path / "embeddings.parquet"
    encoder = TextEncoder(str(tiny_model_dir), bf16=False)
    embed_catalog(make_catalog(3), encoder, cache=EmbeddingCache(cache_path))
    before = cache_path.read_bytes()

    def broken_write(table, where, **options) -> None:
        Path(where).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(cache_module.pq, "write_table", broken_write)
    with pytest.raises(OSError, match="disk full"):
        embed_catalog(make_catalog(3, start=3), encoder, cache=EmbeddingCache(cache_path))
    assert cache_path.read_bytes() == before
    assert [path.name for path in tmp_path.iterdir()] == ["embeddings.parquet"]


def test_the_cache_reads_files_written_with_list_vectors(tmp_path: Path) -> None:
    """Caches saved before vectors were stored as fixed-size lists still load (and are saved
    in the new layout)."""
    import pyarrow as pa

    old = pa.table({"model_id": ["m", "m"], "template_version": ["v", "v"], "text_sha256": ["a", "b"],
                    "embedding": pa.array([[1.0, 2.0], [3.0, 4.0]], pa.list_(pa.float32()))})
    cache_path = tmp_path / "old.parquet"
    cache_module.pq.write_table(old, cache_path)
    cache = EmbeddingCache(cache_path)
    np.testing.assert_array_equal(cache.get("m", "v", "b"), np.array([3.0, 4.0], np.float32))
    cache.save()
    assert isinstance(cache_module.pq.read_table(cache_path).column("embedding").type, pa.FixedSizeListType)
    np.testing.assert_array_equal(EmbeddingCache(cache_path).get("m", "v", "a"), np.array([1.0, 2.0], np.float32))
