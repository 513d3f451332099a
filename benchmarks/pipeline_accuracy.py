"""The pipeline's champion on a MovieLens folder, scored under ../shared/benchmarks/PROTOCOL.md
beside EASE fitted on the same split in the same run.

    .venv/bin/python benchmarks/pipeline_accuracy.py --data ../shared/data/ml-latest-small

1. A temporary home (lake, Dagster instance, MLflow store); the folder is landed as
   ``recsys ingest --movielens`` does and ``full_retrain_job`` runs through the real Dagster
   job with the pipeline's default model settings.
2. The registered champion (``models:/<name>@champion``'s bundle) ranks the protocol's test
   targets from the pipeline's own split; the split is checked against the protocol's (every
   rating row, stable time order, users with >= 5 interactions).
3. EASE (lambda tuned on validation) on the same split; paired per-user NDCG difference.
4. Cold-start items (protocol): a seeded 10 % of items lose their training interactions; the
   champion's configuration is trained on that split by the same entry point
   (``train_recommender``) and compared with content-only on the users whose target is cold.

Prints a table and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="MovieLens folder (any layout)")
    parser.add_argument("--home", type=Path, default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-cold", action="store_true")
    args = parser.parse_args()
    home = args.home or Path(tempfile.mkdtemp(prefix="pipeline-accuracy-"))
    home.mkdir(parents=True, exist_ok=True)
    for name in ("RECSYS_LANDING_ZONE", "RECSYS_LAKE", "RECSYS_MLFLOW_ARTIFACTS", "RECSYS_PSEUDONYM_KEY_FILE",
                 "MLFLOW_TRACKING_URI", "DAGSTER_HOME"):
        os.environ.pop(name, None)
    os.environ["RECSYS_HOME"] = str(home)
    # The pseudonyms decide the order users reach training; a key from the seed makes a run
    # reproducible (with a random key, each run is another draw of that order).
    os.environ["RECSYS_PSEUDONYM_KEY"] = f"pipeline-accuracy-benchmark-key-{args.seed}"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import dagster as dg
    import pandas as pd

    from rec_models.data import ItemVocab, leave_last_out
    from rec_models.data.movielens import load_movielens
    from rec_models.evaluation import (
        cold_start_split,
        cold_start_users,
        evaluate_ranking,
        evaluate_split,
        paired_difference,
        protocol_sequences,
        select_cold_items,
    )
    from rec_models.models import (
        HybridRecommender,
        train_recommender,
        tune_content,
        tune_ease,
    )
    from rec_pipelines.definitions import defs as load_defs
    from rec_pipelines.lake.landing import place_movielens
    from rec_pipelines.registry import CHAMPION, ModelRegistry
    from rec_pipelines.settings import prepare_environment

    started = time.perf_counter()
    settings = prepare_environment()
    place_movielens(args.data, settings.landing_zone)
    defs = load_defs()
    run_config = {"loggers": {"console": {"config": {"log_level": "WARNING"}}},
                  "ops": {"candidate_model": {"config": {"mode": "full", "seed": args.seed}}}}
    with dg.DagsterInstance.get() as instance:
        result = defs.resolve_job_def("full_retrain_job").execute_in_process(instance=instance, run_config=run_config)
    if not result.success:
        raise SystemExit("full_retrain_job failed")
    pipeline_s = time.perf_counter() - started
    data = result.output_for_node("training_data").load()
    history = result.output_for_node("candidate_model").history
    registry = ModelRegistry(settings.mlflow_tracking_uri, settings.mlflow_artifact_root, settings.model_name)
    champion_version = registry.version_by_alias(CHAMPION).version
    model = HybridRecommender.load(registry.download_bundle(CHAMPION, dst=home / "champion"))
    split, n_items = data.split, model.n_items

    # The pipeline's split is the protocol's: same users, same targets (ids pseudonymised).
    movielens = load_movielens(args.data)
    vocab = ItemVocab(data.vocab.ids)
    reference = leave_last_out(protocol_sequences(movielens.events, vocab))
    same = (len(reference.train) == len(split.train)
            and sorted(reference.test_targets.tolist()) == sorted(split.test_targets.tolist())
            and sum(map(len, reference.train.items)) == sum(map(len, split.train.items)))
    if not same:
        raise SystemExit("the pipeline's split differs from the protocol's split")

    test = split.test_histories()
    champion = evaluate_ranking(model.ranker(), test.items, split.test_targets, n_items,
                                event_types=test.event_types, per_user=True)
    start = time.perf_counter()
    ease, _ = tune_ease(split, n_items)
    ease_s = time.perf_counter() - start
    ease_metrics = evaluate_ranking(ease.score, test.items, split.test_targets, n_items, per_user=True)
    paired = paired_difference(champion["per_user_ndcg@10"], ease_metrics["per_user_ndcg@10"])
    report = {
        "dataset": str(args.data), "users": len(split.train), "items": n_items,
        "champion_version": champion_version,
        "champion_ndcg@10": champion["ndcg@10"], "champion_hr@10": champion["hr@10"],
        "ease_ndcg@10": ease_metrics["ndcg@10"], "ease_hr@10": ease_metrics["hr@10"],
        "ratio": champion["ndcg@10"] / ease_metrics["ndcg@10"],
        "paired_ndcg_diff": paired["diff"], "paired_ndcg_se": paired["se"],
        "alpha": model.alpha, "ease_weight": model.ease_weight, "content_window": model.content_window,
        "epochs": len(history["epochs"]), "stopped_by": history["stopped_by"],
        "train_s": history["train_s"], "ease_train_s": ease_s, "pipeline_s": pipeline_s,
        "seed": args.seed,
    }

    if not args.skip_cold:
        cold_items = select_cold_items(split, 0.1, args.seed)
        users = cold_start_users(split, cold_items)
        cold = cold_start_split(split, cold_items)
        start = time.perf_counter()
        cold_model, cold_history = train_recommender(cold, model.backbone.text_embeddings, model.config)
        content, _ = tune_content(cold, model.backbone.text_embeddings)
        report.update({
            "cold_users": len(users),
            "champion_cold_ndcg@10": evaluate_split(cold_model.ranker(), cold, n_items, "test", users=users)["ndcg@10"],
            "content_cold_ndcg@10": evaluate_split(content.score, cold, n_items, "test", users=users)["ndcg@10"],
            "cold_train_s": time.perf_counter() - start, "cold_stopped_by": cold_history["stopped_by"],
        })
    report["total_s"] = time.perf_counter() - started

    rows = [["champion (pipeline)", report["champion_ndcg@10"], report["champion_hr@10"], report.get("champion_cold_ndcg@10")],
            ["EASE", report["ease_ndcg@10"], report["ease_hr@10"], None],
            ["content-only", None, None, report.get("content_cold_ndcg@10")]]
    print(pd.DataFrame(rows, columns=["model", "ndcg@10", "hr@10", "cold_ndcg@10"]).to_string(index=False, float_format="%.4f"))
    print(f"champion / EASE = {report['ratio']:.3f}; paired NDCG@10 difference {paired['diff']:+.4f} "
          f"± {paired['se']:.4f} (SE) over {paired['users']} users; training {report['train_s']:.0f}s "
          f"({report['epochs']} epochs, stopped by {report['stopped_by']}); total {report['total_s']:.0f}s")
    print(json.dumps(report, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
