"""Retrain automation: a sensor on the landing zone (micro-batch) and a nightly full retrain.

Both jobs materialise the whole graph (the sensor's runs less ``MICROBATCH_REUSES`` once the
lake holds them) and carry the ``recsys/model`` tag; dagster.yaml's run
queue lets one run per value of that tag run at a time, so two retrains of the same model never
overlap. The sensor also waits while a retrain is queued or running, so files landing meanwhile
are batched into the next run.
"""


import hashlib
import json

import dagster as dg
from dagster._core.storage.tags import RUN_KEY_TAG

from rec_pipelines.defs.resources import ASSET_STORE, LakeResource
from rec_pipelines.defs.training.assets import RETRAIN_TAG
from rec_pipelines.lake import fingerprint
from rec_pipelines.settings import Settings

SETTINGS = Settings.from_env()
MODEL_NAME = SETTINGS.model_name
RETRAIN_TAGS = {RETRAIN_TAG: MODEL_NAME}
ACTIVE_STATUSES = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]


def _train_config(mode: str) -> dict:
    return {"ops": {"candidate_model": {"config": {"mode": mode}}}}


# Online metrics and the per-batch partitions (re-validation from the UI) run on their own.
RETRAIN_ASSETS = dg.AssetSelection.all() - dg.AssetSelection.groups("online", "event_batches")

microbatch_retrain_job = dg.define_asset_job(
    "microbatch_retrain_job",
    selection=RETRAIN_ASSETS,
    config=_train_config("auto"),
    tags=RETRAIN_TAGS,
    description="Ingest new feedback and fine-tune the champion on it (full retrain if none exists).",
)
full_retrain_job = dg.define_asset_job(
    "full_retrain_job",
    selection=RETRAIN_ASSETS,
    config=_train_config("full"),
    tags=RETRAIN_TAGS,
    description="Rebuild everything and train from scratch on all feedback.",
)

full_retrain_schedule = dg.ScheduleDefinition(
    name="full_retrain_schedule",
    job=full_retrain_job,
    cron_schedule=SETTINGS.full_retrain_cron,
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Nightly full retrain (cron from RECSYS_FULL_RETRAIN_CRON).",
)


RETRAIN_KINDS = ("events", "catalog")  # impressions are read by online_metrics, not retrains
MICROBATCH_REUSES = ("feedback_features", "user_context_embeddings")
"""Whole-history analytics a micro-batch run reuses once the lake holds them (the full retrain
and "Materialize" refresh them): their cost grows with the history, and a fine-tune needs nothing
new from them (``training_data`` flags the bot-like among the users it rebuilds itself)."""


def microbatch_selection(context: dg.SensorEvaluationContext, lake_root) -> list[dg.AssetKey] | None:
    """The assets a micro-batch run materialises: the whole job, less ``MICROBATCH_REUSES`` once
    each has a stored value to load (None: the whole job)."""
    if context.repository_def is None or not all((lake_root / ASSET_STORE / name).exists() for name in MICROBATCH_REUSES):
        return None
    keys = RETRAIN_ASSETS.resolve(context.repository_def.asset_graph)
    return sorted(keys - {dg.AssetKey(name) for name in MICROBATCH_REUSES}, key=lambda key: key.to_user_string())


@dg.sensor(
    job=microbatch_retrain_job,
    minimum_interval_seconds=SETTINGS.sensor_interval_s,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Starts a micro-batch retrain when new files land in the landing zone.",
)
def landing_zone_sensor(context: dg.SensorEvaluationContext, lake: LakeResource):
    """Requests one ``microbatch_retrain_job`` run for all files that landed since the last
    request, exactly once per file.

    * A file is visible only when complete (``lake.is_ready``: final name after an
      atomic rename, and no ``<name>.writing`` marker), so a file being written is never read.
    * The cursor remembers the files already requested (name -> size:mtime) until the ledger
      shows them ingested, so a file starts one run however often the sensor ticks; the run key
      (a hash of the requested files) makes Dagster drop a request it has seen before, even if
      the cursor were lost. Cursor, ledger and run keys live in the instance and the lake, so
      this survives restarts of the daemon.
    * Many small files are batched: every file that is new at a tick goes into one run, and
      while a retrain is queued or running the sensor waits, so the files landing meanwhile
      go together into the next run. A run that fails before ingesting leaves its files
      pending, and the next tick asks for them again under a new run key, so no batch is
      skipped.
    """
    store = lake.store()
    pending = {p.relative_to(store.landing_zone).as_posix(): fingerprint(p)
               for kind in RETRAIN_KINDS for p in store.pending_files(kind)}
    cursor = json.loads(context.cursor) if context.cursor else {}
    # name -> {"fp": size:mtime, "run_key": the request that asked for it}. Forget what the
    # ledger has ingested (or what vanished or changed); keep what still waits for its run.
    requested = {name: entry for name, entry in cursor.get("requested", {}).items()
                 if isinstance(entry, dict) and pending.get(name) == entry["fp"]}
    # A run that ended without ingesting its files (failed or canceled before ingestion) does
    # not keep them waiting forever: they are asked for again, under a new run key.
    ended = {key for key in {entry["run_key"] for entry in requested.values()}
             if _run_ended(context.instance, key)}
    retried = sorted(name for name, entry in requested.items() if entry["run_key"] in ended)
    new = {name: fp for name, fp in sorted(pending.items()) if name not in requested or name in retried}

    def save(extra: dict) -> None:
        keep = {name: entry for name, entry in requested.items() if name not in retried}
        context.update_cursor(json.dumps({"requested": {**keep, **extra}}, sort_keys=True))

    if not new:
        save({})
        waiting = f"; {len(requested)} requested files wait for their run" if requested else ""
        return dg.SkipReason(f"no new files in the landing zone{waiting}")
    active = context.instance.get_run_records(
        dg.RunsFilter(statuses=ACTIVE_STATUSES, tags=RETRAIN_TAGS), limit=1
    )
    if active:
        save({})
        return dg.SkipReason(f"{len(new)} new files wait for retrain run {active[0].dagster_run.run_id} to finish")
    # The same files (and, for a retry, the same failed requests) always map to the same run
    # key, so a file never starts two runs for one reason.
    lines = [f"{name}:{fp}" for name, fp in new.items()] + [f"retry:{key}" for key in sorted(ended)]
    run_key = hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]
    save({name: {"fp": fp, "run_key": run_key} for name, fp in new.items()})
    if retried:
        context.log.warning(f"asking again for {len(retried)} files whose run ended without ingesting them: {retried[:10]}")
    context.log.info(f"{len(new)} new files: {list(new)[:10]}")
    return dg.RunRequest(run_key=run_key, tags={**RETRAIN_TAGS, "recsys/files": str(len(new))},
                         asset_selection=microbatch_selection(context, store.lake))


def _run_ended(instance: dg.DagsterInstance, run_key: str) -> bool:
    """Whether the run this sensor requested under ``run_key`` exists and has finished."""
    runs = instance.get_runs(dg.RunsFilter(tags={RUN_KEY_TAG: run_key}), limit=1)
    return bool(runs) and runs[0].is_finished
