"""The served model: a self-contained bundle folder (``write_bundle``) and the
``Recommender`` that answers request rows from it in one forward pass (docs/serving.md)."""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from rec_models.data import ItemVocab, list_array, narrowest, split_lists
from rec_models.data.privacy import (
    PSEUDONYM_PATTERN,
    USER_PREFIX,
    existing_pseudonym_key,
    key_id,
    pseudonymize,
)
from rec_models.models import DEFAULT_EVENT_TYPE, HybridRecommender, MMRReranker
from rec_models.serving.requests import (
    EXPLANATION_PREFIX,
    MAX_LISTED_IDS,
    OUTPUT_COLUMNS,
    ParsedRequest,
    parse_requests,
)
from rec_models.settings import ModelSettings

USERS_FILE, ITEMS_FILE, VOCAB_FILE = "users.parquet", "items.parquet", "vocab.json"
USER_CONTEXT_FILE, ENCODER_DIR, IDENTITY_FILE = "user_context.parquet", "text_encoder", "identity.json"

logger = logging.getLogger(__name__)


def write_bundle(
    path: Path,
    model: HybridRecommender,
    vocab: ItemVocab,
    titles: pd.Series,
    user_histories: dict[str, tuple[np.ndarray, np.ndarray]],
    pseudonym_key_id: str | None = None,
    user_contexts: pd.DataFrame | None = None,
    text_encoder_dir: Path | str | None = None,
) -> Path:
    """Write a bundle folder. ``titles`` is indexed by item id; histories hold vocab indices
    (whole histories: every item a user has is masked from their answers);
    ``pseudonym_key_id`` (``privacy.key_id``) names the key the user ids were pseudonymised
    with. ``user_contexts`` (``user_id``, ``embedding``) are the text vectors of users known by
    a few events only; ``text_encoder_dir`` (opt-in) copies the text encoder into the bundle so
    that requests may carry ``context_text``."""
    path.mkdir(parents=True, exist_ok=True)
    model.save(path)
    (path / VOCAB_FILE).write_text(json.dumps(vocab.to_dict()))
    pd.DataFrame({"item_id": vocab.ids, "title": titles.reindex(vocab.ids).fillna("").astype(str).to_numpy()}).to_parquet(
        path / ITEMS_FILE, index=False
    )
    histories = list(user_histories.values())
    lengths = [len(items) for items, _ in histories]
    pq.write_table(pa.table({  # narrow types (readers widen them; older bundles hold int64)
        "user_id": pa.array(list(user_histories), pa.string()),
        "items": list_array(narrowest(_flat([items for items, _ in histories], np.int64)), lengths),
        "event_types": list_array(narrowest(_flat([types for _, types in histories], np.int64)), lengths),
    }), path / USERS_FILE)
    if user_contexts is not None and len(user_contexts):
        vectors = [np.asarray(v, dtype=np.float32) for v in user_contexts["embedding"]]
        pq.write_table(pa.table({
            "user_id": pa.array(user_contexts["user_id"].astype(str).to_numpy(), pa.string()),
            "embedding": list_array(_flat(vectors, np.float32), [len(v) for v in vectors]),
        }), path / USER_CONTEXT_FILE)
    if text_encoder_dir is not None:
        shutil.copytree(text_encoder_dir, path / ENCODER_DIR, dirs_exist_ok=True)
    (path / IDENTITY_FILE).write_text(json.dumps({"pseudonym_key_id": pseudonym_key_id}))
    return path


