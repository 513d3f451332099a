"""Tests for rec_models.text: the real MiniLM encoder once, everything else on a tiny BERT."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rec_models import text as text_module
from rec_models.text import (
    DEFAULT_ITEM_TEMPLATE,
    EmbeddingCache,
    TextEncoder,
    TextTemplate,
    as_matrix,
    embed_catalog,
    make_tiny_encoder_dir,
)


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


def test_template_renders_missing_values_as_empty_strings() -> None:
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
    assert texts == ["Solaris / / /", "/ books / ocean, planet /", "Ubik / / /"]
    assert not any("nan" in text.lower() or "none" in text.lower() for text in texts)


# --- the incremental cache -------------------------------------------------------------------


def test_embed_catalog_encodes_only_new_items(tmp_path: Path, tiny_model_dir: Path) -> None:
    cache_path = tmp_path / "cache" / "embeddings.parquet"
    catalog = make_catalog(40)

    frame, stats = embed_catalog(catalog, TextEncoder(str(tiny_model_dir), bf16=False), cache=EmbeddingCache(cache_path))
    assert (stats["encoded"], stats["cached"], stats["dim"]) == (40, 0, 32)
    assert stats["template_version"] == DEFAULT_ITEM_TEMPLATE.version
    assert frame["item_id"].tolist() == catalog["item_id"].tolist()
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
    other_template = TextTemplate(version="item-v2", template=DEFAULT_ITEM_TEMPLATE.template)
    _, stats = embed_catalog(grown, encoder, template=other_template, cache=EmbeddingCache(cache_path))
    assert (stats["encoded"], stats["cached"]) == (140, 0)
    other_model = TextEncoder(str(make_tiny_encoder_dir(tmp_path / "other", seed=7)), bf16=False)
    _, stats = embed_catalog(grown, other_model, cache=EmbeddingCache(cache_path))
    assert (stats["encoded"], stats["cached"]) == (140, 0)

    assert len(EmbeddingCache(cache_path)) == 140 * 3
    assert [path.name for path in cache_path.parent.iterdir()] == ["embeddings.parquet"]


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

    def broken_write(table, where) -> None:
        Path(where).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(text_module.pq, "write_table", broken_write)
    with pytest.raises(OSError, match="disk full"):
        embed_catalog(make_catalog(3, start=3), encoder, cache=EmbeddingCache(cache_path))
    assert cache_path.read_bytes() == before
    assert [path.name for path in tmp_path.iterdir()] == ["embeddings.parquet"]
