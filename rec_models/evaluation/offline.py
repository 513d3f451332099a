"""``recsys evaluate``: every model on a MovieLens-layout folder under the offline protocol,
cold-start and cold-user slices included, as a table and JSON (docs/evaluation.md)."""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from rec_models.data import ItemVocab, LeaveLastOutSplit, leave_last_out
from rec_models.data.movielens import MOVIELENS_TEMPLATE, MovieLensData, load_movielens
from rec_models.evaluation import (
    PopularityRecommender,
    cold_start_split,
    cold_start_users,
    evaluate_ranking,
    evaluate_split,
    item_popularity,
    protocol_sequences,
    select_cold_items,
)
from rec_models.models import (
    DEFAULT_EASE_LAMBDAS,
    HybridRecommender,
    RecommenderConfig,
    event_features,
    train_recommender,
    tune_content,
    tune_ease,
)
from rec_models.settings import ModelSettings
from rec_models.text import (
    USER_CONTEXT_TEMPLATE,
    EmbeddingCache,
    TextEncoder,
    as_matrix,
    embed_catalog,
)

K = 10
MODEL_ORDER = ("popularity", "ease", "content", "sasrec", "main", "main+mmr")
TABLE_COLUMNS = ("hr@10", "ndcg@10", "coverage@10", "ild@10", "novelty@10", "cold_ndcg@10", "train_s", "eval_s")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="recsys evaluate",
        description="Compare every model on a MovieLens-layout folder under the offline protocol.",
    )
    parser.add_argument("--data", required=True, type=Path, help="MovieLens folder (any layout)")
    parser.add_argument("--out", required=True, type=Path, help="JSON file to write")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="text-embedding cache folder (default: beside --out)")
    parser.add_argument("--text-model", default=ModelSettings().text_model or None,
                        help="local transformers folder (default: $RECSYS_TEXT_MODEL, else the bundled MiniLM)")
    parser.add_argument("--checkpoint", type=Path, default=None, help="save the main model (a folder: HybridRecommender.save) here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--cold-fraction", type=float, default=0.1)
    parser.add_argument("--cold-user-items", type=int, default=3,
                        help="items a cold user is known by in the cold-user slice")
    parser.add_argument("--mmr-diversity", type=float, default=0.3)
    parser.add_argument("--ease-lambdas", type=float, nargs="+", default=None)
    # The recommender ("main"): defaults come from RecommenderConfig, the pipeline's defaults
    defaults = RecommenderConfig()
    parser.add_argument("--d-model", type=int, default=defaults.d_model)
    parser.add_argument("--n-layers", type=int, default=defaults.n_layers)
    parser.add_argument("--max-len", type=int, default=defaults.max_len)
    parser.add_argument("--dropout", type=float, default=defaults.dropout)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--loss", default=defaults.loss, choices=("ce", "sampled"))
    parser.add_argument("--n-negatives", type=int, default=defaults.n_negatives, help="negatives of the sampled softmax")
    parser.add_argument("--id-init", default=defaults.id_init, choices=("svd", "default"),
                        help="ID embeddings from co-occurrence SVD factors, or the default init")
    parser.add_argument("--id-dropout", type=float, default=defaults.id_dropout,
                        help="share of items trained from text alone each step (SASRec's own cold start)")
    parser.add_argument("--freeze-ids", action="store_true",
                        help="keep the ID embeddings at their initial (SVD) values; train the rest")
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    parser.add_argument("--max-epochs", type=int, default=defaults.max_epochs)
    parser.add_argument("--patience", type=int, default=defaults.patience, help="epochs without a better val NDCG@10")
    parser.add_argument("--max-time", type=float, default=defaults.max_time_s,
                        help="safety net, seconds per training (a run that hits it says so)")
    parser.add_argument("--no-rating-features", action="store_true", help="event type only as input")
    parser.add_argument("--no-item-bias", action="store_true", help="no learned per-item score offset")
    parser.add_argument("--skip-cold", action="store_true", help="do not run the cold-start slice")
    return parser.parse_args(argv)