class StoredHistories(Mapping):
    """The bundle's user histories, read-only: ``user id -> (items, event types)`` as int64
    arrays, kept as two flat narrow arrays and the offsets of each user (at 250k users a dict
    of per-user arrays took 3x the memory and 2x the load time, in every serving worker)."""

    def __init__(self, user_ids: list[str], items: np.ndarray, event_types: np.ndarray, offsets: np.ndarray):
        self._rows = {user: row for row, user in enumerate(user_ids)}
        self._items, self._types, self._offsets = narrowest(items), narrowest(event_types), offsets

    @classmethod
    def read(cls, path: Path) -> StoredHistories:
        users = pq.read_table(path)
        if not users.num_rows:  # (an empty table of an older bundle has no list type)
            return cls([], np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(1, np.int64))
        items, types = (users.column(name).combine_chunks() for name in ("items", "event_types"))
        offsets = items.offsets.to_numpy().astype(np.int64)
        return cls(users.column("user_id").to_pylist(), narrowest(items.flatten().to_numpy()),
                   narrowest(types.flatten().to_numpy()), offsets - offsets[0])

    def __getitem__(self, user_id: str) -> tuple[np.ndarray, np.ndarray]:
        row = self._rows[user_id]
        start, end = self._offsets[row], self._offsets[row + 1]
        return self._items[start:end].astype(np.int64), self._types[start:end].astype(np.int64)

    def __contains__(self, user_id: object) -> bool:
        return user_id in self._rows

    def __iter__(self) -> Iterator[str]:
        return iter(self._rows)

    def __len__(self) -> int:
        return len(self._rows)


