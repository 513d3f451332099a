"""The embedding assets on a real Dagster instance with the tiny encoder: incremental caching
(unchanged catalog, 100 new items, a new review, another template, another model), the
user-context asset, and the metadata the UI shows (counts, PCA plot, neighbour tables)."""

from __future__ import annotations

import base64
import io
import json
import os
import pickle
import re
import time
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest
from helpers import make_tiny_encoder_dir
from matplotlib import image as mpimg

from rec_models.data import collapse_repeats, interactions
from rec_models.text import as_matrix
from rec_pipelines.defs.embeddings.assets import (
    item_text_embeddings,
    user_context_embeddings,
)
from rec_pipelines.defs.ingestion.assets import (
    item_catalog,
    raw_feedback,
    validated_feedback,
)
from rec_pipelines.defs.resources import LakeResource, TextEncoderResource
from rec_pipelines.item_embeddings import LOADED_EMBEDDINGS, ItemEmbeddingsRef
from rec_pipelines.lake import StaleLakeTable
from rec_pipelines.plots import (
    figure_to_md,
    markdown_table,
    new_figure,
    sample_rows,
    top_labels,
)

INGESTION = [item_catalog, raw_feedback, validated_feedback]
INLINE_PNG = re.compile(r"!\[[^\]]*\]\(data:image/png;base64,([A-Za-z0-9+/]+=*)\)")


def write_jsonl(path: Path, frame: pd.DataFrame) -> None:
    """Drop a landing file the way producers must: write a hidden file, rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    hidden = path.with_name(f".{path.name}")
    hidden.write_text(frame.to_json(orient="records", lines=True))
    os.replace(hidden, path)


def new_items(n: int) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "item_id": [f"new-{i:03d}" for i in range(n)],
            "title": [f"Brand new title {i}" for i in range(n)],
            "description": [f"A fresh arrival number {i}." for i in range(n)],
            "category": [["Jazz", "Fantasy"][i % 2] for i in range(n)],
            "tags": [["new", f"tag{i % 7}"] for i in range(n)],
        }
    )


def run(assets, lake: LakeResource, instance: dg.DagsterInstance, model_dir: Path, run_config=None):
    result = dg.materialize(
        [*INGESTION, *assets],
        instance=instance,
        resources={"lake": lake, "text_encoder": TextEncoderResource(model_path=str(model_dir))},
        run_config=run_config,
    )
    assert result.success
    return result


def metadata(result, asset: str) -> dict:
    [event] = [e for e in result.get_asset_materialization_events() if e.asset_key.to_user_string() == asset]
    return {key: value.value for key, value in event.materialization.metadata.items()}


def counts(meta: dict) -> tuple[int, int]:
    return meta["encoded"], meta["cached"]


def table_rows(markdown: str) -> list[list[str]]:
    """Body rows of a markdown table, split on unescaped pipes."""
    lines = markdown.strip().splitlines()
    assert re.fullmatch(r"\|(-{3,}\|)+", lines[1]), markdown
    return [[cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]] for line in lines[2:]]


@pytest.fixture
def lake(tmp_path: Path) -> LakeResource:
    return LakeResource(landing_zone=str(tmp_path / "landing"), lake=str(tmp_path / "lake"))



def forget() -> None:
    """Drop this process's copy of the last item embeddings (as a step in another process)."""
    LOADED_EMBEDDINGS.clear()

