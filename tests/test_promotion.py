"""Issue 5's promotion guarantees on real components: the cold-start guard, a planted degraded
model that is never promoted, and rollback (CLI and Dagster job)."""

import json
import pickle
import shutil

import dagster as dg
import pytest
import torch
from conftest import TINY_RUN_CONFIG, full_run_config

import mlflow
from rec_models.models import HybridRecommender
from rec_pipelines.cli.rollback import main as rollback_main
from rec_pipelines.definitions import defs as load_defs
from rec_pipelines.registry import CHAMPION, ModelRegistry, decide_promotion

GOOD = {"hr@10": 0.2, "ndcg@10": 0.1, "coverage@10": 0.3, "cold_ndcg@10": 0.05, "cold_users": 40}


def test_cold_start_guard_blocks_a_cold_start_regression():
    worse_cold = {**GOOD, "ndcg@10": 0.11, "cold_ndcg@10": 0.01}
    decision = decide_promotion(worse_cold, GOOD)
    assert not decision.promoted and "cold-start" in decision.reason
    too_few = {**worse_cold, "cold_users": 5}  # too few cold users to judge: guard not applied
    assert decide_promotion(too_few, {**GOOD, "cold_users": 5}).promoted


@pytest.fixture
def trained(recsys_env, small_simulator):
    """A real champion (version 1) trained by the full job on a temp instance."""
    small_simulator.write_batch(recsys_env.landing_zone, 0)
    defs = load_defs()
    instance = dg.DagsterInstance.get()
    result = defs.resolve_job_def("full_retrain_job").execute_in_process(instance=instance, run_config=full_run_config())
    assert result.success
    registry = ModelRegistry(recsys_env.mlflow_tracking_uri, recsys_env.mlflow_artifact_root, recsys_env.model_name)
    yield recsys_env, defs, instance, registry
    instance.dispose()


def plant_degraded_candidate(settings, registry):
    """Replace the materialised candidate_model with a model whose network is scrambled."""
    path = settings.lake / "assets" / "candidate_model"
    candidate = pickle.loads(path.read_bytes())
    bundle = settings.lake / "degraded" / "bundle"
    shutil.copytree(candidate.bundle_dir, bundle)
    model = HybridRecommender.load(bundle)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for parameter in model.backbone.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    model.alpha, model.ease_weight = 1.0, 0.0  # the scrambled network alone decides
    model.save(bundle)
    with registry.start_run("planted-degraded") as run:
        info = registry.log_recommender(bundle, None)
    candidate.run_id, candidate.model_uri, candidate.bundle_dir = run.info.run_id, info.model_uri, str(bundle)
    path.write_bytes(pickle.dumps(candidate))


def test_a_degraded_model_is_never_promoted(trained):
    settings, defs, instance, registry = trained
    champion_before = registry.version_by_alias(CHAMPION).version
    plant_degraded_candidate(settings, registry)
    result = defs.resolve_job_def("full_retrain_job").execute_in_process(
        instance=instance, run_config=full_run_config(),
        asset_selection=[dg.AssetKey("model_evaluation"), dg.AssetKey("champion_model")])
    decision = result.output_for_node("champion_model")
    assert decision["promoted"] is False and "worse than champion" in decision["reason"]
    assert registry.version_by_alias(CHAMPION).version == champion_before
    rejected = registry.client.get_model_version(settings.model_name, decision["version"])
    assert rejected.tags["promotion.decision"] == "rejected"
    assert "challenger" in rejected.aliases
    materialization = instance.get_latest_materialization_event(dg.AssetKey("champion_model"))
    assert materialization.asset_materialization.metadata["promoted"].value is False


def test_rollback_from_cli_and_from_dagster(trained, capsys):
    settings, defs, instance, registry = trained
    # a second, promoted version (a full retrain of the same data)
    assert defs.resolve_job_def("full_retrain_job").execute_in_process(
        instance=instance, run_config=full_run_config()).output_for_node("champion_model")["promoted"]
    assert registry.version_by_alias(CHAMPION).version == 2

    assert rollback_main(["--reason", "bad feedback batch"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (line["from_version"], line["to_version"]) == ("2", "1")
    assert registry.version_by_alias(CHAMPION).version == 1
    assert registry.client.get_model_version(settings.model_name, "2").tags["rolled_back"] == "bad feedback batch"
    model = mlflow.pyfunc.load_model(f"models:/{settings.model_name}@champion")
    assert model.metadata.run_id == registry.client.get_model_version(settings.model_name, "1").run_id

    # version 1 replaced nothing: nothing left to roll back to
    assert rollback_main([]) == 1
    # the Dagster job does the same thing; promote 2 again first
    registry.client.set_registered_model_alias(settings.model_name, CHAMPION, "2")
    result = defs.resolve_job_def("rollback_champion_job").execute_in_process(
        instance=instance, run_config={"ops": {"restore_previous_champion": {"config": {"reason": "from UI"}}}})
    assert result.output_for_node("restore_previous_champion") == {"from_version": "2", "to_version": "1"}
    assert registry.version_by_alias(CHAMPION).version == 1


def test_a_champion_that_cannot_grow_to_todays_catalog_is_not_compared(trained, monkeypatch):
    """A champion that loads but cannot take today's text table (e.g. another encoder) is left
    out of the comparison, never scored as it is, and the reason says so."""
    settings, defs, instance, registry = trained

    def refuse(self, *args, **kwargs):
        raise ValueError("text embeddings have 384 columns, the model 16")

    monkeypatch.setattr(HybridRecommender, "grow", refuse)
    result = defs.resolve_job_def("full_retrain_job").execute_in_process(
        instance=instance, run_config=TINY_RUN_CONFIG,
        asset_selection=[dg.AssetKey("model_evaluation"), dg.AssetKey("champion_model")])
    evaluation = result.output_for_node("model_evaluation")
    assert "champion" not in evaluation and "paired" not in evaluation
    assert "champion v1 cannot be evaluated by this version (text embeddings have 384" in evaluation["champion_unloadable"]
    assert "cannot be evaluated by this version" in result.output_for_node("champion_model")["reason"]


def test_a_champion_this_version_cannot_load_is_replaced_with_the_reason_said(trained):
    settings, defs, instance, registry = trained
    stored = list(settings.local_artifact_root.rglob("recommender.json"))
    assert len(stored) == 1  # the one registered model, version 1
    stored[0].unlink()  # as a bundle written before recommender.json existed
    result = defs.resolve_job_def("microbatch_retrain_job").execute_in_process(instance=instance,
                                                                               run_config=TINY_RUN_CONFIG)
    assert result.output_for_node("candidate_model").mode == "full"  # nothing to fine-tune from
    decision = result.output_for_node("champion_model")
    assert decision["promoted"] and "champion v1 cannot be evaluated by this version" in decision["reason"]
    assert str(registry.version_by_alias(CHAMPION).version) == str(decision["version"]) == "2"
