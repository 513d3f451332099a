"""Evaluation on held-out data and the MLflow registration + promotion gate."""


import tempfile
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd

from rec_models.data import UserSequences
from rec_models.evaluation import PopularityRecommender, evaluate_ranking, paired_difference
from rec_models.recommender import HybridRecommender
from rec_pipelines.defs.training.assets import TrainedModel, TrainingData, text_matrix
from rec_pipelines.plots import figure_to_md, new_figure
from rec_pipelines.registry import decide_promotion, metric_key
from rec_pipelines.resources import MlflowResource

GROUP = "registry"


def evaluate_model(model: HybridRecommender, histories: UserSequences, targets: np.ndarray, cold: np.ndarray) -> dict:
    """Protocol metrics of what serving answers by default (``model.ranker()``) on all users,
    plus NDCG@10 on the cold-start users (``cold`` marks users whose test item never occurs in
    training, e.g. items that arrived with new batches), and each user's NDCG@10
    (``per_user_ndcg@10``) for the paired comparison."""
    ranker = model.ranker()
    metrics = evaluate_ranking(ranker, histories.items, targets, model.n_items,
                               event_types=histories.event_types, per_user=True)
    positions = np.flatnonzero(cold)
    metrics["cold_users"] = len(positions)
    metrics["cold_ndcg@10"] = float("nan")
    if len(positions):
        metrics["cold_ndcg@10"] = float(metrics["per_user_ndcg@10"][positions].mean())
    return metrics


def comparison_figure(results: dict):
    """Grouped bars: each model's held-out metrics side by side."""
    metrics = ["hr@10", "ndcg@10", "cold_ndcg@10"]
    names = [n for n in ("candidate", "champion", "popularity") if n in results]
    figure = new_figure(6.0, 3.5)
    axis = figure.add_subplot(1, 1, 1)
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [float(results[name].get(m, np.nan)) for m in metrics]
        axis.bar(np.arange(len(metrics)) + i * width, np.nan_to_num(values), width, label=name)
    axis.set_xticks(np.arange(len(metrics)) + width * (len(names) - 1) / 2, metrics)
    axis.set_title("held-out metrics (same users)")
    axis.legend(fontsize=8)
    figure.tight_layout()
    return figure


class PromotionConfig(dg.Config):
    ndcg_tolerance: float = 0.002  # absolute NDCG@10 a candidate may lose and still be promoted
    coverage_tolerance: float = 0.2  # relative coverage@10 loss allowed
    cold_tolerance: float = 0.01  # absolute cold-start NDCG@10 loss allowed
    min_cold_users: int = 20  # below this many cold-start users the cold guard is not applied
    significance_z: float = 1.645  # an NDCG shortfall rejects only if significant (one-sided); 0: plain rule
    max_relative_shortfall: float = 0.1  # ... and never when NDCG@10 is this share below the champion's