def test_item_embeddings_are_incremental_at_the_dagster_level(
    tmp_path: Path, lake: LakeResource, tiny_encoder_dir: Path, small_simulator
) -> None:
    small_simulator.write_batch(lake.landing_zone, 0)
    n = len(small_simulator.catalog())
    instance = dg.DagsterInstance.ephemeral()

    first = run([item_text_embeddings], lake, instance, tiny_encoder_dir)
    meta = metadata(first, "item_text_embeddings")
    assert counts(meta) == (n, 0)
    assert meta["items"] == n and meta["dim"] == 32 and meta["items_per_s"] > 0
    assert meta["model_id"].startswith(f"{tiny_encoder_dir.name}@") and meta["template_version"] == "item-v2"
    assert meta["encoder"]["device"] == "cpu" and meta["encoder"]["max_length"] == 512
    ref = first.output_for_node("item_text_embeddings")  # a reference to the lake table, not a copy
    assert isinstance(ref, ItemEmbeddingsRef) and (ref.items, ref.dim) == (n, 32) and len(pickle.dumps(ref)) < 1000
    assert meta["table_path"] == ref.path and meta["table_version"] == ref.version
    frame = ref.frame()
    assert frame["item_id"].tolist() == first.output_for_node("item_catalog")["item_id"].tolist()
    loaded = ref.load()  # the ids and vectors the asset computed (in process), the table's when read back
    forget()
    read = ref.load()
    assert read is not loaded and np.array_equal(read.vectors, loaded.vectors) and np.array_equal(read.vectors, as_matrix(frame))
    assert read.item_ids.tolist() == frame["item_id"].tolist()
    assert as_matrix(frame).shape == (n, 32)
    # the simulator's reviews are part of the item texts
    assert meta["items_with_reviews"] > 0
    reviewed = frame[frame["text"].str.count(r"\|") == 4]
    assert 0 < len(reviewed) == meta["items_with_reviews"]

    # the UI's extras: a PCA plot as an inline PNG and a neighbour table
    [png] = INLINE_PNG.fullmatch(meta["projection"]).groups()
    picture = mpimg.imread(io.BytesIO(base64.b64decode(png)), format="png")
    assert picture.ndim == 3 and picture.shape[0] > 100 and picture.shape[1] > 100
    neighbours = table_rows(meta["nearest_neighbours"])
    titles = set(small_simulator.catalog()["title"])
    assert len(neighbours) == 5 and all(len(row) == 4 for row in neighbours)
    for item, *nearest in neighbours:
        assert item in titles
        assert all(re.fullmatch(r"(.+) \((-?[01]\.\d\d)\)", cell).group(1) in titles - {item} for cell in nearest)

    # unchanged catalog and feedback: nothing is encoded, the output is the same
    again = run([item_text_embeddings], lake, instance, tiny_encoder_dir)
    assert counts(metadata(again, "item_text_embeddings")) == (0, n)
    unchanged = again.output_for_node("item_text_embeddings")
    assert unchanged.version == ref.version  # nothing stored again: the same table
    np.testing.assert_array_equal(as_matrix(unchanged.frame()), as_matrix(frame))


    # a catalog file with 100 new items: exactly those are encoded
    write_jsonl(Path(lake.landing_zone) / "catalog" / "more-items.jsonl", new_items(100))
    grown = run([item_text_embeddings], lake, instance, tiny_encoder_dir)
    assert counts(metadata(grown, "item_text_embeddings")) == (100, n)
    assert len(grown.output_for_node("item_text_embeddings").load()) == n + 100
    forget()
    with pytest.raises(StaleLakeTable, match="materialise item_text_embeddings again"):
        ref.load()  # the first run's reference: the table was stored again since

    # a new review changes one item's text: that item alone is encoded again
    review = pd.DataFrame([{"user_id": "reviewer", "item_id": "new-007", "event_type": "review",
                            "timestamp": int(time.time()) - 60, "text": "A delightful surprise about tag0."}])
    write_jsonl(Path(lake.landing_zone) / "events" / "one-review.jsonl", review)
    reviewed = run([item_text_embeddings], lake, instance, tiny_encoder_dir)
    assert counts(metadata(reviewed, "item_text_embeddings")) == (1, n + 99)
    texts = reviewed.output_for_node("item_text_embeddings").frame().set_index("item_id")["text"]
    assert texts["new-007"].endswith("| A delightful surprise about tag0.")

    # another template, or another model: everything is encoded again
    custom = {"ops": {"item_text_embeddings": {"config": {"template": "{title} | {tags}"}}}}
    retemplated = metadata(run([item_text_embeddings], lake, instance, tiny_encoder_dir, custom),
                           "item_text_embeddings")
    assert counts(retemplated) == (n + 100, 0) and retemplated["template_version"].startswith("custom-")
    other_model = make_tiny_encoder_dir(tmp_path / "other-model", seed=3)
    remodelled = metadata(run([item_text_embeddings], lake, instance, other_model), "item_text_embeddings")
    assert counts(remodelled) == (n + 100, 0) and remodelled["model_id"].startswith("other-model@")


