"""The item text embeddings table behind ``item_text_embeddings``: one row per catalog item
(``item_id``, ``text``, ``embedding``, ``has_reviews``) in catalog order, kept in the lake as
``<lake>/tables/item_embeddings.parquet`` with the catalog and event batches it covers.

An update renders and embeds only the items whose text may have changed: those in new catalog
batches, those with reviews in new event batches, and catalog items the table lacks; every
other row is kept as stored (at 100k items rendering, reviewing and looking up every item took
most of a micro-batch's 9 s step). The result equals a whole build over the same lake. A whole
build runs when there is no table, when the template, the encoder or ``reviews_per_item``
changed, or when a covered event batch was rejected or validated again (its reviews may be
gone); it takes vectors from the embeddings cache and from the stored table, so only texts
never embedded are encoded."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rec_models.files import as_location, parquet_source
from rec_pipelines.lake import LastCopy, StaleLakeTable, ValidatedEvents
from rec_pipelines.lake.tables import write_arrow_atomic

if TYPE_CHECKING:  # transformers loads slowly: the code location imports this module for ItemEmbeddingsRef
    from rec_models.text import TextEncoder, TextTemplate

TABLE_FORMAT = 1
REVIEW_COLUMNS = ["item_id", "event_type", "timestamp", "text"]  # what add_reviews reads


def _key(template: TextTemplate, encoder: TextEncoder, reviews_per_item: int) -> dict:
    return {"format": TABLE_FORMAT, "template_version": template.version, "model_id": encoder.model_id,
            "reviews_per_item": reviews_per_item}


def load_table(path) -> tuple[pd.DataFrame, dict] | None:
    """The stored table and its state (with its ``version``), or None."""
    try:
        table = pq.read_table(parquet_source(path))
    except FileNotFoundError:
        return None
    return _frame(table), json.loads((table.schema.metadata or {}).get(b"recsys", b"{}"))


@dataclass(frozen=True)
class ItemEmbeddings:
    """Item ids (an object array of str, catalog order) and their vectors (float32 [n, dim])."""

    item_ids: np.ndarray
    vectors: np.ndarray

    def __len__(self) -> int:
        return len(self.item_ids)


@dataclass(frozen=True)
class ItemEmbeddingsRef:
    """What ``item_text_embeddings`` hands to the steps after it: the lake table it stored and
    that store's version (a random id), not a copy (100k items x 384 floats: a 190 MB pickle
    written once and read by every consumer). ``load()`` gives the ids and vectors: those the
    asset computed when the step runs in the same process, else read from the table (two of its
    columns), refusing a table stored again since (``StaleLakeTable``); ``frame()`` also has
    the texts."""

    path: str
    version: str | None
    items: int
    dim: int

    def load(self) -> ItemEmbeddings:
        if (kept := LOADED_EMBEDDINGS.get(self)) is not None:
            return kept
        table = self._read(["item_id", "embedding"])
        embeddings = ItemEmbeddings(table.column("item_id").to_numpy(zero_copy_only=False).astype(object),
                                    _matrix(table.column("embedding"), len(table)))
        LOADED_EMBEDDINGS.keep(self, embeddings)
        return embeddings

    def frame(self) -> pd.DataFrame:
        """The whole table: ``item_id``, ``text``, ``embedding`` (one array per row), ``has_reviews``."""
        return _frame(self._read(None))

    def _read(self, columns: list[str] | None) -> pa.Table:
        table = pq.read_table(parquet_source(as_location(self.path)), columns=columns)
        version = json.loads((table.schema.metadata or {}).get(b"recsys", b"{}")).get("version")
        if version != self.version:
            raise StaleLakeTable(
                f"the item embeddings table {self.path} was stored again after item_text_embeddings handed it over "
                f"(version {self.version}, now {version}): materialise item_text_embeddings again")
        return table


LOADED_EMBEDDINGS = LastCopy()
"""The last item embeddings this process computed or read, with their ref."""


def _matrix(column: pa.ChunkedArray, rows: int) -> np.ndarray:
    vectors = column.combine_chunks()
    if not rows:
        return np.zeros((0, 0), np.float32)
    return vectors.values.to_numpy(zero_copy_only=False).reshape(rows, -1).astype(np.float32, copy=False)


def _frame(table: pa.Table) -> pd.DataFrame:
    matrix = _matrix(table.column("embedding"), len(table))
    return pd.DataFrame({"item_id": table.column("item_id").to_numpy(zero_copy_only=False).astype(object),
                         "text": table.column("text").to_pylist(),
                         "embedding": pd.Series(list(matrix), dtype=object),
                         "has_reviews": table.column("has_reviews").to_numpy(zero_copy_only=False).astype(bool)})


def save_table(path, frame: pd.DataFrame, state: dict) -> str:
    """Store ``frame`` with ``state`` and a new version (returned)."""
    version = uuid.uuid4().hex
    matrix = np.stack(frame["embedding"].to_list()).astype(np.float32) if len(frame) else np.zeros((0, 1), np.float32)
    table = pa.table({
        "item_id": pa.array(frame["item_id"].astype(str).tolist(), pa.string()),
        "text": pa.array(list(frame["text"]), pa.string()),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(matrix.ravel(), pa.float32()), matrix.shape[1]),
        "has_reviews": pa.array(frame["has_reviews"].to_numpy(dtype=bool)),
    }).replace_schema_metadata({"recsys": json.dumps({**state, "version": version})})
    # no dictionary: ids, texts and vectors are unique (at 100k items the float column's
    # dictionary attempt made writing ~1.6x and reading ~2x slower)
    write_arrow_atomic(table, path, use_dictionary=["has_reviews"])
    return version


def update_item_embeddings(path, catalog: pd.DataFrame, catalog_batches: list[str] | None, events: ValidatedEvents,
                           encoder: TextEncoder, template: TextTemplate, reviews_per_item: int, cache_path,
                           changed_catalog_items, progress=None) -> tuple[pd.DataFrame, dict]:
    """The item texts and vectors of ``catalog`` (current rows, in order) with the reviews of
    ``events``, updated from the table at ``path`` (and stored back; a table of another
    format is built again). ``catalog_batches``: the
    catalog batches ``catalog`` is made of, in ingestion order (None: not known, build whole); ``changed_catalog_items(batch
    ids)``: the item ids of those catalog batches' rows. Returns the frame (``item_id``,
    ``text``, ``embedding``) and stats (``table_update``: built / incremental / unchanged,
    ``items_rendered``, ``table_version``: the stored table's, and ``embed_texts``' stats)."""
    from rec_models.text import REVIEW_EVENT, add_reviews, embed_texts

    key = _key(template, encoder, reviews_per_item)
    stored = load_table(path)
    current = {"catalog_batches": list(catalog_batches or []), "event_batches": list(events.batches),
               "validated_at": list(events.validated_at)}
    state = stored[1] if stored else {}
    covered = len(state.get("event_batches", []))
    incremental = (stored is not None and catalog_batches is not None and {k: state.get(k) for k in key} == key
                   and current["event_batches"][:covered] == state["event_batches"]
                   and current["validated_at"][:covered] == state["validated_at"]
                   and current["catalog_batches"][:len(state["catalog_batches"])] == state["catalog_batches"])
    if not incremental:
        frame, stats = _build(catalog, events, encoder, template, reviews_per_item, cache_path, stored, progress)
        version = save_table(path, frame, {**key, **current})
        return frame, {**stats, "table_update": "built", "items_rendered": len(frame), "table_version": version}

    old = stored[0]
    new_events = ValidatedEvents(events.lake, events.batches[covered:], 0)
    changed = set(changed_catalog_items(catalog_batches[len(state["catalog_batches"]):]))
    changed |= set(new_events.read_matching("event_type", [REVIEW_EVENT], ["item_id", "event_type"])["item_id"].astype(str))
    item_ids = catalog["item_id"].astype(str)
    changed |= set(item_ids) - set(old["item_id"])
    changed &= set(item_ids)
    if not changed and len(old) == len(catalog) and (old["item_id"].to_numpy() == item_ids.to_numpy()).all():
        version = state.get("version")
        if current != {k: state[k] for k in current} or version is None:  # (a table from before versions)
            version = save_table(path, old, {**key, **current})
        return old, {"table_update": "unchanged", "items_rendered": 0, "encoded": 0, "cached": len(old), "pruned": 0,
                     "seconds": 0.0, "items_per_s": 0.0, "model_id": key["model_id"], "dim": encoder.dim,
                     "template_version": template.version, "table_version": version}
    rows = catalog.loc[item_ids.isin(changed).to_numpy()]
    wanted = pa.array(sorted(changed), pa.string())
    reviews = events.read_where(REVIEW_COLUMNS, lambda t: pc.and_(
        pc.is_in(t["item_id"].cast(pa.string()), value_set=wanted),
        pc.equal(t["event_type"].cast(pa.string()), REVIEW_EVENT)))
    reviewed = add_reviews(rows, reviews, per_item=reviews_per_item)
    texts = template.render(reviewed)
    vectors, stats = embed_texts(texts, encoder, template.version, progress=progress)
    fresh = pd.DataFrame({"item_id": rows["item_id"].astype(str).to_numpy(dtype=object), "text": texts,
                          "embedding": pd.Series(list(vectors), dtype=object),
                          "has_reviews": (reviewed["reviews"] != "").to_numpy()})
    kept = old.loc[~old["item_id"].isin(changed).to_numpy()]
    merged = pd.concat([kept, fresh], ignore_index=True).set_index("item_id").loc[item_ids.to_numpy()]
    frame = merged.reset_index()[["item_id", "text", "embedding", "has_reviews"]]
    version = save_table(path, frame, {**key, **current})
    return frame, {**stats, "items": len(frame), "cached": len(frame) - stats["encoded"],
                   "table_update": "incremental", "items_rendered": len(fresh), "table_version": version}


def _build(catalog, events, encoder, template, reviews_per_item, cache_path, stored, progress):
    """Every item's text and vector: the cache's vectors, and the stored table's where its key
    matches, reused (so a whole build after incremental updates re-encodes nothing)."""
    from rec_models.text import REVIEW_EVENT, EmbeddingCache, add_reviews, embed_texts, text_sha256

    reviews = events.read_matching("event_type", [REVIEW_EVENT], REVIEW_COLUMNS)  # not the whole history
    reviewed = add_reviews(catalog, reviews, per_item=reviews_per_item)
    texts = template.render(reviewed)
    cache = EmbeddingCache(cache_path)
    if stored is not None and stored[1].get("model_id") == encoder.model_id \
            and stored[1].get("template_version") == template.version:
        for text, vector in zip(stored[0]["text"], stored[0]["embedding"]):
            cache.put(encoder.model_id, template.version, text_sha256(text), vector)
    vectors, stats = embed_texts(texts, encoder, template.version, cache=cache, progress=progress, prune=True)
    frame = pd.DataFrame({"item_id": catalog["item_id"].astype(str).to_numpy(dtype=object), "text": texts,
                          "embedding": pd.Series(list(vectors), dtype=object),
                          "has_reviews": (reviewed["reviews"] != "").to_numpy()})
    return frame, stats
