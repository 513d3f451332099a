"""Held-out evaluation and the MLflow registration + promotion gate: thin assets over
``rec_pipelines.training`` and ``rec_pipelines.registry``."""

import dagster as dg
import pandas as pd

from rec_pipelines.defs.resources import MlflowResource, ServingResource, load_ref
from rec_pipelines.item_embeddings import ItemEmbeddingsRef
from rec_pipelines.plots import figure_to_md
from rec_pipelines.registry import MIN_COLD_USERS, NDCG_TOLERANCE, batch_tags, decide_promotion
from rec_pipelines.training import (
    DEFAULT_EVAL_USERS,
    DEFAULT_STEP_USERS,
    DEFAULT_TARGET_SE_RELATIVE,
    TrainedModel,
    TrainingDataRef,
    held_out_comparison,
    text_matrix,
)

GROUP = "registry"


class EvaluationConfig(dg.Config):
    eval_users: int = DEFAULT_EVAL_USERS  # with more held-out users, score a stratified sample of this many
    eval_seed: int = 0  # which sample: the same seed scores the same users
    target_se_relative: float = DEFAULT_TARGET_SE_RELATIVE  # stop scoring once the paired SE is this share of
    # the champion's NDCG@10 (0: score the whole sample)
    step_users: int = DEFAULT_STEP_USERS  # users scored between two looks at the standard error
    min_cold_users: int = MIN_COLD_USERS  # nor stop before this many cold-start users are scored (or all of the
    # sample's): keep it at the gate's min_cold_users, so stopping early never switches the cold guard off
    clear_tolerance: float = NDCG_TOLERANCE  # also stop once the candidate is within this NDCG@10 of the champion
    # beyond doubt (Bonferroni over the looks, SE at most 15 % of its NDCG): keep it at the gate's ndcg_tolerance
    stop_when_clear: bool = True  # False: only the SE target stops scoring


class PromotionConfig(dg.Config):
    ndcg_tolerance: float = NDCG_TOLERANCE  # absolute NDCG@10 a candidate may lose and still be promoted
    coverage_tolerance: float = 0.2  # relative coverage@10 loss allowed
    cold_tolerance: float = 0.01  # absolute cold-start NDCG@10 loss allowed
    min_cold_users: int = MIN_COLD_USERS  # below this many cold-start users the cold guard is not applied
    significance_z: float = 1.645  # an NDCG shortfall rejects only if significant (one-sided); 0: plain rule
    max_relative_shortfall: float = 0.1  # ... and never when NDCG@10 is this share below the champion's