def test_user_context_embeddings_cover_users_with_few_interactions(
    lake: LakeResource, tiny_encoder_dir: Path, small_simulator, monkeypatch
) -> None:
    for batch in (0, 1):  # batch 1 brings brand-new users with a handful of events
        small_simulator.write_batch(lake.landing_zone, batch)
    instance = dg.DagsterInstance.ephemeral()

    result = run([item_text_embeddings, user_context_embeddings], lake, instance, tiny_encoder_dir)
    users = result.output_for_node("user_context_embeddings")
    meta = metadata(result, "user_context_embeddings")
    feedback = result.output_for_node("validated_feedback").read()
    per_user = collapse_repeats(interactions(feedback)).groupby("user_id").size()
    cold = sorted(per_user[per_user < 5].index)
    assert len(cold) > 5
    assert users["user_id"].tolist() == cold
    assert users.set_index("user_id")["interactions"].to_dict() == per_user[cold].to_dict()
    assert counts(meta) == (len(set(users["text"])), 0) and meta["users"] == len(cold)
    assert as_matrix(users).shape == (len(cold), 32)
    assert sum(json.loads(json.dumps(meta["interactions_histogram"])).values()) == len(cold)

    # the text names the user's latest item and ends with the task objective
    catalog = result.output_for_node("item_catalog").set_index("item_id")
    user = cold[0]
    latest = collapse_repeats(interactions(feedback)).query("user_id == @user")["item_id"].iloc[-1]
    text = users.set_index("user_id").loc[user, "text"]
    assert text.startswith(f"{catalog.loc[latest, 'title']} ({catalog.loc[latest, 'category']})")
    assert text.endswith("| Recommend what this user will enjoy next.")
    # sanity table: each shown user's 3 nearest items, none of which they have seen already
    sanity = table_rows(meta["nearest_items"])
    assert len(sanity) == 5
    for user, context, nearest in sanity:
        assert context.replace("\\|", "|") == users.set_index("user_id").loc[user, "text"]
        seen_titles = set(catalog.loc[catalog.index.isin(feedback.query("user_id == @user")["item_id"]), "title"])
        found = [re.fullmatch(r"(.+) \((-?[01]\.\d\d)\)", cell).group(1) for cell in nearest.split("; ")]
        assert len(found) == 3 and set(found) <= set(catalog["title"]) and not set(found) & seen_titles

    # nothing new: every user context comes from the cache; "every user" embeds all of them
    again = run([item_text_embeddings, user_context_embeddings], lake, instance, tiny_encoder_dir)
    assert counts(metadata(again, "user_context_embeddings")) == (0, len(cold))
    # read a share of the users at a time (large histories): the same contexts
    import rec_pipelines.defs.embeddings.assets as embedding_assets

    monkeypatch.setattr(embedding_assets, "CONTEXT_ROWS", len(feedback) // 4)
    shared = run([item_text_embeddings, user_context_embeddings], lake, instance, tiny_encoder_dir)
    columns = ["user_id", "interactions", "text"]
    pd.testing.assert_frame_equal(shared.output_for_node("user_context_embeddings")[columns], users[columns])
    monkeypatch.undo()
    everyone = {"ops": {"user_context_embeddings": {"config": {"max_interactions": 0}}}}
    all_users = run([item_text_embeddings, user_context_embeddings], lake, instance, tiny_encoder_dir, everyone)
    assert sorted(all_users.output_for_node("user_context_embeddings")["user_id"]) == sorted(per_user.index)


# --- plot helpers ----------------------------------------------------------------------------


def test_figure_to_md_is_one_inline_png_image() -> None:
    figure = new_figure(2, 1.5)
    figure.add_subplot().plot([0, 1, 2], [1, 0, 1])
    markdown = figure_to_md(figure, alt="a [bracketed] title", dpi=50)
    [png] = INLINE_PNG.fullmatch(markdown).groups()
    assert base64.b64decode(png).startswith(b"\x89PNG\r\n\x1a\n")
    assert mpimg.imread(io.BytesIO(base64.b64decode(png)), format="png").shape[:2] == (75, 100)


def test_markdown_table_keeps_pipes_inside_their_cell() -> None:
    table = markdown_table(["title", "n"], [["Heat | Dust", 1], ["line\nbreak", 2]])
    assert table_rows(table) == [["Heat \\| Dust", "1"], ["line break", "2"]]


def test_top_labels_and_sample_rows() -> None:
    labels = ["a"] * 5 + ["b"] * 4 + ["c"] * 3 + ["d"]
    assert top_labels(labels, max_labels=3) == ["a"] * 5 + ["b"] * 4 + ["other"] * 4
    assert top_labels(labels, max_labels=4) == labels
    rows = sample_rows(10_000, 2000, seed=0)
    assert len(rows) == 2000 and np.all(np.diff(rows) > 0)
    np.testing.assert_array_equal(rows, sample_rows(10_000, 2000, seed=0))
    np.testing.assert_array_equal(sample_rows(7, 2000), np.arange(7))


def test_the_item_table_updated_batch_by_batch_equals_a_whole_build(tmp_path: Path, tiny_encoder_dir: Path,
                                                                     small_simulator) -> None:
    """Only items of new catalog batches and items with new reviews are rendered again; after
    each step the table equals one built from scratch over the same lake. A rejected covered
    batch (its reviews gone) or another template builds it whole."""
    from rec_models.text import DEFAULT_ITEM_TEMPLATE, TextEncoder, TextTemplate
    from rec_pipelines.defs.embeddings.assets import _catalog_batches
    from rec_pipelines.item_embeddings import update_item_embeddings
    from rec_pipelines.lake import FeedbackStore

    store = FeedbackStore(tmp_path / "landing", tmp_path / "lake", pseudonym_key="k" * 32)
    encoder = TextEncoder(str(tiny_encoder_dir))
    changed = lambda batches: {str(i) for b in batches for i in store.read_batch("catalog", b)["item_id"]}  # noqa: E731

    def update(path, template=DEFAULT_ITEM_TEMPLATE):
        store.ingest("catalog"), store.ingest("events"), store.validate_pending()
        catalog = store.catalog()
        return update_item_embeddings(path, catalog, _catalog_batches(store, catalog), store.validated_events(),
                                      encoder, template, 3, tmp_path / f"cache-{path.stem}.parquet", changed)

    def same_as_scratch(frame):
        scratch, stats = update(tmp_path / f"scratch-{time.monotonic_ns()}.parquet")
        assert stats["table_update"] == "built"
        assert frame["item_id"].tolist() == scratch["item_id"].tolist() and frame["text"].tolist() == scratch["text"].tolist()
        assert frame["has_reviews"].tolist() == scratch["has_reviews"].tolist()
        np.testing.assert_allclose(as_matrix(frame), as_matrix(scratch), atol=2e-2)

    table = tmp_path / "items.parquet"
    small_simulator.write_batch(store.landing_zone, 0)
    frame, stats = update(table)
    assert stats["table_update"] == "built" and frame["has_reviews"].any()
    assert update(table)[1]["table_update"] == "unchanged"

    # a new catalog file: 3 new items and a new title for an old one; a review of another old item
    catalog = store.catalog()
    renamed, reviewed = catalog["item_id"].iloc[0], catalog["item_id"].iloc[5]
    write_jsonl(store.landing_zone / "catalog" / "more.jsonl", pd.concat(
        [new_items(3), catalog.iloc[[0]][["item_id", "category", "tags"]].assign(title="A new title")]))
    write_jsonl(store.landing_zone / "events" / "review.jsonl", pd.DataFrame([{
        "user_id": "r1", "item_id": reviewed, "event_type": "review", "timestamp": 1_790_000_000,
        "text": "The best thing I read this year"}]))
    frame, stats = update(table)
    assert stats["table_update"] == "incremental" and stats["items_rendered"] == 5 and stats["encoded"] == 5
    assert "A new title" in frame.set_index("item_id").loc[renamed, "text"]
    assert "best thing I read" in frame.set_index("item_id").loc[reviewed, "text"]
    same_as_scratch(frame)

    # the review's batch rejected after the fact: its review leaves the item's text (whole build)
    [review_batch] = [a["batch_id"] for a in store.accounts() if a["file"] == "events/review.jsonl"]
    store.reject_batches([review_batch], "bad export")
    frame, stats = update(table)
    assert stats["table_update"] == "built" and stats["encoded"] == 0  # the old text's vector was kept in the table
    assert "best thing I read" not in frame.set_index("item_id").loc[reviewed, "text"]
    same_as_scratch(frame)

    other = TextTemplate(version="other", template="{title}")
    assert update(table, other)[1]["table_update"] == "built"
