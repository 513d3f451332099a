"""Faults and concurrency: a retrain killed midway leaves the champion untouched and the next
run consumes its batch; the sensor never starts a retrain while one is queued or running."""

import os
import signal
import subprocess
import sys
import time

import dagster as dg
from conftest import TINY_RUN_CONFIG
from test_promotion import trained  # noqa: F401  (fixture: a real champion, version 1)

from rec_pipelines.defs.training.automation import RETRAIN_TAGS
from rec_pipelines.feedback_store import FeedbackStore
from rec_pipelines.registry import CHAMPION

SLOW_RETRAIN = """
import dagster as dg
from rec_pipelines.definitions import defs
config = {"ops": {"candidate_model": {"config": {
    "mode": "incremental", "incremental_max_epochs": 500, "incremental_max_time_s": 300,
    "replay_users": 10000, "d_model": 32, "max_len": 20}}}}
defs().resolve_job_def("microbatch_retrain_job").execute_in_process(instance=dg.DagsterInstance.get(), run_config=config)
"""


def wait_for_training_run(registry, timeout=300):
    experiment = registry.experiment_id()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = registry.client.search_runs([experiment], "tags.mode = 'incremental' and attributes.status = 'RUNNING'")
        if runs:
            return runs[0]
        time.sleep(0.5)
    raise AssertionError("the retrain never started training")


def test_sigkill_midway_leaves_champion_untouched_and_next_run_consumes_the_batch(trained, small_simulator):  # noqa: F811
    settings, defs, instance, registry = trained
    champion = registry.version_by_alias(CHAMPION)
    small_simulator.write_batch(settings.landing_zone, 1)

    worker = subprocess.Popen([sys.executable, "-c", SLOW_RETRAIN], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_training_run(registry)
        time.sleep(2)  # well inside training
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(timeout=30)
    finally:
        if worker.poll() is None:
            worker.kill()

    assert registry.version_by_alias(CHAMPION).version == champion.version
    assert len(registry.client.search_model_versions(f"name = '{settings.model_name}'")) == 1
    batches = FeedbackStore(settings.landing_zone, settings.lake).batches("events")
    assert len(batches) == 2  # the killed run ingested batch 1 exactly once

    result = defs.resolve_job_def("microbatch_retrain_job").execute_in_process(instance=instance, run_config=TINY_RUN_CONFIG)
    assert result.success
    trained_model = result.output_for_node("candidate_model")
    assert trained_model.mode == "incremental" and trained_model.new_batches == [batches[1]]  # not skipped
    version = registry.client.get_model_version(settings.model_name, result.output_for_node("champion_model")["version"])
    assert version.tags["new_batches"] == f'["{batches[1]}"]'


def test_sensor_waits_while_a_retrain_is_queued(recsys_env, small_simulator):
    from rec_pipelines.definitions import defs as load_defs

    defs = load_defs()
    small_simulator.write_batch(recsys_env.landing_zone, 0)
    sensor = defs.resolve_sensor_def("landing_zone_sensor")
    with dg.DagsterInstance.get() as instance:
        queued = instance.create_run_for_job(
            defs.resolve_job_def("microbatch_retrain_job"), tags=RETRAIN_TAGS, status=dg.DagsterRunStatus.QUEUED)
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