@dg.asset(group_name=GROUP, kinds={"mlflow"})
def model_evaluation(
    context: dg.AssetExecutionContext,
    candidate_model: TrainedModel,
    training_data: TrainingData,
    item_text_embeddings: pd.DataFrame,
    mlflow: MlflowResource,
) -> dg.Output[dict]:
    """Protocol metrics (full ranking, history masked, leave-last-out test target) for the
    candidate, the current champion and a popularity baseline, all on the same users."""
    registry = mlflow.registry()
    split = training_data.split
    histories, targets = split.test_histories(), split.test_targets
    trained_items = np.unique(np.concatenate(split.train.items)) if len(split.train) else np.zeros(0, np.int64)
    cold = ~np.isin(targets, trained_items)
    candidate = HybridRecommender.load(candidate_model.bundle_dir)
    results = {"candidate": evaluate_model(candidate, histories, targets, cold)}

    champion_version = registry.version_by_alias("champion")
    if champion_version is not None:
        bundle = registry.download_bundle("champion", dst=Path(tempfile.mkdtemp(prefix="champion-")))
        champion = HybridRecommender.load(bundle)
        champion.grow(text_matrix(training_data.vocab, item_text_embeddings))  # new items scored from text
        results["champion"] = evaluate_model(champion, histories, targets, cold)
        results["paired"] = paired_difference(results["candidate"].pop("per_user_ndcg@10"),
                                              results["champion"].pop("per_user_ndcg@10"))
    results["candidate"].pop("per_user_ndcg@10", None)
    popularity = PopularityRecommender().fit(split.train, len(training_data.vocab))
    results["popularity"] = evaluate_ranking(popularity.score, histories.items, targets, len(training_data.vocab))

    client = registry.client
    for name, value in results["candidate"].items():
        client.log_metric(candidate_model.run_id, f"test_{metric_key(name)}", float(value))
    if "champion" in results:
        client.log_metric(candidate_model.run_id, f"champion_test_{metric_key('ndcg@10')}",
                          float(results["champion"]["ndcg@10"]))
        client.log_metric(candidate_model.run_id, "paired_ndcg_diff", results["paired"]["diff"])
        client.log_metric(candidate_model.run_id, "paired_ndcg_diff_se", results["paired"]["se"])
    comparison = comparison_figure(results)
    client.log_figure(candidate_model.run_id, comparison, "plots/champion_vs_challenger.png")
    table = pd.DataFrame({k: v for k, v in results.items() if k != "paired"}).T.reindex(columns=["hr@10", "ndcg@10", "coverage@10", "cold_ndcg@10", "cold_users"])
    context.log.info(f"held-out evaluation:\n{table}")
    return dg.Output(
        {**results, "champion_version": champion_version.version if champion_version else None},
        metadata={
            "candidate_ndcg@10": float(results["candidate"]["ndcg@10"]),
            "champion_ndcg@10": float(results["champion"]["ndcg@10"]) if "champion" in results else float("nan"),
            "popularity_ndcg@10": float(results["popularity"]["ndcg@10"]),
            "users": int(results["candidate"]["n_users"]),
            "cold_users": int(cold.sum()),
            "paired_ndcg_diff": dg.MetadataValue.json(results.get("paired")),
            "comparison": dg.MetadataValue.md(table.to_markdown(floatfmt=".4f")),
            "comparison_plot": dg.MetadataValue.md(figure_to_md(comparison, alt="champion vs challenger")),
        },
    )


@dg.asset(group_name=GROUP, kinds={"mlflow"})
def champion_model(
    context: dg.AssetExecutionContext,
    config: PromotionConfig,
    candidate_model: TrainedModel,
    model_evaluation: dict,
    mlflow: MlflowResource,
) -> dg.Output[dict]:
    """Registers the candidate (alias ``challenger``) and moves ``champion`` to it only if it
    is not worse than the champion on the same held-out data. The reason is tagged on the
    version; serving loads ``models:/<name>@champion``."""
    import json

    registry = mlflow.registry()
    metrics = ("hr@10", "ndcg@10", "coverage@10", "cold_ndcg@10", "cold_users")
    candidate = {m: float(model_evaluation["candidate"][m]) for m in metrics}
    champion = {m: float(model_evaluation["champion"][m]) for m in metrics} if "champion" in model_evaluation else None
    decision = decide_promotion(candidate, champion, config.ndcg_tolerance, config.coverage_tolerance,
                                config.cold_tolerance, config.min_cold_users, model_evaluation.get("paired"),
                                config.significance_z, config.max_relative_shortfall)
    version = registry.register(
        candidate_model.model_uri,
        candidate_model.run_id,
        tags={
            "dagster.run_id": context.run_id,
            "mode": candidate_model.mode,
            "batches": json.dumps(candidate_model.batches),
            "new_batches": json.dumps(candidate_model.new_batches),
            "parent_version": candidate_model.parent_version or "",
        },
    )
    registry.apply_decision(version.version, decision)
    champion_now = registry.version_by_alias("champion")
    context.log.info(f"version {version.version}: {'PROMOTED' if decision.promoted else 'not promoted'} ({decision.reason})")
    return dg.Output(
        {"version": version.version, "promoted": decision.promoted, "reason": decision.reason,
         "champion_version": champion_now.version if champion_now else None},
        metadata={
            "version": version.version,
            "promoted": decision.promoted,
            "reason": decision.reason,
            "champion_version": champion_now.version if champion_now else "none",
            "model_uri": dg.MetadataValue.text(f"models:/{registry.model_name}@champion"),
            "mlflow_run_id": candidate_model.run_id,
        },
    )