@dg.asset(group_name=GROUP, kinds={"mlflow"})
def model_evaluation(
    context: dg.AssetExecutionContext,
    config: EvaluationConfig,
    candidate_model: TrainedModel,
    training_data: TrainingDataRef,
    item_text_embeddings: ItemEmbeddingsRef,
    mlflow: MlflowResource,
) -> dg.Output[dict]:
    """Protocol metrics (full ranking, history masked, leave-last-out test target) for the
    candidate, the current champion and a popularity baseline, all on the same users: every
    held-out user, or a seeded sample of ``eval_users`` stratified by activity when there are more,
    scored until the paired standard error is below ``target_se_relative`` of the champion's NDCG@10."""
    if config.step_users < 1 or config.target_se_relative < 0:
        raise dg.Failure(f"step_users must be at least 1 and target_se_relative at least 0, "
                         f"got {config.step_users} and {config.target_se_relative}")
    data = load_ref(training_data)
    if list(candidate_model.batches) != list(data.batches):  # (a model is judged on the data it was trained on)
        raise dg.Failure(f"candidate_model was trained on {len(candidate_model.batches)} feedback batches, but "
                         f"training_data now holds {len(data.batches)}: materialise candidate_model again")
    results, comparison = held_out_comparison(candidate_model, data, text_matrix(data.vocab, load_ref(item_text_embeddings)),
                                              mlflow.registry(), config.eval_users, config.eval_seed,
                                              config.target_se_relative, config.step_users, config.min_cold_users,
                                              config.clear_tolerance if config.stop_when_clear else None)
    table = pd.DataFrame({k: results[k] for k in ("candidate", "champion", "popularity") if k in results}).T.reindex(
        columns=["hr@10", "ndcg@10", "coverage@10", "cold_ndcg@10", "cold_users"])
    context.log.info(f"held-out evaluation on {results['eval_users']} users of a sample of {results['eval_sample']} "
                     f"of {results['eval_population']} (seed {results['eval_seed']}, stopped: "
                     f"{results['eval_stopped_by']}):\n{table}")
    return dg.Output(
        results,
        metadata={
            "candidate_ndcg@10": float(results["candidate"]["ndcg@10"]),
            "champion_ndcg@10": float(results["champion"]["ndcg@10"]) if "champion" in results else float("nan"),
            "popularity_ndcg@10": float(results["popularity"]["ndcg@10"]),
            "users": int(results["candidate"]["n_users"]),
            "cold_users": results["cold_users"],
            "eval_users": results["eval_users"],
            "eval_sample": results["eval_sample"],
            "eval_population": results["eval_population"],
            "eval_seed": results["eval_seed"],
            "eval_stopped_by": results["eval_stopped_by"],
            "paired_se_relative": float("nan") if results["paired_se_relative"] is None else results["paired_se_relative"],
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
    serving: ServingResource,
) -> dg.Output[dict]:
    """Registers the candidate (alias ``challenger``) and moves ``champion`` to it only if it
    is not worse than the champion on the same held-out data. The reason is tagged on the
    version; serving loads ``models:/<name>@champion``, and the servers in
    ``RECSYS_SERVE_URLS`` are told at once."""

    registry = mlflow.registry()
    metrics = ("hr@10", "ndcg@10", "coverage@10", "cold_ndcg@10", "cold_users")
    candidate = {m: float(model_evaluation["candidate"][m]) for m in metrics}
    champion = {m: float(model_evaluation["champion"][m]) for m in metrics} if "champion" in model_evaluation else None
    decision = decide_promotion(candidate, champion, config.ndcg_tolerance, config.coverage_tolerance,
                                config.cold_tolerance, config.min_cold_users, model_evaluation.get("paired"),
                                config.significance_z, config.max_relative_shortfall)
    if model_evaluation.get("eval_stopped_by") == "clear" and model_evaluation["eval_clear_tolerance"] > config.ndcg_tolerance:
        context.log.warning(f"held-out scoring stopped once the candidate was clearly within "
                            f"{model_evaluation['eval_clear_tolerance']} of the champion, a looser tolerance than this "
                            f"gate's {config.ndcg_tolerance}: keep model_evaluation's clear_tolerance at ndcg_tolerance")
    if model_evaluation.get("champion_unloadable"):
        decision.reason = f"{model_evaluation['champion_unloadable']}: promoted without a comparison"
        context.log.warning(decision.reason)
    evaluated = evaluation_tags(model_evaluation)
    if int(evaluated.get("eval.users", 0)) < int(evaluated.get("eval.population", 0)):
        decision.reason += (f" (evaluated on {evaluated['eval.users']} of {evaluated['eval.population']} held-out users, "
                            f"seed {evaluated['eval.seed']})")
    version = registry.register(
        candidate_model.model_uri,
        candidate_model.run_id,
        tags={
            "dagster.run_id": context.run_id,
            "mode": candidate_model.mode,
            **batch_tags(candidate_model.batches, candidate_model.new_batches),  # the lists: the run's batches.json
            "parent_version": candidate_model.parent_version or "",
            **evaluated,
        },
    )
    registry.apply_decision(version.version, decision)
    notified = serving.notify(context.log)  # the aliases moved (challenger always, champion if promoted)
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
            "servers_notified": dg.MetadataValue.json(notified),
            "evaluation": dg.MetadataValue.json(evaluated),
        },
    )


def evaluation_tags(model_evaluation: dict) -> dict[str, str]:
    """How the decision was measured, as version tags: users scored, of a sample of how many, of
    how many held-out users, the sample's seed, why scoring stopped, and the paired standard error (absolute and relative to the
    champion's NDCG@10) when there was a champion. Empty for an evaluation from before sampling."""
    tags = {f"eval.{key}": str(model_evaluation[f"eval_{key}"])
            for key in ("users", "sample", "population", "seed", "stopped_by", "clear_tolerance")
            if model_evaluation.get(f"eval_{key}") is not None}
    if model_evaluation.get("paired"):
        tags["eval.paired_se"] = f"{model_evaluation['paired']['se']:.6g}"
    if model_evaluation.get("paired_se_relative") is not None:
        tags["eval.paired_se_relative"] = f"{model_evaluation['paired_se_relative']:.6g}"
    return tags
