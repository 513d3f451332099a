"""Item and user-context text embeddings (transformers encoder, incremental cache), with
sample texts, a 2-D projection and nearest neighbours in the Dagster UI."""


import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import dagster as dg
import numpy as np
import pandas as pd

from rec_pipelines.defs.resources import LakeResource, TextEncoderResource, load_ref
from rec_pipelines.item_embeddings import ItemEmbeddingsRef
from rec_pipelines.lake import ValidatedEvents

if TYPE_CHECKING:  # transformers import is slow: at run time only inside the assets
    from rec_models.text import TextEncoder, TextTemplate

GROUP = "embeddings"
CONTEXT_COLUMNS = ["user_id", "item_id", "event_type", "value", "timestamp", "text"]  # build_user_contexts
CONTEXT_ROWS = 2_000_000  # events read at once (a share of the users) for the user contexts
ITEM_CACHE_FILE = "embedding_cache.parquet"
ITEM_TABLE_FILE = "item_embeddings.parquet"  # under <lake>/tables (rec_pipelines.item_embeddings)
USER_CACHE_FILE = "user_context_cache.parquet"
PROGRESS_EVERY_S = 5.0
PROJECTION_MAX_POINTS = 2000
SANITY_EXAMPLES = 5


class ItemTextConfig(dg.Config):
    """How item texts are built. Empty ``template`` means the default
    ``rec_models.text.DEFAULT_ITEM_TEMPLATE``; a custom template gets a version derived from
    its text unless ``template_version`` names one."""

    template: str = ""
    template_version: str = ""
    reviews_per_item: int = 3


class UserContextConfig(dg.Config):
    """Which users get a context embedding and what their context holds.

    ``max_interactions``: embed users with fewer than this many interactions (the ID model
    trains and evaluates users from 5 on); 0 embeds every user.
    """

    recent_items: int = 5
    recent_reviews: int = 2
    max_interactions: int = 5
    template: str = ""
    template_version: str = ""


def _template(default: "TextTemplate", template: str, version: str) -> "TextTemplate":
    """``default``, or the configured template (versioned by its text unless named)."""
    from rec_models.text import TextTemplate

    return TextTemplate.custom(template, version or None) if template else default


def _progress_logger(context: dg.AssetExecutionContext, what: str) -> Callable[[int, int], None]:
    """A ``progress(done, total)`` callback that logs at most every few seconds."""
    started = time.monotonic()
    last = [started]

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] >= PROGRESS_EVERY_S or done == total:
            last[0] = now
            rate = done / max(now - started, 1e-9)
            left = (total - done) / rate if rate > 0 else 0.0
            context.log.info(f"encoded {done}/{total} {what} ({rate:.0f}/s, ~{left:.0f}s left)")

    return progress


def _encoding_metadata(stats: dict, encoder: "TextEncoder") -> dict:
    return {
        "encoded": stats["encoded"],
        "cached": stats["cached"],
        "pruned_cache_entries": stats["pruned"],
        "encode_seconds": round(float(stats["seconds"]), 3),
        "items_per_s": round(float(stats["items_per_s"]), 1),
        "model_id": stats["model_id"],
        "dim": stats["dim"],
        "template_version": stats["template_version"],
        "encoder": dg.MetadataValue.json(encoder.describe()),
    }


def _item_labels(item_ids: pd.Series, item_catalog: pd.DataFrame) -> tuple[list[str], list[str]]:
    """(title, category) per item id, "" where the catalog lacks one."""
    catalog = item_catalog.drop_duplicates("item_id", keep="last").set_index("item_id")
    titles = item_ids.map(catalog["title"]).fillna("").astype(str).tolist()
    if "category" not in catalog.columns:
        return titles, [""] * len(titles)
    return titles, item_ids.map(catalog["category"]).fillna("").astype(str).tolist()


def _projection_md(vectors: np.ndarray, categories: list[str]) -> str:
    from rec_pipelines.plots import (  # matplotlib: only when run
        figure_to_md,
        pca_2d,
        sample_rows,
        scatter_2d,
    )

    rows = sample_rows(len(vectors), PROJECTION_MAX_POINTS, seed=0)
    if len(rows) < 2:
        return "_too few items to project_"
    figure = scatter_2d(
        pca_2d(vectors[rows], seed=0),
        [categories[row] or "(none)" for row in rows],
        title=f"item text embeddings, PCA of {len(rows)} items",
        xlabel="PC 1",
        ylabel="PC 2",
    )
    return figure_to_md(figure, alt="PCA of item text embeddings coloured by category")