@dataclass
class Prepared:
    """The dataset in vocab indices: split, item text matrix and dataset statistics."""

    vocab: ItemVocab
    split: LeaveLastOutSplit
    text: torch.Tensor  # [n_items + 1, dim], row 0 = padding
    stats: dict

    @property
    def n_items(self) -> int:
        return len(self.vocab)


def prepare(data: MovieLensData, encoder: TextEncoder, cache_dir: Path, rating_features: bool) -> Prepared:
    """Protocol split (every rating row kept) and the catalog's text embeddings."""
    vocab = ItemVocab(data.catalog["item_id"])
    seqs = protocol_sequences(data.events, vocab, event_features if rating_features else None)
    split = leave_last_out(seqs)
    frame, embed_stats = embed_catalog(
        data.catalog, encoder, MOVIELENS_TEMPLATE, EmbeddingCache(cache_dir / "item_embeddings.parquet")
    )
    text = np.zeros((len(vocab) + 1, embed_stats["dim"]), dtype=np.float32)
    text[vocab.index(frame["item_id"])] = as_matrix(frame)
    stats = {
        **data.stats(),
        "protocol_users": len(split.train),
        "protocol_items": len(vocab),
        "protocol_interactions": int(sum(len(s) for s in seqs.items)),
        "text_model": embed_stats["model_id"],
        "text_encoded": embed_stats["encoded"],
        "text_cached": embed_stats["cached"],
        "text_seconds": round(embed_stats["seconds"], 2),
    }
    return Prepared(vocab, split, torch.from_numpy(text), stats)


@dataclass
class Fitted:
    """Score functions of every model fitted on one split, with their fit times."""

    score_fns: dict[str, Callable]
    train_s: dict[str, float]
    details: dict[str, dict]
    model: HybridRecommender  # "main"


def fit_all(split: LeaveLastOutSplit, prep: Prepared, args: argparse.Namespace, label: str) -> Fitted:
    """Fit every model on ``split`` (tuning on its validation targets)."""
    n = prep.n_items
    fns: dict[str, Callable] = {}
    train_s: dict[str, float] = {}
    details: dict[str, dict] = {}

    start = time.perf_counter()
    popularity = PopularityRecommender().fit(split.train, n)
    fns["popularity"], train_s["popularity"] = popularity.score, time.perf_counter() - start

    start = time.perf_counter()
    ease, ease_val = tune_ease(split, n, args.ease_lambdas or DEFAULT_EASE_LAMBDAS)
    fns["ease"], train_s["ease"] = ease.score, time.perf_counter() - start
    details["ease"] = {"lambda": ease.lam, "val_ndcg@10": _round_keys(ease_val)}

    start = time.perf_counter()
    content, content_val = tune_content(split, prep.text)
    fns["content"], train_s["content"] = content.score, time.perf_counter() - start
    details["content"] = {"window": content.window, "val_ndcg@10": _round_keys(content_val)}

    config = recommender_config(args)
    start = time.perf_counter()
    model, history = train_recommender(split, prep.text, config)
    train_s["sasrec"] = train_s["main"] = time.perf_counter() - start
    fns["sasrec"] = model.sasrec_score  # the SASRec part: its networks' average
    fns["main"] = model.score
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"[{label}] SASRec x{len(history['networks'])}: epochs {[n['epochs'] for n in history['networks']]} "
        f"(stopped by {[n['stopped_by'] for n in history['networks']]}), "
        f"val NDCG@10 {history['best_val_ndcg@10']:.4f} "
        f"(hybrid {history['best_val_hybrid_ndcg@10']:.4f} at alpha {model.alpha}, EASE weight {model.ease_weight}), "
        f"{history['sequences_per_s']:.0f} sequences/s "
        f"({history['n_windows']} windows/epoch), {train_s['sasrec']:.0f}s, peak RSS {peak_mb:.0f} MB",
        flush=True,
    )
    details["sasrec"] = {
        "config": config.to_dict(),
        "networks": history["networks"],
        "stopped_by": history["stopped_by"],
        "best_val_ndcg@10": history["best_val_ndcg@10"],
        "sequences_per_s": history["sequences_per_s"],
        "peak_rss_mb": peak_mb,
    }
    # content alpha and EASE weight were chosen on the validation users (see train_recommender).
    details["main"] = {"alpha": model.alpha, "ease_weight": model.ease_weight, "content_window": model.content_window,
                       "val_ndcg@10": model.details["blend_val_ndcg@10"]}

    fns["main+mmr"] = model.ranker(args.mmr_diversity, k=K)
    train_s["main+mmr"] = train_s["main"]
    details["main+mmr"] = {"diversity": args.mmr_diversity}
    return Fitted(fns, train_s, details, model)


