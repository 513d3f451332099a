"""What serving loads: a self-contained model bundle and the MLflow pyfunc around it.

A *bundle* is a folder holding everything a request needs, so ``mlflow models serve -m
models:/NAME@champion`` works without access to the pipeline's storage:

- ``backbone.pt``  the trained sequential model (weights, config, item text embeddings)
- ``vocab.json``   item id ↔ row index
- ``items.parquet`` item ids and titles
- ``users.parquet`` each known user's latest items (newest last) with their event types
- ``popularity.npy`` item popularity, the fallback for users without any history
- ``identity.json`` how users are named: the public id of the pseudonym key (see below)

Users are known by their pseudonyms (``rec_models.data.privacy``: ingestion never lets a raw user id
through). A request may name a user by pseudonym, or by raw id when the server holds the
pseudonym key (``$RECSYS_PSEUDONYM_KEY``, or the key file named by
``$RECSYS_PSEUDONYM_KEY_FILE``; ``recsys`` points the latter at the lake's key file): the raw
id is then pseudonymised before the lookup. The key is never part of the bundle; a key that is
not the one the bundle's users were pseudonymised with is refused at load time.

Requests read real-time history: items sent with the request (``recent_item_ids``, newest last)
are appended to the user's stored history, so fresh feedback changes the list at once.

One request row is ``user_id`` (required), ``recent_item_ids`` (optional list), ``k``
(optional, 1..``MAX_K``, default ``DEFAULT_K``) and ``exclude`` (optional list of item ids never
to recommend). Each answer row is ``user_id, rank, item_id, score, title, explanation,
warnings``:

- users with no usable history (unknown users, or only unknown items sent) get the most
  popular items; their ``score`` is the item's training-interaction count;
- ``explanation`` is ``because you liked <title>``: the history item whose text embedding is
  nearest (cosine) the recommended item's (empty for popularity answers and items without
  text);
- ``warnings`` lists what was ignored (unknown item ids), repeated on each row of the answer.

A malformed row raises ``InvalidRequest`` naming the row and field; the pyfunc turns it into an
``MlflowException`` with ``INVALID_PARAMETER_VALUE``, which MLflow's scoring server answers with
HTTP 400 and the message (no stack trace); any other failure is logged and answered with a
plain HTTP 500. (The registered signature declares the optional fields as ``Any`` so that this
validation, not MLflow's type casting, decides: see ``rec_pipelines.registry.SIGNATURE``.)

The hot path does no per-request work that could be done once: item representations (ID
embedding + projected text) are computed at load time, histories and titles are numpy arrays,
every row of a request is scored in one forward pass, and the answer is built column-wise.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE

from rec_models.data import ItemVocab
from rec_models.data.privacy import (
    USER_PREFIX,
    existing_pseudonym_key,
    key_id,
    pseudonymize,
)
from rec_models.models import DEFAULT_EVENT_TYPE, HybridRecommender, MMRReranker
from rec_models.settings import ModelSettings

INPUT_COLUMNS = ["user_id", "recent_item_ids", "k", "exclude", "diversity", "context_text"]
OUTPUT_COLUMNS = ["user_id", "rank", "item_id", "score", "title", "explanation", "warnings"]
DEFAULT_K = 10
MAX_K = 1000
MAX_CONTEXT_CHARS = 2000
EXPLANATION_PREFIX = "because you liked "
_MAX_LISTED_IDS = 10  # unknown ids quoted in one warning
KEY_FILE_ENV = "RECSYS_PSEUDONYM_KEY_FILE"  # read through rec_models.settings.ModelSettings
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
    users = pd.DataFrame({
        "user_id": list(user_histories),
        "items": [vocab_ids.tolist() for vocab_ids, _ in user_histories.values()],
        "event_types": [types.tolist() for _, types in user_histories.values()],
    })
    users.to_parquet(path / USERS_FILE, index=False)
    if user_contexts is not None and len(user_contexts):
        pd.DataFrame({
            "user_id": user_contexts["user_id"].astype(str).to_numpy(),
            "embedding": [np.asarray(v, dtype=np.float32).tolist() for v in user_contexts["embedding"]],
        }).to_parquet(path / USER_CONTEXT_FILE, index=False)
    if text_encoder_dir is not None:
        shutil.copytree(text_encoder_dir, path / ENCODER_DIR, dirs_exist_ok=True)
    (path / IDENTITY_FILE).write_text(json.dumps({"pseudonym_key_id": pseudonym_key_id}))
    return path


def serving_pseudonym_key(env: Mapping[str, str] | None = None) -> bytes | None:
    """The pseudonym key a server may use to map raw user ids: ``$RECSYS_PSEUDONYM_KEY``, else
    the file named by ``$RECSYS_PSEUDONYM_KEY_FILE`` if it exists, else None."""
    return existing_pseudonym_key(ModelSettings.from_env(env).pseudonym_key_file, env)


class InvalidRequest(ValueError):
    """A request the recommender cannot answer; the message says which row and what to fix."""


@dataclass(frozen=True)
class ParsedRequest:
    """One validated request row."""

    user_id: str
    k: int
    recent_item_ids: list[str]
    exclude: list[str]
    diversity: float | None = None  # None: the model's default
    context_text: str = ""


def _is_missing(value: object) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def _parse_k(value: object, row: int) -> int:
    if _is_missing(value):
        return DEFAULT_K
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) or not float(value).is_integer():
        raise InvalidRequest(f"row {row}: k must be an integer between 1 and {MAX_K}, got {value!r}")
    k = int(value)
    if not 1 <= k <= MAX_K:
        raise InvalidRequest(f"row {row}: k must be an integer between 1 and {MAX_K}, got {k}")
    return k


def _parse_diversity(value: object, row: int) -> float | None:
    if _is_missing(value):
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) <= 1.0:
        raise InvalidRequest(f"row {row}: diversity must be a number between 0 (off) and 1, got {value!r:.80}")
    return float(value)


def _parse_context(value: object, row: int) -> str:
    if _is_missing(value):
        return ""
    if not isinstance(value, str):
        raise InvalidRequest(f"row {row}: context_text must be a string, got {type(value).__name__}")
    if len(value) > MAX_CONTEXT_CHARS:
        raise InvalidRequest(f"row {row}: context_text is longer than {MAX_CONTEXT_CHARS} characters")
    return value.strip()


def _parse_ids(value: object, row: int, field: str) -> list[str]:
    if _is_missing(value):
        return []
    if not isinstance(value, (list, tuple, np.ndarray)) or (isinstance(value, np.ndarray) and value.ndim != 1):
        raise InvalidRequest(f"row {row}: {field} must be a list of item ids, got {type(value).__name__} {value!r:.80}")
    ids = []
    for item in value:
        if isinstance(item, (str, numbers.Integral)) and not isinstance(item, (bool, np.bool_)):
            ids.append(str(item))
        else:
            raise InvalidRequest(f"row {row}: {field} must hold item ids (strings), got {item!r:.80}")
    return ids


def parse_requests(frame: pd.DataFrame) -> list[ParsedRequest]:
    """Validate request rows (columns of ``INPUT_COLUMNS``; all but ``user_id`` optional)."""
    if not isinstance(frame, pd.DataFrame):
        raise InvalidRequest(f"expected a table of requests with columns {INPUT_COLUMNS}, got {type(frame).__name__}")
    if "user_id" not in frame.columns:
        raise InvalidRequest(f"missing required column 'user_id' (columns are {INPUT_COLUMNS})")
    columns = {name: frame[name].tolist() for name in INPUT_COLUMNS if name in frame.columns}
    return parse_rows([{name: values[row] for name, values in columns.items()} for row in range(len(frame))])


def parse_rows(rows: Sequence[Mapping]) -> list[ParsedRequest]:
    """Validate request rows given as mappings (a missing key is a missing value)."""
    parsed = []
    for row, fields in enumerate(rows):
        if not isinstance(fields, Mapping):
            raise InvalidRequest(f"row {row}: expected an object with fields {INPUT_COLUMNS}, got {fields!r:.80}")
        user_id = fields.get("user_id")
        if _is_missing(user_id) or user_id == "":
            raise InvalidRequest(f"row {row}: user_id is required")
        if not isinstance(user_id, (str, numbers.Integral)) or isinstance(user_id, (bool, np.bool_)):
            raise InvalidRequest(f"row {row}: user_id must be a string, got {type(user_id).__name__} {user_id!r:.80}")
        parsed.append(ParsedRequest(
            user_id=str(user_id),
            k=_parse_k(fields.get("k"), row),
            recent_item_ids=_parse_ids(fields.get("recent_item_ids"), row, "recent_item_ids"),
            exclude=_parse_ids(fields.get("exclude"), row, "exclude"),
            diversity=_parse_diversity(fields.get("diversity"), row),
            context_text=_parse_context(fields.get("context_text"), row),
        ))
    return parsed


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
        self.model.backbone.freeze_item_table()  # item representations computed once, not per request
        self.backbone = self.model.backbone
        self.vocab = ItemVocab.from_dict(json.loads((bundle / VOCAB_FILE).read_text()))
        self.item_ids = np.array([""] + self.vocab.ids, dtype=object)  # row 0 = padding
        items = pd.read_parquet(bundle / ITEMS_FILE)
        self.titles = np.concatenate([[""], items["title"].to_numpy(dtype=object)])
        users = pd.read_parquet(bundle / USERS_FILE)
        self.histories = {
            uid: (np.asarray(i, dtype=np.int64), np.asarray(t, dtype=np.int64))
            for uid, i, t in zip(users["user_id"], users["items"], users["event_types"])
        }
        self.user_contexts: dict[str, np.ndarray] = {}
        if (bundle / USER_CONTEXT_FILE).exists():
            contexts = pd.read_parquet(bundle / USER_CONTEXT_FILE)
            self.user_contexts = {u: np.asarray(v, dtype=np.float32) for u, v in zip(contexts["user_id"], contexts["embedding"])}
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
            listed = ", ".join(unknown[:_MAX_LISTED_IDS]) + (f" (and {len(unknown) - _MAX_LISTED_IDS} more)"
                                                             if len(unknown) > _MAX_LISTED_IDS else "")
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


class RecommenderPyfunc(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc: rows of (user_id, recent_item_ids?, k?, exclude?) → ranked
    (item_id, score, title, explanation, warnings)."""

    def load_context(self, context) -> None:
        self.recommender = Recommender(context.artifacts["bundle"], serving_pseudonym_key())

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        try:
            return self.recommender.recommend(model_input)
        except InvalidRequest as error:  # the client's mistake: HTTP 400 with the message
            raise MlflowException(f"invalid request: {error}", error_code=INVALID_PARAMETER_VALUE) from None
        except Exception:
            # The scoring server would answer any other exception with a stack trace; log it
            # here and answer a plain HTTP 500 instead.
            logger.exception("recommendation failed")
            raise MlflowException("internal error while recommending (see the server log)",
                                  error_code=INTERNAL_ERROR) from None


def example_request(user_ids: list[str], recent: list[str]) -> pd.DataFrame:
    return pd.DataFrame({
        "user_id": user_ids,
        "recent_item_ids": [recent] * len(user_ids),
        "k": [DEFAULT_K] * len(user_ids),
        "exclude": [recent[:1]] * len(user_ids),
        "diversity": [0.0] * len(user_ids),
        "context_text": [""] * len(user_ids),
    })