def _flat(arrays: list[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate(arrays).astype(dtype, copy=False) if arrays else np.zeros(0, dtype=dtype)


def serving_pseudonym_key(env: Mapping[str, str] | None = None) -> bytes | None:
    """The pseudonym key a server may use to map raw user ids: ``$RECSYS_PSEUDONYM_KEY``, else
    the file named by ``$RECSYS_PSEUDONYM_KEY_FILE`` if it exists, else None."""
    return existing_pseudonym_key(ModelSettings.from_env(env).pseudonym_key_file, env)


class Recommender:
    """Loads a bundle and answers recommendation requests (no MLflow needed). Thread-safe:
    nothing is mutated after loading.

    ``pseudonym_key`` lets requests name users by raw id (see the module docstring)."""

    def __init__(self, bundle: Path | str, pseudonym_key: bytes | str | None = None):
        bundle = Path(bundle)
        identity_file = bundle / IDENTITY_FILE
        identity = json.loads(identity_file.read_text()) if identity_file.exists() else {}
        expected = identity.get("pseudonym_key_id")
        if pseudonym_key is not None and expected and key_id(pseudonym_key) != expected:
            raise ValueError(f"the pseudonym key given (id {key_id(pseudonym_key)}) is not the one this model's users "
                             f"were pseudonymised with (id {expected}): raw user ids would match nobody")
        self.pseudonym_key = pseudonym_key
        self.model = HybridRecommender.load(bundle)
        self.model.freeze()  # item representations computed once, not per request
        self.backbone = self.model.backbone
        self.vocab = ItemVocab.from_dict(json.loads((bundle / VOCAB_FILE).read_text()))
        self.item_ids = np.array([""] + self.vocab.ids, dtype=object)  # row 0 = padding
        items = pd.read_parquet(bundle / ITEMS_FILE)
        self.titles = np.concatenate([[""], items["title"].to_numpy(dtype=object)])
        self.histories = StoredHistories.read(bundle / USERS_FILE)
        self.user_contexts: dict[str, np.ndarray] = {}
        if (bundle / USER_CONTEXT_FILE).exists():
            contexts = pq.read_table(bundle / USER_CONTEXT_FILE)
            vectors = split_lists(contexts.column("embedding"), dtype=np.float32) if contexts.num_rows else []
            self.user_contexts = dict(zip(contexts.column("user_id").to_pylist(), vectors))
            del contexts
        pa.default_memory_pool().release_unused()  # Arrow's pool keeps what reading took (~0.4 GB at 250k users)
        self.encoder = None
        if (bundle / ENCODER_DIR).is_dir():
            from rec_models.text import (
                TextEncoder,  # transformers: only for bundles that carry an encoder
            )

            self.encoder = TextEncoder(str(bundle / ENCODER_DIR))
        self.n_items = len(self.vocab)
        text = self.model.text_embeddings
        # Explanations compare items by text; a model without a text side uses its item table.
        side = text if text is not None else self.backbone.item_representations().detach()
        self.similarity = F.normalize(side.float(), dim=1).numpy()
        self.has_vector = np.abs(self.similarity).sum(axis=1) > 0  # False for padding and textless items

    def _user(self, user_id: str, table: dict):
        found = table.get(user_id)
        if found is None and self.pseudonym_key is not None:
            found = table.get(pseudonymize([user_id], self.pseudonym_key, USER_PREFIX)[0])
        return found

    def pseudonym(self, user_id: str) -> str | None:
        """The pseudonym a request's user is known by: the id itself when it is one, the keyed
        hash of a raw id when this recommender has the key, else None (never the raw id)."""
        if re.fullmatch(PSEUDONYM_PATTERN, user_id):
            return user_id
        if self.pseudonym_key is not None:
            return pseudonymize([user_id], self.pseudonym_key, USER_PREFIX)[0]
        return None

    def history(self, user_id: str) -> tuple[np.ndarray, np.ndarray]:
        """The stored (items, event types) of a user named by pseudonym or, with the key, by
        raw id; empty arrays for a user the model does not know."""
        found = self._user(user_id, self.histories)
        return found if found is not None else (np.empty(0, np.int64), np.empty(0, np.int64))

    def _known(self, ids: list[str], field: str, warnings: list[str]) -> np.ndarray:
        """Vocab indices of the known ``ids``; the unknown ones are reported in ``warnings``."""
        indices = self.vocab.index(ids, unknown=0)
        if (indices == 0).any():
            unknown = [item_id for item_id, index in zip(ids, indices) if index == 0]
            listed = ", ".join(unknown[:MAX_LISTED_IDS]) + (f" (and {len(unknown) - MAX_LISTED_IDS} more)"
                                                             if len(unknown) > MAX_LISTED_IDS else "")
            warnings.append(f"ignored {len(unknown)} unknown item id(s) in {field}: {listed}")
        return indices[indices > 0]

    def _select(self, scores: torch.Tensor, masked: list[np.ndarray], ks: list[int],
                diversities: list[float], stable: bool = False) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per row: the top ``k`` (item indices, scores) after masking padding and ``masked``
        items, MMR-re-ranked where the row's diversity is above 0 (as ``HybridRecommender.ranker``)."""
        scores = scores.clone()
        scores[:, 0] = -math.inf
        for row, items in enumerate(masked):
            scores[row, torch.from_numpy(items)] = -math.inf
        k_max = min(max(ks), self.n_items)
        if stable:  # equal scores (popularity counts) in catalog order, deterministically
            indices = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k_max].numpy()
        else:
            indices = scores.topk(k_max, dim=1).indices.numpy()
        chosen = {row: indices[row] for row in range(len(ks))}
        for diversity in sorted({d for d in diversities if d > 0}):
            rows = [r for r, d in enumerate(diversities) if d == diversity]
            if self.model.text_embeddings is None:
                continue
            candidates = max(self.model.config.mmr_candidates, k_max)
            picks = MMRReranker(self.model.text_embeddings, diversity, k_max, candidates).rerank(
                scores[rows], [np.empty(0, np.int64)] * len(rows))  # already masked above
            for i, row in enumerate(rows):
                chosen[row] = picks[i].numpy()
        out = []
        for row, k in enumerate(ks):
            index = chosen[row][:k]
            index = index[index >= 0]
            value = scores[row, torch.from_numpy(index)].numpy()
            keep = np.isfinite(value)
            out.append((index[keep], value[keep]))
        return out

    def _explain(self, recommended: np.ndarray, history: np.ndarray) -> list[str]:
        """Per recommended item: ``because you liked <title>`` of the history item nearest by
        text embedding ("" for an item without text, or when no history item has text)."""
        history = np.unique(history)
        history = history[self.has_vector[history]]
        if not len(history):
            return [""] * len(recommended)
        similarity = self.similarity[recommended] @ self.similarity[history].T  # [k, H]
        nearest = history[similarity.argmax(axis=1)]
        return [EXPLANATION_PREFIX + (self.titles[j] or self.item_ids[j]) if has else ""
                for j, has in zip(nearest, self.has_vector[recommended])]

    def recommend(self, requests: pd.DataFrame) -> pd.DataFrame:
        """Answer every request row; see the module docstring for the columns."""
        columns, _ = self.answer(parse_requests(requests))
        return pd.DataFrame(columns, columns=OUTPUT_COLUMNS)

    def _context_vectors(self, parsed: list[ParsedRequest], rows: list[int], notes: list[list[str]]) -> dict:
        """Text vectors of users without history: their ``context_text`` (with a bundled
        encoder), else the stored user-context embedding; rows without either get none."""
        vectors: dict[int, np.ndarray] = {}
        texts = [r for r in rows if parsed[r].context_text]
        if texts and self.encoder is None:
            for r in texts:
                notes[r].append("context_text ignored: this model was logged without a text encoder")
        elif texts:
            for r, vector in zip(texts, self.encoder.encode([parsed[r].context_text for r in texts])):
                vectors[r] = vector
        for r in rows:
            if r not in vectors:
                stored = self._user(parsed[r].user_id, self.user_contexts)
                if stored is not None:
                    vectors[r] = stored
        return vectors

    def answer(self, parsed: list[ParsedRequest]) -> tuple[dict[str, list], list[int]]:
        """Answer validated requests, all users with history in one forward pass: the answer's
        columns (rows of all requests, in request order) and how many rows each request got."""
        histories, types, excluded, warnings = [], [], [], []
        for request in parsed:
            notes: list[str] = []
            items, kinds = self.history(request.user_id)
            if request.recent_item_ids:
                fresh = self._known(request.recent_item_ids, "recent_item_ids", notes)
                items = np.concatenate([items, fresh])
                kinds = np.concatenate([kinds, np.full(len(fresh), DEFAULT_EVENT_TYPE, dtype=np.int64)])
            histories.append(items)
            types.append(kinds)
            excluded.append(self._known(request.exclude, "exclude", notes) if request.exclude else np.empty(0, np.int64))
            warnings.append(notes)
        default = self.model.config.diversity
        diversity = [default if r.diversity is None else r.diversity for r in parsed]

        answers: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        warm = [row for row, history in enumerate(histories) if len(history)]
        if warm:
            with torch.inference_mode():
                scores = self.model.score([histories[r] for r in warm], [types[r] for r in warm])
            selected = self._select(scores, [np.concatenate([histories[r], excluded[r]]) for r in warm],
                                    [parsed[r].k for r in warm], [diversity[r] for r in warm])
            answers.update(zip(warm, selected))
        cold = [row for row in range(len(parsed)) if row not in answers]
        if cold:  # no history: text context blended with popularity, else popularity
            vectors = self._context_vectors(parsed, cold, warnings)
            for with_text in (True, False):
                rows = [r for r in cold if (r in vectors) == with_text]
                if not rows:
                    continue
                context = np.stack([vectors[r] for r in rows]) if with_text else None
                scores = self.model.cold_scores(context, len(rows))
                selected = self._select(scores, [excluded[r] for r in rows], [parsed[r].k for r in rows],
                                        [diversity[r] if with_text else 0.0 for r in rows], stable=not with_text)
                answers.update(zip(rows, selected))

        columns: dict[str, list] = {name: [] for name in OUTPUT_COLUMNS}
        counts = []
        for row, request in enumerate(parsed):
            index, score = answers[row]
            explanation = self._explain(index, histories[row]) if len(histories[row]) and len(index) else [""] * len(index)
            n = len(index)
            columns["user_id"] += [request.user_id] * n
            columns["rank"] += range(1, n + 1)
            columns["item_id"] += self.item_ids[index].tolist()
            columns["score"] += score.astype(np.float64).tolist()
            columns["title"] += self.titles[index].tolist()
            columns["explanation"] += explanation
            columns["warnings"] += [list(warnings[row]) for _ in range(n)]
            counts.append(n)
        return columns, counts
