"""Snapshot of the asset graph, checks and automation: what a user sees in the Dagster UI."""

import dagster as dg
import pytest

from rec_pipelines.definitions import defs as load_defs

EXPECTED_ASSETS = {
    # asset: (group, upstream assets)
    "item_catalog": ("ingestion", set()),
    "raw_feedback": ("ingestion", set()),
    "validated_feedback": ("ingestion", {"raw_feedback"}),
    "feedback_features": ("ingestion", {"validated_feedback"}),
    "item_text_embeddings": ("embeddings", {"item_catalog", "validated_feedback"}),
    "user_context_embeddings": ("embeddings", {"validated_feedback", "item_catalog", "item_text_embeddings"}),
    "training_data": ("training", {"validated_feedback", "item_catalog", "feedback_features"}),
    "candidate_model": ("training", {"training_data", "item_text_embeddings", "user_context_embeddings",
                                     "item_catalog"}),
    "model_evaluation": ("registry", {"candidate_model", "training_data", "item_text_embeddings"}),
    "champion_model": ("registry", {"candidate_model", "model_evaluation"}),
    "online_metrics": ("online", {"validated_feedback"}),
    "online_promotion": ("online", {"online_metrics"}),
    "event_batch": ("event_batches", {"raw_feedback"}),
}
ONLINE_ASSETS = {"online_metrics", "online_promotion"}
BATCH_ASSETS = {"event_batch"}  # partitioned per landing batch, outside the retrain jobs


@pytest.fixture(scope="module")
def defs(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("RECSYS_HOME", str(tmp_path_factory.mktemp("home")))
    yield load_defs()
    mp.undo()


def test_asset_graph_snapshot(defs):
    graph = defs.resolve_asset_graph()
    keys = {key.to_user_string() for key in graph.get_all_asset_keys()}
    assert keys == set(EXPECTED_ASSETS)
    for name, (group, parents) in EXPECTED_ASSETS.items():
        node = graph.get(dg.AssetKey(name))
        assert node.group_name == group, name
        assert {p.to_user_string() for p in node.parent_keys} == parents, name
    partitions = graph.get(dg.AssetKey("event_batch")).partitions_def
    assert isinstance(partitions, dg.DynamicPartitionsDefinition) and partitions.name == "event_batches"


def test_checks_snapshot(defs):
    graph = defs.resolve_asset_graph()
    blocking = {(key.asset_key.to_user_string(), key.name): graph.get_check_spec(key).blocking
                for key in graph.asset_check_keys}
    # a failing GE suite stops training; a missing catalog entry only warns
    assert blocking == {("validated_feedback", "feedback_expectations"): True,
                        ("validated_feedback", "events_with_catalog_entry"): False}


def test_automation_snapshot(defs):
    sensor = defs.resolve_sensor_def("landing_zone_sensor")
    assert sensor.job_name == "microbatch_retrain_job"
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    schedule = defs.resolve_schedule_def("full_retrain_schedule")
    assert schedule.job_name == "full_retrain_job" and schedule.cron_schedule == "0 2 * * *"
    for job_name in ("microbatch_retrain_job", "full_retrain_job"):
        job = defs.resolve_job_def(job_name)
        assert job.tags["recsys/model"] == "recsys-sasrec"  # the queue's per-model limit key
        assert {k.to_user_string() for k in job.asset_layer.executable_asset_keys} == \
            set(EXPECTED_ASSETS) - ONLINE_ASSETS - BATCH_ASSETS
    online = defs.resolve_schedule_def("online_metrics_schedule")
    assert online.job_name == "online_metrics_job" and online.default_status == dg.DefaultScheduleStatus.STOPPED
    assert {k.to_user_string() for k in defs.resolve_job_def("online_metrics_job").asset_layer.executable_asset_keys} \
        == ONLINE_ASSETS


def test_instance_config_limits_one_retrain_per_model(tmp_path, monkeypatch):
    import shutil
    from pathlib import Path

    shutil.copy(Path(__file__).parents[1] / "dagster.yaml", tmp_path)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    with dg.DagsterInstance.get() as instance:
        queue = instance.get_concurrency_config().run_queue_config
        assert {"key": "recsys/model", "value": {"applyLimitPerUniqueValue": True}, "limit": 1} in queue.tag_concurrency_limits
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        assert not instance.get_settings("telemetry")["enabled"]
        # training steps started any other way (UI "Materialize") share a pool of one slot
        assert instance.get_concurrency_config().pool_config.default_pool_limit == 1
        # ... and the daemon frees the slots of runs that died holding them (SIGKILL)
        assert instance.run_monitoring_settings["free_slots_after_run_end_seconds"] > 0


def test_rollback_job_is_defined(defs):
    job = defs.resolve_job_def("rollback_champion_job")
    assert [node.name for node in job.graph.nodes] == ["restore_previous_champion"]


def test_training_runs_in_the_shared_pool(defs):
    node = defs.resolve_asset_graph().get(dg.AssetKey("candidate_model"))
    assert node.pools == {"recsys_training"}
    # a re-validation of a batch never runs while the per-user table is built from the batches
    for name in ("training_data", "event_batch"):
        assert defs.resolve_asset_graph().get(dg.AssetKey(name)).pools == {"recsys_user_table"}
