"""The whole loop on a real Dagster instance and a real MLflow store (temp dirs), with real
Lightning training on a tiny simulated catalog."""

import tempfile

import dagster as dg
import pandas as pd
import pytest
from conftest import TINY_RUN_CONFIG, full_run_config

import mlflow
from rec_models.data import interactions
from rec_pipelines.definitions import defs as load_defs
from rec_pipelines.defs.training.automation import MICROBATCH_REUSES
from rec_pipelines.lake import FeedbackStore
from rec_pipelines.registry import ModelRegistry


def test_full_graph_then_sensor_microbatch(recsys_env, small_simulator, tmp_path, monkeypatch):
    settings = recsys_env
    scratch = tmp_path / "tmp"  # where the run's temporary files go: downloaded bundles must not stay
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    small_simulator.write_batch(settings.landing_zone, 0)
    defs = load_defs()
    registry = ModelRegistry(settings.mlflow_tracking_uri, settings.mlflow_artifact_root, settings.model_name)

    with dg.DagsterInstance.get() as instance:
        # 1. every asset materialises; the blocking GE check passes
        result = defs.resolve_job_def("full_retrain_job").execute_in_process(
            instance=instance, run_config=full_run_config())
        assert result.success
        materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
        graph = defs.resolve_asset_graph()
        # online metrics and the per-batch partitions run on their own
        every_asset = {k.to_user_string() for k in graph.get_all_asset_keys()
                       if graph.get(k).group_name not in ("online", "event_batches")}
        assert materialized == every_asset and "champion_model" in every_asset
        checks = {e.asset_check_key.name: e.passed for e in result.get_asset_check_evaluations()}
        assert checks["feedback_expectations"] is True
        first = result.output_for_node("champion_model")
        assert first["promoted"] and first["reason"] == "no champion yet"

        # 2. the champion loads from the registry and recommends catalog titles
        champion = registry.version_by_alias("champion")
        assert champion.version == first["version"]
        model = mlflow.pyfunc.load_model(f"models:/{settings.model_name}@champion")
        users = small_simulator.events(0)["user_id"].drop_duplicates().head(2).tolist()
        recs = model.predict(pd.DataFrame({"user_id": users, "k": [10, 10]}))
        assert recs.groupby("user_id").size().to_dict() == {u: 10 for u in users}
        catalog_titles = set(small_simulator.catalog()["title"])
        assert set(recs["title"]) <= catalog_titles and recs["title"].str.len().min() > 0
        # raw ids reach the user's stored history (the server holds the pseudonym key), the
        # pseudonym the lake knows them by gives the same answer, and history is never repeated
        store = FeedbackStore(settings.landing_zone, settings.lake)
        pseudonyms = store.pseudonymizer()(users)
        by_pseudonym = model.predict(pd.DataFrame({"user_id": pseudonyms, "k": [10, 10]}))
        assert by_pseudonym["item_id"].tolist() == recs["item_id"].tolist()
        assert recs["explanation"].str.startswith("because you liked").all()  # not the popularity fallback
        seen = interactions(small_simulator.events(0)).groupby("user_id")["item_id"].agg(set)  # positives
        assert all(item not in seen[user] for user, item in zip(recs["user_id"], recs["item_id"]))
        run = registry.client.get_run(champion.run_id)
        assert "val_ndcg_at_10" in run.data.metrics and "test_ndcg_at_10" in run.data.metrics
        assert len(registry.client.get_metric_history(champion.run_id, "val_ndcg_at_10")) >= 1
        assert run.data.params["mode"] == "full"
        # the full retrain streamed its training windows from Parquet with the default loader process
        full_networks = result.output_for_node("candidate_model").history["networks"]
        assert [n["loader_workers"] for n in full_networks] == [1] * len(full_networks)
        plots = {a.path for a in registry.client.list_artifacts(champion.run_id, "plots")}
        assert plots == {"plots/training_curves.png", "plots/champion_vs_challenger.png"}

        # 3. nothing new: the sensor skips
        sensor = defs.resolve_sensor_def("landing_zone_sensor")
        with dg.build_sensor_context(instance=instance, definitions=defs, resources=defs.resources) as context:
            assert sensor.evaluate_tick(context).run_requests == []

        # 4. a new batch lands: the real sensor asks for a micro-batch retrain from the champion
        small_simulator.write_batch(settings.landing_zone, 1)
        with dg.build_sensor_context(instance=instance, definitions=defs, resources=defs.resources) as context:
            tick = sensor.evaluate_tick(context)
        assert len(tick.run_requests) == 1
        request = tick.run_requests[0]
        micro = defs.resolve_job_def(sensor.job_name).execute_in_process(
            instance=instance, run_config=TINY_RUN_CONFIG, tags=request.tags, asset_selection=request.asset_selection)
        assert micro.success
        # whole-history analytics are reused (loaded from the lake), everything else is refreshed
        refreshed = {e.asset_key.to_user_string() for e in micro.get_asset_materialization_events()}
        assert refreshed == every_asset - set(MICROBATCH_REUSES) and set(MICROBATCH_REUSES) < every_asset
        trained = micro.output_for_node("candidate_model")
        assert trained.mode == "incremental" and trained.parent_version == first["version"]
        assert all(n["loader_workers"] == 0 for n in trained.history["networks"])  # a fine-tune's windows: in memory
        assert len(trained.new_batches) == 1 and trained.new_batches[0].startswith("events-00001")
        meta = next(e for e in micro.get_asset_materialization_events()
                    if e.asset_key == dg.AssetKey("candidate_model")).materialization.metadata
        assert [n["epochs"] for n in meta["networks"].value] == [n["epochs"] for n in trained.history["networks"]]
        assert meta["windows_per_epoch"].value == trained.history["n_windows"] > 0
        assert meta["new_batches"].value == 1 and meta["new_batches_latest"].value == trained.new_batches
        second = micro.output_for_node("champion_model")
        version = registry.client.get_model_version(settings.model_name, second["version"])
        # The gate compared the fine-tune with the champion on the same users and says so.
        evaluation = micro.output_for_node("model_evaluation")
        assert evaluation["champion_version"] == first["version"]
        assert evaluation["paired"]["users"] == evaluation["candidate"]["n_users"] > 0
        assert version.tags["promotion.decision"] == ("promoted" if second["promoted"] else "rejected")
        assert "challenger" in version.aliases and ("champion" in version.aliases) == second["promoted"]
        champion_ndcg = f"{evaluation['champion']['ndcg@10']:.4f}"
        if second["promoted"]:
            assert f"vs champion {champion_ndcg}" in second["reason"]
        else:
            assert "than champion" in second["reason"]  # which rule rejected it: NDCG, coverage or cold start
        assert float(version.tags["paired.ndcg_diff"]) == pytest.approx(evaluation["paired"]["diff"], abs=1e-5)
        assert registry.version_by_alias("champion").version == (second["version"] if second["promoted"] else first["version"])
        assert registry.trained_batches(version) == trained.batches and trained.batches[-1] == trained.new_batches[0]
        assert version.tags["batches.count"] == "2" and version.tags["batches.last"] == trained.new_batches[0]
        # the champion bundles the fine-tune and the gate downloaded are gone from the disk
        assert not list(scratch.rglob("MLmodel"))
        assert not list(scratch.glob("recsys-windows-*"))  # the full retrain's streamed training file is removed

        # 5. re-running ingests nothing twice
        rows_before = len(store.read("events"))
        again = defs.resolve_job_def("full_retrain_job").execute_in_process(
            instance=instance, run_config=full_run_config(), asset_selection=[dg.AssetKey("raw_feedback")])
        materialized = again.asset_materializations_for_node("raw_feedback")[0].metadata
        assert materialized["rows"].value == len(store.read("events")) == rows_before
        assert materialized["new_rows"].value == 0
