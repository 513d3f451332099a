"""``recsys demo``: the whole feedback loop once, end to end, on the embedded simulator.

1. Materialise the full asset graph (full retrain) unless a champion already exists.
2. Drop the simulator's next feedback batch into the landing zone.
3. Evaluate the real landing-zone sensor and execute the run it requests (micro-batch retrain
   from the champion, evaluation, gated promotion).
4. Load ``models:/<name>@champion`` from MLflow and print top-10 recommendations.

Safe to run again: ingestion is exactly-once per file, and each run adds the next batch.
"""

from __future__ import annotations

import time

import dagster as dg
import pandas as pd

import mlflow
from rec_pipelines.settings import Settings


def _step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def _run_summary(result: dg.ExecuteInProcessResult) -> dict:
    registration = result.output_for_node("champion_model")
    model = result.output_for_node("candidate_model")
    return {"dagster_run_id": result.run_id, "mlflow_run_id": model.run_id, "mode": model.mode, **registration}


def run_demo(settings: Settings, full: bool = False, n_users: int = 3, simulator=None,
             run_config: dict | None = None) -> int:
    """``simulator`` and ``run_config`` (merged into every run) let tests shrink the demo."""
    from rec_models.simulator import FeedbackSimulator, next_batch_index
    from rec_pipelines.definitions import defs as load_defs
    from rec_pipelines.registry import ModelRegistry

    started = time.monotonic()
    # Dagster's step-by-step DEBUG events stay in the UI; the console shows INFO and up.
    run_config = _merge({"loggers": {"console": {"config": {"log_level": "INFO"}}}}, run_config or {})
    instance = dg.DagsterInstance.get()
    defs = load_defs()
    simulator = simulator or FeedbackSimulator()
    registry = ModelRegistry(settings.mlflow_tracking_uri, settings.mlflow_artifact_root, settings.model_name)
    summaries = []

    if next_batch_index(settings.landing_zone) == 0:
        _step("Writing the simulator's initial catalog and feedback history into the landing zone")
        for path in simulator.write_batch(settings.landing_zone, 0):
            print(f"  {path}")

    if full or registry.version_by_alias("champion") is None:
        _step("Materialising every asset (full retrain): ingest → validate → embed → train → evaluate → register")
        result = defs.resolve_job_def("full_retrain_job").execute_in_process(
            instance=instance, run_config=_merge({"ops": {"candidate_model": {"config": {"mode": "full"}}}}, run_config or {})
        )
        summaries.append(_run_summary(result))
        print(f"  {summaries[-1]}")
    else:
        print("A champion exists already: skipping the full retrain (use --full to force one).")

    batch = next_batch_index(settings.landing_zone)
    _step(f"Dropping feedback batch {batch} into the landing zone")
    new_files = simulator.write_batch(settings.landing_zone, batch)
    for path in new_files:
        print(f"  {path}")
    new_events = simulator.events(batch)

    _step("Evaluating the landing-zone sensor")
    sensor = defs.resolve_sensor_def("landing_zone_sensor")
    with dg.build_sensor_context(instance=instance, definitions=defs, resources=defs.resources) as context:
        tick = sensor.evaluate_tick(context)
    if not tick.run_requests:
        print(f"  sensor skipped: {tick.skip_message}")
    for request in tick.run_requests:
        print(f"  sensor requested a run of {sensor.job_name} (run_key {request.run_key})")
        result = defs.resolve_job_def(sensor.job_name).execute_in_process(
            instance=instance, run_config=_merge(request.run_config, run_config or {}), tags=request.tags
        )
        summaries.append(_run_summary(result))
        print(f"  {summaries[-1]}")

    _step(f"Top-10 recommendations from models:/{settings.model_name}@champion")
    model = mlflow.pyfunc.load_model(f"models:/{settings.model_name}@champion")
    active = new_events.sort_values("timestamp", kind="stable")
    users = active["user_id"].drop_duplicates().head(n_users).tolist()
    titles = FeedbackCatalog(settings).titles
    for user in users:
        recent = active.loc[active["user_id"] == user, "item_id"].tail(3).tolist()
        recs = model.predict(pd.DataFrame({"user_id": [user], "recent_item_ids": [recent], "k": [10]}))
        print(f"\n  user {user}; just interacted with: " + "; ".join(titles.get(i, i) for i in recent))
        for row in recs.itertuples():
            print(f"    {row.rank:2d}. {row.title}  ({row.item_id}, score {row.score:.2f})")

    champion = registry.version_by_alias("champion")
    _step("Summary")
    for summary in summaries:
        print(f"  run {summary['dagster_run_id']}: {summary['mode']} model, MLflow run {summary['mlflow_run_id']}, "
              f"version {summary['version']} {'promoted' if summary['promoted'] else 'not promoted'} ({summary['reason']})")
    print(f"  champion: models:/{settings.model_name}@champion = version {champion.version}")
    print(f"  finished in {time.monotonic() - started:.0f}s")
    print("\nOpen the UIs:  .venv/bin/recsys ui   → Dagster http://127.0.0.1:3000 , MLflow http://127.0.0.1:5000")
    print(f"  (or: DAGSTER_HOME={settings.dagster_home} .venv/bin/dagster-webserver -m rec_pipelines.definitions;"
          f"  .venv/bin/mlflow ui --backend-store-uri {settings.mlflow_tracking_uri})")
    return 0


def _merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = _merge(merged.get(key, {}), value) if isinstance(value, dict) else value
    return merged


class FeedbackCatalog:
    """Item titles from the lake, for printing what users just interacted with."""

    def __init__(self, settings: Settings):
        from rec_pipelines.lake import FeedbackStore

        catalog = FeedbackStore.from_settings(settings, settings.landing_zone).catalog()
        self.titles = dict(zip(catalog["item_id"], catalog["title"]))
