"""``recsys ingest PATH...``: land files (or a MovieLens folder) atomically and run the
pipeline's own ingestion assets on them; ends with one JSON line of accounting."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from rec_pipelines.lake import FeedbackStore, is_supported, printable
from rec_pipelines.lake.landing import place, place_movielens
from rec_pipelines.settings import Settings


def _files_under(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not path.is_file():
        raise FileNotFoundError(f"no such file or folder: {path}")
    return [path]


def _metadata(result, asset: str) -> dict:
    for event in result.get_asset_materialization_events():
        if event.asset_key.to_user_string() == asset:
            return {k: v.value for k, v in event.materialization.metadata.items()}
    return {}


def run_ingestion(min_timestamp: int | None = None):
    """Materialise the ingestion assets and their checks (``raise_on_error=False``)."""
    import dagster as dg

    from rec_pipelines.definitions import defs as load_defs
    from rec_pipelines.defs.ingestion.assets import INGESTION_ASSETS

    run_config: dict = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
    if min_timestamp is not None:
        run_config["ops"] = {"validated_feedback": {"config": {"min_timestamp": min_timestamp}}}
    job = load_defs().resolve_job_def("microbatch_retrain_job")
    with dg.DagsterInstance.get() as instance:
        return job.execute_in_process(
            instance=instance, run_config=run_config, asset_selection=[dg.AssetKey(a) for a in INGESTION_ASSETS],
            tags={"recsys/trigger": "recsys ingest"}, raise_on_error=False)


def summarize(result, store: FeedbackStore, placed: list[str]) -> dict:
    """The run's outcome: files, per-batch accounting of the events batches it ingested, checks."""
    raw, catalog, validated = (_metadata(result, a) for a in ("raw_feedback", "item_catalog", "validated_feedback"))
    files = list(raw.get("files", [])) + list(catalog.get("files", []))
    batches = [store.account(b) or {"batch_id": b} for b in validated.get("new_batches", [])]
    batches = [{k: a.get(k) for k in ("batch_id", "file", "rows_in", "rows_valid", "rows_quarantined", "reasons", "rejected")
                if a.get(k) is not None} for a in batches]
    checks = {e.asset_check_key.name: bool(e.passed) for e in result.get_asset_check_evaluations()}
    return {
        "files": files,
        "rows_in": sum(b.get("rows_in", 0) for b in batches),
        "rows_valid": sum(b.get("rows_valid", 0) for b in batches),
        "rows_quarantined": sum(b.get("rows_quarantined", 0) for b in batches),
        "quarantined_files": list(raw.get("quarantined_files", [])) + list(catalog.get("quarantined_files", [])),
        "duplicate_files": list(raw.get("duplicate_files", [])),
        "already_ingested": [name for name in placed if name not in files],
        "catalog_rows_in": int(catalog.get("new_rows", 0)),
        "batches": batches,
        "checks": checks,
        "run_id": result.run_id,
        "success": bool(result.success),
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="recsys ingest", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", type=Path, help="files or folders to ingest")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--catalog", action="store_true", help="the files hold catalog items, not feedback events")
    source.add_argument("--movielens", action="store_true",
                        help="each PATH is a MovieLens folder (ratings.csv, u.data or ratings.dat layout)")
    parser.add_argument("--min-timestamp", type=int, default=None,
                        help="epoch seconds: older events are quarantined (default 1995-01-01)")
    args = parser.parse_args(argv)

    settings = Settings.from_env()
    settings.local_landing_zone("ingest")
    store = FeedbackStore.from_settings(settings, settings.landing_zone)
    placed: list[Path] = []
    try:
        for path in args.paths:
            if args.movielens:
                placed += place_movielens(path, settings.landing_zone)
                continue
            kind = "catalog" if args.catalog else "events"
            for source_file in _files_under(path):
                if not is_supported(source_file):
                    print(f"note: {printable(str(source_file))} has no supported suffix; it will be quarantined", file=sys.stderr)
                placed.append(place(source_file, settings.landing_zone / kind, durable=False))
    except (FileNotFoundError, ValueError) as exc:
        print(f"recsys ingest: {exc}", file=sys.stderr)
        return 2
    os.sync()  # every placed file on disk (one sync rather than one per file)
    names = [p.relative_to(settings.landing_zone).as_posix() for p in placed]
    print(f"placed {len(names)} files in {settings.landing_zone}: {[printable(n) for n in names[:10]]}", file=sys.stderr)

    result = run_ingestion(args.min_timestamp)
    summary = summarize(result, store, names)
    for bad in summary["quarantined_files"]:
        print(f"quarantined file {printable(bad['file'])}: {bad['reason']}", file=sys.stderr)
    print(f"{summary['rows_in']} rows in, {summary['rows_valid']} valid, {summary['rows_quarantined']} quarantined "
          f"(reasons and rows under {settings.lake / 'quarantine'})", file=sys.stderr)
    print(json.dumps(summary, sort_keys=True), flush=True)
    return 0 if result.success else 1
