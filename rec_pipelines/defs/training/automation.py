"""Retrain automation: a sensor on the landing zone (micro-batch) and a nightly full retrain.

Both jobs materialise the whole graph and carry the ``recsys/model`` tag; dagster.yaml's run
queue lets one run per value of that tag run at a time, so two retrains of the same model never
overlap. The sensor also waits while a retrain is queued or running, so files landing meanwhile
are batched into the next run.
"""


import hashlib
import os

import dagster as dg

from rec_pipelines.defs.training.assets import RETRAIN_TAG
from rec_pipelines.resources import LakeResource
from rec_pipelines.settings import Settings

MODEL_NAME = Settings.from_env().model_name
RETRAIN_TAGS = {RETRAIN_TAG: MODEL_NAME}
ACTIVE_STATUSES = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]


def _train_config(mode: str) -> dict:
    return {"ops": {"candidate_model": {"config": {"mode": mode}}}}


microbatch_retrain_job = dg.define_asset_job(
    "microbatch_retrain_job",
    selection=dg.AssetSelection.all(),
    config=_train_config("auto"),
    tags=RETRAIN_TAGS,
    description="Ingest new feedback and fine-tune the champion on it (full retrain if none exists).",
)
full_retrain_job = dg.define_asset_job(
    "full_retrain_job",
    selection=dg.AssetSelection.all(),
    config=_train_config("full"),
    tags=RETRAIN_TAGS,
    description="Rebuild everything and train from scratch on all feedback.",
)

full_retrain_schedule = dg.ScheduleDefinition(
    name="full_retrain_schedule",
    job=full_retrain_job,
    cron_schedule=os.environ.get("RECSYS_FULL_RETRAIN_CRON", "0 2 * * *"),
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Nightly full retrain (cron from RECSYS_FULL_RETRAIN_CRON).",
)


@dg.sensor(
    job=microbatch_retrain_job,
    minimum_interval_seconds=int(os.environ.get("RECSYS_SENSOR_INTERVAL_S", "10")),
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Starts a micro-batch retrain when new files land in the landing zone.",
)
def landing_zone_sensor(context: dg.SensorEvaluationContext, lake: LakeResource):
    store = lake.store()
    pending = store.pending_files("events") + store.pending_files("catalog")
    if not pending:
        return dg.SkipReason("no new files in the landing zone")
    active = context.instance.get_run_records(
        dg.RunsFilter(statuses=ACTIVE_STATUSES, tags=RETRAIN_TAGS), limit=1
    )
    if active:
        return dg.SkipReason(f"{len(pending)} new files wait for retrain run {active[0].dagster_run.run_id} to finish")
    # The same set of files always maps to the same run key, so a file never starts two runs.
    fingerprint = sorted(f"{p.relative_to(store.landing_zone)}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in pending)
    run_key = hashlib.sha256("\n".join(fingerprint).encode()).hexdigest()[:16]
    names = [p.relative_to(store.landing_zone).as_posix() for p in pending]
    context.log.info(f"{len(pending)} new files: {names[:10]}")
    return dg.RunRequest(run_key=run_key, tags={**RETRAIN_TAGS, "recsys/files": str(len(names))})