def recommender_config(args: argparse.Namespace) -> RecommenderConfig:
    """The ``RecommenderConfig`` the command line describes (its defaults: the pipeline's)."""
    return RecommenderConfig(
        d_model=args.d_model, n_layers=args.n_layers, max_len=args.max_len, dropout=args.dropout, lr=args.lr,
        batch_size=args.batch_size, loss=args.loss, n_negatives=args.n_negatives, max_epochs=args.max_epochs,
        patience=args.patience, seed=args.seed, rating_features=not args.no_rating_features,
        item_bias=not args.no_item_bias, id_init=args.id_init, id_dropout=args.id_dropout,
        freeze_ids=args.freeze_ids, weight_decay=args.weight_decay, max_time_s=args.max_time,
    )


def _round_keys(results: dict) -> dict:
    return {str(key): round(float(value), 5) for key, value in results.items()}


def run(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    cache_dir = args.cache_dir or args.out.resolve().parent / "cache"
    data = load_movielens(args.data)
    encoder = TextEncoder(args.text_model)
    prep = prepare(data, encoder, cache_dir, rating_features=not args.no_rating_features)
    print(
        f"{data.layout} layout: {prep.stats['protocol_users']} users, {prep.n_items} items, "
        f"{prep.stats['protocol_interactions']} interactions; text: {prep.stats['text_encoded']} encoded, "
        f"{prep.stats['text_cached']} cached ({prep.stats['text_seconds']:.0f}s)",
        flush=True,
    )
    split = prep.split
    popularity = item_popularity(split.train, prep.n_items)
    fitted = fit_all(split, prep, args, "all items")

    models: dict[str, dict] = {}
    for name in MODEL_ORDER:
        start = time.perf_counter()
        result = evaluate_split(
            fitted.score_fns[name], split, prep.n_items, "test", k=K,
            item_embeddings=prep.text, item_popularity=popularity,
        )
        models[name] = {
            f"hr@{K}": result[f"hr@{K}"],
            f"ndcg@{K}": result[f"ndcg@{K}"],
            f"coverage@{K}": result[f"coverage@{K}"],
            f"ild@{K}": result[f"ild@{K}"],
            f"novelty@{K}": result[f"novelty@{K}"],
            "train_s": fitted.train_s[name],
            "eval_s": time.perf_counter() - start,
        }
    if args.checkpoint is not None:
        args.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        fitted.model.save(args.checkpoint)

    cold_users_slice = cold_user_slice(fitted.model, prep, data, encoder, args.cold_user_items)
    print(f"cold users (each known by their {args.cold_user_items} latest items only): "
          + ", ".join(f"{name} {value:.4f}" for name, value in cold_users_slice.items()), flush=True)

    cold_stats: dict = {}
    cold_details: dict = {}
    if not args.skip_cold:
        cold_items = select_cold_items(split, args.cold_fraction, args.seed)
        users = cold_start_users(split, cold_items)
        cold = cold_start_split(split, cold_items)
        cold_stats = {"cold_items": len(cold_items), "cold_users": len(users)}
        print(f"cold-start slice: {len(cold_items)} items, {len(users)} users", flush=True)
        cold_fitted = fit_all(cold, prep, args, "cold-start split")
        for name in MODEL_ORDER:
            start = time.perf_counter()
            result = evaluate_split(cold_fitted.score_fns[name], cold, prep.n_items, "test", users=users, k=K)
            models[name][f"cold_hr@{K}"] = result[f"hr@{K}"]
            models[name][f"cold_ndcg@{K}"] = result[f"ndcg@{K}"]
            models[name]["cold_train_s"] = cold_fitted.train_s[name]
            models[name]["cold_eval_s"] = time.perf_counter() - start
        cold_details = cold_fitted.details

    return {
        "dataset": {**prep.stats, **cold_stats},
        "models": models,
        "cold_users": cold_users_slice,
        "settings": {
            **{key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()},
            "cold_start": cold_details,
        },
        "tuning": fitted.details,
        "total_s": time.perf_counter() - started,
    }


def cold_user_slice(model: HybridRecommender, prep: Prepared, data: MovieLensData, encoder: TextEncoder,
                    n_recent: int = 3) -> dict[str, float]:
    """NDCG@10 for users known by a few events only: every protocol user presents just the
    ``n_recent`` latest items before their test target (no stored history). Compared: most
    popular; the user-context embedding (``USER_CONTEXT_TEMPLATE`` over those items' titles and
    genres, as ``user_context_embeddings`` builds it) blended with popularity, which is what
    serving answers users without history (``HybridRecommender.cold_scores``); and the full
    model reading the few items as in-request history. (SASRec and EASE have no user
    parameters, so training on these users' earlier items does not reveal their targets.)"""
    test = prep.split.test_histories()
    few = [items[-n_recent:] for items in test.items]
    few_types = [types[-n_recent:] for types in test.event_types]
    catalog = data.catalog.drop_duplicates("item_id", keep="last").set_index("item_id")
    labels = [f"{t} ({c})" if c else str(t) for t, c in zip(catalog["title"], catalog.get("category", ""))]
    label = dict(zip(catalog.index.astype(str), labels))
    contexts = pd.DataFrame({"recent_items": [[label.get(prep.vocab.ids[i - 1], "") for i in items[::-1]]
                                              for items in few], "reviews": ""})
    vectors = torch.from_numpy(encoder.encode(USER_CONTEXT_TEMPLATE.render(contexts)))
    targets, n = prep.split.test_targets, prep.n_items
    popularity = PopularityRecommender().fit(prep.split.train, n)
    everyone = len(few)  # one batch, so the context vectors line up with the rows
    return {
        f"popularity_ndcg@{K}": evaluate_ranking(popularity.score, few, targets, n, K, everyone)[f"ndcg@{K}"],
        f"context_ndcg@{K}": evaluate_ranking(lambda h, t=None: model.cold_scores(vectors, len(h)), few, targets, n, K,
                                              everyone)[f"ndcg@{K}"],
        f"main_ndcg@{K}": evaluate_ranking(model.ranker(), few, targets, n, K, event_types=few_types)[f"ndcg@{K}"],
        "users": everyone,
    }


def format_table(models: dict[str, dict]) -> str:
    """A fixed-width table of every model's metrics (missing values as "-"; seconds to 0.1)."""
    frame = pd.DataFrame(models).T.reindex(columns=list(TABLE_COLUMNS)).astype(float)
    formats = {column: "{:.1f}".format if column.endswith("_s") else "{:.4f}".format for column in TABLE_COLUMNS}
    return frame.to_string(formatters=formats, na_rep="-")


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no GPU/TPU banners
    report = run(args)
    print(format_table(report["models"]))
    print(f"total {report['total_s']:.0f}s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=float))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
