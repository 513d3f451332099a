"""Faults and concurrency: a retrain killed midway leaves the champion untouched and the next
run consumes its batch; the sensor never starts a retrain while one is queued or running."""

import os
import signal
import subprocess
import sys
import time

import dagster as dg
from conftest import TINY_RUN_CONFIG
from dagster._core.test_utils import in_process_test_workspace
from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
from test_promotion import trained  # noqa: F401  (fixture: a real champion, version 1)

from rec_pipelines.defs.training.automation import RETRAIN_TAGS
from rec_pipelines.lake import FeedbackStore
from rec_pipelines.registry import CHAMPION

SLOW_RETRAIN = """
import dagster as dg
from rec_pipelines.definitions import defs
config = {"ops": {"candidate_model": {"config": {
    "mode": "incremental", "finetune_max_epochs": 500, "max_time_s": 300, "model": {"finetune_patience": 1000},
    "replay_users": 10000, "d_model": 32, "max_len": 20}}}}
defs().resolve_job_def("microbatch_retrain_job").execute_in_process(instance=dg.DagsterInstance.get(), run_config=config)
"""


def wait_for_training_epochs(registry, epochs=2, timeout=300):
    """Wait until the retrain has logged ``epochs`` validation epochs: it is midway."""
    experiment = registry.experiment_id()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = registry.client.search_runs([experiment], "tags.mode = 'incremental' and attributes.status = 'RUNNING'")
        if runs and len(registry.client.get_metric_history(runs[0].info.run_id, "val_ndcg_at_10")) >= epochs:
            return runs[0]
        time.sleep(0.2)
    raise AssertionError("the retrain never got into training")


def test_sigkill_midway_leaves_champion_untouched_and_next_run_consumes_the_batch(trained, small_simulator):  # noqa: F811
    settings, defs, instance, registry = trained
    champion = registry.version_by_alias(CHAMPION)
    small_simulator.write_batch(settings.landing_zone, 1)

    worker = subprocess.Popen([sys.executable, "-c", SLOW_RETRAIN], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_training_epochs(registry)
        assert worker.poll() is None, "the retrain finished before it could be killed midway"
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(timeout=30)
    finally:
        if worker.poll() is None:
            worker.kill()

    assert registry.version_by_alias(CHAMPION).version == champion.version
    assert len(registry.client.search_model_versions(f"name = '{settings.model_name}'")) == 1
    batches = FeedbackStore(settings.landing_zone, settings.lake).batches("events")
    assert len(batches) == 2  # the killed run ingested batch 1 exactly once

    # The dead run still holds the training pool's one slot: the next training step would wait
    # for it forever. Recover as the deployment does: the code server reports the run failed,
    # and the daemon (dagster.yaml: free_slots_after_run_end_seconds) frees its slots.
    killed = instance.get_run_records(dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED]))
    assert [r.dagster_run.job_name for r in killed] == ["microbatch_retrain_job"]
    assert instance.event_log_storage.get_concurrency_run_ids() == {killed[0].dagster_run.run_id}
    instance.report_run_failed(killed[0].dagster_run)
    instance.event_log_storage.free_concurrency_slots_for_run(killed[0].dagster_run.run_id)

    result = defs.resolve_job_def("microbatch_retrain_job").execute_in_process(instance=instance, run_config=TINY_RUN_CONFIG)
    assert result.success
    trained_model = result.output_for_node("candidate_model")
    assert trained_model.mode == "incremental" and trained_model.new_batches == [batches[1]]  # not skipped
    version = registry.client.get_model_version(settings.model_name, result.output_for_node("champion_model")["version"])
    assert (version.tags["new_batches.count"], version.tags["new_batches.last"]) == ("1", batches[1])
    assert registry.trained_batches(version) == batches


def submit_to_queue(instance: dg.DagsterInstance, defs: dg.Definitions, job_name: str):
    """Submit a run the way the UI and the daemon do: through the instance's
    QueuedRunCoordinator (dagster.yaml), so it waits in the queue as a real one would."""
    origin = LoadableTargetOrigin(module_name="rec_pipelines.definitions")
    with in_process_test_workspace(instance, origin) as workspace:
        location = workspace.get_code_location(workspace.code_location_names[0])
        repository = next(iter(location.get_repositories().values()))
        remote_job = repository.get_full_job(job_name)
        run = instance.create_run_for_job(
            job_def=defs.resolve_job_def(job_name),
            remote_job_origin=remote_job.get_remote_origin(), job_code_origin=remote_job.get_python_origin(),
            tags=RETRAIN_TAGS)
        return instance.submit_run(run.run_id, workspace)


def test_sensor_waits_while_a_retrain_is_queued(recsys_env, small_simulator):
    from rec_pipelines.definitions import defs as load_defs

    defs = load_defs()
    small_simulator.write_batch(recsys_env.landing_zone, 0)
    sensor = defs.resolve_sensor_def("landing_zone_sensor")
    with dg.DagsterInstance.get() as instance:
        queued = submit_to_queue(instance, defs, "microbatch_retrain_job")
        assert instance.get_run_by_id(queued.run_id).status == dg.DagsterRunStatus.QUEUED
        with dg.build_sensor_context(instance=instance, definitions=defs, resources=defs.resources) as context:
            tick = sensor.evaluate_tick(context)
        assert tick.run_requests == [] and queued.run_id in tick.skip_message
        instance.delete_run(queued.run_id)
        with dg.build_sensor_context(instance=instance, definitions=defs, resources=defs.resources) as context:
            first = sensor.evaluate_tick(context)
        with dg.build_sensor_context(instance=instance, definitions=defs, resources=defs.resources) as context:
            second = sensor.evaluate_tick(context)
        assert len(first.run_requests) == 1
        # the same pending files always map to the same run key, so Dagster never starts them twice
        assert [r.run_key for r in second.run_requests] == [first.run_requests[0].run_key]
