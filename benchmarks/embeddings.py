"""Item text embedding speed and fidelity: ``rec_models.text`` vs sentence-transformers.

Data: the MovieLens latest-small catalog (9,742 movies) read by ``rec_models.data.movielens`` from
``../shared/data/ml-latest-small`` beside the checkout, one text per movie from
``MOVIELENS_TEMPLATE`` ("title | genres | tags", tags aggregated per movie). The script exits
cleanly when the data is absent.

Contenders, same texts, same process, same machine, same model (all-MiniLM-L6-v2):

* baseline: ``SentenceTransformer(default_text_model_path()).encode(texts,
  normalize_embeddings=True)`` with its defaults: float32, batch_size 32, max_seq_length 256
  (the model's sentence-transformers config), texts sorted by character length;
* ours, cold: ``embed_catalog`` with an empty ``EmbeddingCache`` and a default
  ``TextEncoder`` (bf16 weights when the CPU has native bf16, batches of at most 256 texts and
  4,096 padded tokens sorted by token count, no attention mask for unpadded batches,
  max_length = the model's 256, the same as the baseline), cache file writes included;
* ours, warm: ``embed_catalog`` of the whole catalog again with a fresh encoder and a fresh
  ``EmbeddingCache`` read from the file: every vector comes from the cache (model never loads).

Both models load and run one small batch before timing starts, so load time is in neither
figure. The machine may be shared with other jobs, so the catalog is split into chunks and
each chunk is encoded by both contenders back to back (alternating who goes first): a load
change hits both alike, and the reported ``speedup`` is the ratio of their total times.
Fidelity: cosine of our vector to the baseline's float32 vector, per movie.

Usage (from the repository root)::

    .venv/bin/python benchmarks/embeddings.py [--limit N] [--chunks K]

The last line of output is one JSON object with at least ``items_per_s_cold``,
``items_per_s_warm``, ``baseline_items_per_s``, ``speedup`` and ``mean_cosine``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data" / "ml-latest-small"


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DATA, help="MovieLens folder (default: %(default)s)")
    parser.add_argument("--limit", type=int, default=0, help="only the first N movies (0: all)")
    parser.add_argument("--chunks", type=int, default=10, help="interleaving chunks (default: %(default)s)")
    args = parser.parse_args()
    if not (args.data / "movies.csv").exists():
        print(f"MovieLens data not found in {args.data}; nothing to benchmark")
        return

    from sentence_transformers import SentenceTransformer

    from rec_models.data.movielens import MOVIELENS_TEMPLATE, load_movielens
    from rec_models.text import (
        EmbeddingCache,
        TextEncoder,
        as_matrix,
        cpu_supports_fast_bf16,
        default_text_model_path,
        embed_catalog,
    )

    catalog = load_movielens(args.data).catalog
    if args.limit:
        catalog = catalog.head(args.limit)
    catalog = catalog.reset_index(drop=True)
    texts = MOVIELENS_TEMPLATE.render(catalog)
    n = len(texts)

    baseline = SentenceTransformer(default_text_model_path(), device="cpu")
    tokens = np.array([len(ids) for ids in baseline.tokenizer(texts, truncation=False)["input_ids"]])
    encoder = TextEncoder()
    print(f"{n} movies ({len(set(texts))} distinct texts), tokens per text: mean {tokens.mean():.1f}, "
          f"max {tokens.max()}, longer than 128: {(tokens > 128).sum()}, longer than 256: {(tokens > 256).sum()}")
    print(f"baseline: sentence-transformers, float32, batch_size 32, max_seq_length {baseline.max_seq_length}")
    print(f"ours: {encoder.describe()}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"load average {load_average()}")

    baseline.encode(texts[:16], batch_size=32)  # warm-up: weights loaded, first batch run
    encoder.encode(texts[:16])

    reference = np.zeros((n, encoder.dim), dtype=np.float32)
    ours = np.zeros_like(reference)
    seconds = {"baseline": 0.0, "ours": 0.0}
    load_before = load_average()
    with tempfile.TemporaryDirectory() as folder:
        cache_path = Path(folder) / "embedding_cache.parquet"
        cache = EmbeddingCache(cache_path)

        def run_baseline(rows: np.ndarray) -> None:
            started = time.perf_counter()
            reference[rows] = baseline.encode([texts[i] for i in rows], batch_size=32, normalize_embeddings=True)
            seconds["baseline"] += time.perf_counter() - started

        def run_ours(rows: np.ndarray) -> None:
            started = time.perf_counter()
            frame, _ = embed_catalog(catalog.iloc[rows], encoder, MOVIELENS_TEMPLATE, cache=cache)
            ours[rows] = as_matrix(frame)
            seconds["ours"] += time.perf_counter() - started

        done = 0
        for chunk, rows in enumerate(np.array_split(np.arange(n), args.chunks)):
            for contender in (run_baseline, run_ours) if chunk % 2 == 0 else (run_ours, run_baseline):
                contender(rows)
            done += len(rows)
            print(f"chunk {chunk + 1}/{args.chunks}: {done} movies, baseline {done / seconds['baseline']:.1f}/s, "
                  f"ours {done / seconds['ours']:.1f}/s, ratio {seconds['baseline'] / seconds['ours']:.2f}, "
                  f"load average {load_average()}", flush=True)

        warm_encoder = TextEncoder()
        started = time.perf_counter()
        warm_cache = EmbeddingCache(cache_path)
        warm_frame, warm_stats = embed_catalog(catalog, warm_encoder, MOVIELENS_TEMPLATE, cache=warm_cache)
        warm_seconds = time.perf_counter() - started
    if warm_stats["encoded"] != 0 or warm_encoder.is_loaded:
        raise RuntimeError(f"warm run encoded {warm_stats['encoded']} texts: the cache did not serve them")
    if not np.array_equal(as_matrix(warm_frame), ours):
        raise RuntimeError("warm vectors differ from the cold ones")

    cosine = np.sum(ours * reference, axis=1)
    result = {
        "items": n,
        "distinct_texts": len(set(texts)),
        "items_per_s_cold": round(n / seconds["ours"], 1),
        "items_per_s_warm": round(n / warm_seconds, 1),
        "baseline_items_per_s": round(n / seconds["baseline"], 1),
        "speedup": round(seconds["baseline"] / seconds["ours"], 2),
        "mean_cosine": round(float(cosine.mean()), 6),
        "min_cosine": round(float(cosine.min()), 6),
        "max_tokens": int(tokens.max()),
        "texts_over_128_tokens": int((tokens > 128).sum()),
        "encoder": encoder.describe(),
        "baseline": {"batch_size": 32, "max_seq_length": baseline.max_seq_length, "dtype": "float32"},
        "chunks": args.chunks,
        "torch_threads": torch.get_num_threads(),
        "cpu": cpu_name(),
        "cpu_native_bf16": cpu_supports_fast_bf16(),
        "load_average_before": load_before,
        "load_average_after": load_average(),
    }
    print(f"cold {result['items_per_s_cold']}/s vs baseline {result['baseline_items_per_s']}/s: "
          f"{result['speedup']}x; warm {result['items_per_s_warm']}/s; cosine mean {result['mean_cosine']}, "
          f"min {result['min_cosine']}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