def _item_neighbours_md(vectors: np.ndarray, titles: list[str]) -> str:
    from rec_models.text import top_k_cosine
    from rec_pipelines.plots import markdown_table, sample_rows

    if len(vectors) < 2:
        return "_too few items_"
    queries = sample_rows(len(vectors), SANITY_EXAMPLES, seed=1)
    top, sims = top_k_cosine(vectors[queries], vectors, k=3, exclude=[[q] for q in queries])
    rows = [[titles[q], *_similar(titles, top[i], sims[i])] for i, q in enumerate(queries)]
    return markdown_table(["item", *(f"neighbour {n + 1} (cosine)" for n in range(top.shape[1]))], rows)


def _similar(titles: list[str], top: np.ndarray, sims: np.ndarray) -> list[str]:
    """"title (cosine)" for each found neighbour ("" where none was left)."""
    return [f"{titles[j]} ({s:.2f})" if np.isfinite(s) else "" for j, s in zip(top, sims)]


def _catalog_batches(store, item_catalog: pd.DataFrame) -> list[str] | None:
    """The catalog batches ``item_catalog`` was made of, in ingestion order (the ledger's, up to
    the last one it has rows of); None when its rows do not say (no ``batch_id``)."""
    if "batch_id" not in item_catalog.columns:
        return None
    present, batches = set(item_catalog["batch_id"].astype(str)), store.batches("catalog")
    return batches[:max((i + 1 for i, b in enumerate(batches) if b in present), default=0)]


@dg.asset(group_name=GROUP, kinds={"pytorch"})
def item_text_embeddings(
    context: dg.AssetExecutionContext,
    config: ItemTextConfig,
    item_catalog: pd.DataFrame,
    validated_feedback: ValidatedEvents,
    text_encoder: TextEncoderResource,
    lake: LakeResource,
) -> dg.Output[ItemEmbeddingsRef]:
    """One L2-normalised vector per catalog item (``item_id``, ``text``, ``embedding``,
    ``has_reviews``), from the item template over catalog fields and the item's latest reviews.
    Kept as a lake table (``rec_pipelines.item_embeddings``) and cached by (model, template,
    text): a run renders only the items of new catalog batches and those with reviews in new
    event batches, and encodes only texts never embedded. Hands over an ``ItemEmbeddingsRef``
    (the table and the version stored), not a copy of the table."""
    from rec_models.text import DEFAULT_ITEM_TEMPLATE, as_matrix
    from rec_pipelines.item_embeddings import LOADED_EMBEDDINGS, ItemEmbeddings, update_item_embeddings
    from rec_pipelines.plots import markdown_table

    template = _template(DEFAULT_ITEM_TEMPLATE, config.template, config.template_version)
    encoder = text_encoder.encoder()
    store = lake.store()
    context.log.info(f"item texts of {len(item_catalog)} items with {encoder.describe()}, template {template.version}")
    table_path = store.lake / "tables" / ITEM_TABLE_FILE
    embeddings, stats = update_item_embeddings(
        table_path, item_catalog, _catalog_batches(store, item_catalog), validated_feedback,
        encoder, template, config.reviews_per_item, store.lake / ITEM_CACHE_FILE,
        lambda batches: {str(i) for b in batches for i in store.read_batch("catalog", b)["item_id"]},
        progress=_progress_logger(context, "item texts"))
    context.log.info(f"item embeddings ({stats['table_update']}): {stats['items_rendered']} texts rendered, "
                     f"{stats['encoded']} encoded")

    vectors = as_matrix(embeddings)
    ref = ItemEmbeddingsRef(str(table_path), stats["table_version"], len(embeddings), vectors.shape[1] if len(vectors) else 0)
    LOADED_EMBEDDINGS.keep(ref, ItemEmbeddings(embeddings["item_id"].to_numpy(dtype=object), vectors))
    titles, categories = _item_labels(embeddings["item_id"], item_catalog)
    return dg.Output(
        ref,
        metadata={
            "table_path": dg.MetadataValue.path(str(table_path)),
            "table_version": stats["table_version"] or "",
            "items": len(embeddings),
            "items_with_reviews": int(embeddings["has_reviews"].sum()),
            "table_update": stats["table_update"],
            "items_rendered": stats["items_rendered"],
            **_encoding_metadata(stats, encoder),
            "template": template.template,
            "sample_texts": dg.MetadataValue.md(
                markdown_table(["item_id", "text"], embeddings[["item_id", "text"]].head(SANITY_EXAMPLES).to_numpy())
            ),
            "projection": dg.MetadataValue.md(_projection_md(vectors, categories)),
            "nearest_neighbours": dg.MetadataValue.md(_item_neighbours_md(vectors, titles)),
        },
    )


