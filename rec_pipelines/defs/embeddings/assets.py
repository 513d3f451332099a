"""LLM-derived item text embeddings: a transformers encoder over each item's text."""


import time

import dagster as dg
import pandas as pd

from rec_pipelines.resources import LakeResource, TextEncoderResource

GROUP = "embeddings"


@dg.asset(group_name=GROUP, kinds={"pytorch"})
def item_text_embeddings(
    context: dg.AssetExecutionContext,
    item_catalog: pd.DataFrame,
    text_encoder: TextEncoderResource,
    lake: LakeResource,
) -> dg.Output[pd.DataFrame]:
    """One L2-normalised vector per catalog item. Cached by (model, template, text): an
    unchanged catalog encodes nothing, new items encode only themselves."""
    from rec_models.text import DEFAULT_ITEM_TEMPLATE, EmbeddingCache, embed_catalog

    encoder = text_encoder.encoder()
    last_log = [0.0]

    def progress(done: int, total: int) -> None:
        if time.monotonic() - last_log[0] > 5 or done == total:
            last_log[0] = time.monotonic()
            context.log.info(f"encoded {done}/{total} item texts")

    cache = EmbeddingCache(lake.store().lake / "embedding_cache.parquet")
    embeddings, stats = embed_catalog(item_catalog, encoder, DEFAULT_ITEM_TEMPLATE, cache=cache, progress=progress)
    context.log.info(f"embeddings: {stats}")
    return dg.Output(
        embeddings,
        metadata={
            "items": len(embeddings),
            "encoded": stats["encoded"],
            "cached": stats["cached"],
            "items_per_s": float(stats["items_per_s"]),
            "model_id": stats["model_id"],
            "dim": stats["dim"],
            "template_version": stats["template_version"],
        },
    )
