"""What serving loads: a self-contained model bundle and the MLflow pyfunc around it.

A *bundle* is a folder holding everything a request needs, so ``mlflow models serve -m
models:/NAME@champion`` works without access to the pipeline's storage:

- ``backbone.pt``  the trained sequential model (weights, config, item text embeddings)
- ``vocab.json``   item id ↔ row index
- ``items.parquet`` item ids and titles
- ``users.parquet`` each known user's latest items (newest last) with their event types
- ``popularity.npy`` item popularity, the fallback for users without any history

Requests read real-time history: items sent with the request (``recent_item_ids``, newest last)
are appended to the user's stored history, so fresh feedback changes the list at once.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd

from rec_models.data import ItemVocab
from rec_models.sasrec import SASRecBackbone, load_backbone, recommend, save_backbone

OUTPUT_COLUMNS = ["user_id", "rank", "item_id", "score", "title"]
DEFAULT_K = 10


def write_bundle(
    path: Path,
    backbone: SASRecBackbone,
    vocab: ItemVocab,
    titles: pd.Series,
    user_histories: dict[str, tuple[np.ndarray, np.ndarray]],
    popularity: np.ndarray,
) -> Path:
    """Write a bundle folder. ``titles`` is indexed by item id; histories hold vocab indices."""
    path.mkdir(parents=True, exist_ok=True)
    save_backbone(backbone, path / "backbone.pt")
    (path / "vocab.json").write_text(json.dumps(vocab.to_dict()))
    pd.DataFrame({"item_id": vocab.ids, "title": titles.reindex(vocab.ids).fillna("").astype(str).to_numpy()}).to_parquet(
        path / "items.parquet", index=False
    )
    max_len = backbone.config.max_len
    users = pd.DataFrame({
        "user_id": list(user_histories),
        "items": [vocab_ids[-max_len:].tolist() for vocab_ids, _ in user_histories.values()],
        "event_types": [types[-max_len:].tolist() for _, types in user_histories.values()],
    })
    users.to_parquet(path / "users.parquet", index=False)
    np.save(path / "popularity.npy", popularity.astype(np.float32))
    return path


class Recommender:
    """Loads a bundle and answers recommendation requests (no MLflow needed)."""

    def __init__(self, bundle: Path | str):
        bundle = Path(bundle)
        self.backbone = load_backbone(bundle / "backbone.pt")
        self.vocab = ItemVocab.from_dict(json.loads((bundle / "vocab.json").read_text()))
        items = pd.read_parquet(bundle / "items.parquet")
        self.titles = np.concatenate([[""], items["title"].to_numpy(dtype=object)])
        users = pd.read_parquet(bundle / "users.parquet")
        self.histories = {
            uid: (np.asarray(i, dtype=np.int64), np.asarray(t, dtype=np.int64))
            for uid, i, t in zip(users["user_id"], users["items"], users["event_types"])
        }
        self.popularity = np.load(bundle / "popularity.npy")
        self.max_len = self.backbone.config.max_len

    def recommend(self, requests: pd.DataFrame) -> pd.DataFrame:
        rows = []
        for request in requests.to_dict("records"):
            user_id = str(request.get("user_id", ""))
            k = int(request.get("k") or DEFAULT_K)
            items, types = self.histories.get(user_id, (np.empty(0, np.int64), np.empty(0, np.int64)))
            recent = request.get("recent_item_ids")
            if recent is not None and len(recent):
                fresh = self.vocab.index([str(i) for i in recent], unknown=0)
                fresh = fresh[fresh > 0]  # unknown ids are ignored
                items = np.concatenate([items, fresh])
                types = np.concatenate([types, np.full(len(fresh), 2, dtype=np.int64)])  # "click"
            items, types = items[-self.max_len:], types[-self.max_len:]
            if len(items):
                top, scores = recommend(self.backbone, [items], [types], k=k)
                top, scores = top[0], scores[0]
            else:  # cold user: most popular items
                top = np.argsort(-self.popularity[1:], kind="stable")[:k] + 1
                scores = self.popularity[top]
            for rank, (index, score) in enumerate(zip(top, scores), start=1):
                rows.append((user_id, rank, self.vocab.ids[int(index) - 1], float(score), self.titles[int(index)]))
        return pd.DataFrame(rows, columns=OUTPUT_COLUMNS)


class RecommenderPyfunc(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc: rows of (user_id, recent_item_ids?, k?) → ranked (item_id, score, title)."""

    def load_context(self, context) -> None:
        self.recommender = Recommender(context.artifacts["bundle"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        return self.recommender.recommend(model_input)


def example_request(user_ids: list[str], recent: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"user_id": user_ids, "recent_item_ids": [recent] * len(user_ids), "k": [DEFAULT_K] * len(user_ids)})