@dg.asset(group_name=GROUP, kinds={"pytorch"})
def user_context_embeddings(
    context: dg.AssetExecutionContext,
    config: UserContextConfig,
    validated_feedback: ValidatedEvents,
    item_catalog: pd.DataFrame,
    item_text_embeddings: ItemEmbeddingsRef,
    text_encoder: TextEncoderResource,
    lake: LakeResource,
) -> dg.Output[pd.DataFrame]:
    """One vector per user with fewer than ``max_interactions`` interactions (``user_id``,
    ``interactions``, ``text``, ``embedding``), from the user-context template over their
    recent items and reviews, in the item embeddings' space. Cached like the items."""
    from rec_models.text import (
        USER_CONTEXT_TEMPLATE,
        EmbeddingCache,
        build_user_contexts,
        embed_texts,
        top_k_cosine,
    )
    from rec_pipelines.plots import markdown_table, sample_rows

    template = _template(USER_CONTEXT_TEMPLATE, config.template, config.template_version)
    # A share of the users at a time (a user's context reads only their own rows): at 10M
    # events the step's peak RSS 5.1 -> 1.7 GB, 54 -> 33 s (contexts cached in both).
    users = pd.concat([
        build_user_contexts(events, item_catalog, recent_items=config.recent_items,
                            recent_reviews=config.recent_reviews, max_interactions=config.max_interactions or None)
        for events in validated_feedback.by_user_shares(CONTEXT_COLUMNS, CONTEXT_ROWS)
    ]).sort_values("user_id", kind="stable").reset_index(drop=True)
    texts = template.render(users)
    encoder = text_encoder.encoder()
    context.log.info(f"embedding {len(texts)} user contexts with {encoder.describe()}, template {template.version}")
    cache = EmbeddingCache(lake.store().lake / USER_CACHE_FILE)
    vectors, stats = embed_texts(
        texts, encoder, template.version, cache=cache, progress=_progress_logger(context, "user contexts"), prune=True
    )
    context.log.info(f"user context embeddings: {stats['encoded']} encoded, {stats['cached']} cached")
    frame = pd.DataFrame(
        {
            "user_id": users["user_id"],
            "interactions": users["interactions"],
            "text": texts,
            "embedding": pd.Series(list(vectors), dtype=object),
        }
    )

    sanity = "_no users_"
    items = load_ref(item_text_embeddings)
    if len(frame) and len(items):
        shown = sample_rows(len(frame), SANITY_EXAMPLES, seed=2)
        item_ids = pd.Series(items.item_ids).astype(str)
        titles, _ = _item_labels(item_ids, item_catalog)
        shown_users = frame["user_id"][shown]
        seen = validated_feedback.read_users(shown_users, ["user_id", "item_id"]).groupby("user_id")["item_id"].agg(set)
        seen_rows = [np.flatnonzero(item_ids.isin(seen.get(frame["user_id"][row], set()))) for row in shown]
        top, sims = top_k_cosine(vectors[shown], items.vectors, k=3, exclude=seen_rows)
        sanity = markdown_table(
            ["user_id", "user context", "nearest unseen items (cosine)"],
            [[frame["user_id"][row], texts[row], "; ".join(filter(None, _similar(titles, top[i], sims[i])))]
             for i, row in enumerate(shown)],
        )
    return dg.Output(
        frame,
        metadata={
            "users": len(frame),
            "max_interactions": config.max_interactions,
            "interactions_histogram": dg.MetadataValue.json(
                {str(k): int(v) for k, v in frame["interactions"].value_counts().sort_index().items()}
            ),
            **_encoding_metadata(stats, encoder),
            "template": template.template,
            "nearest_items": dg.MetadataValue.md(sanity),
        },
    )
