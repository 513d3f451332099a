"""Feedback in: landing zone → raw feedback → validated feedback → features, plus the catalog.

Each new landing file is one batch. ``raw_feedback`` reads new files exactly once
(pseudonymising user ids, scrubbing text), ``validated_feedback`` validates each new batch
exactly once and reports its accounting (rows_in = rows_valid + rows_quarantined), and the
blocking ``feedback_expectations`` check runs the Great Expectations suite over the new
batches: when it fails, those batches are moved to quarantine and nothing downstream
(training) runs on them. ``feedback_features`` derives per-user and per-item features and flags
bot-like users.
"""


import dagster as dg
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from rec_models.data.features import FeedbackFeatures, compute_features
from rec_models.data.schema import DEFAULT_EVENT_WEIGHTS
from rec_models.files import as_location
from rec_pipelines.defs.resources import USER_TABLE_POOL, LakeResource
from rec_pipelines.lake import ValidatedEvents, printable
from rec_pipelines.lake.compaction import COMPACT_MIN_FILES, COMPACT_TARGET_ROWS
from rec_pipelines.lake.validation import (
    DEFAULT_MIN_TIMESTAMP,
    GE_MAX_ROWS,
    MAX_CLOCK_SKEW_S,
    run_expectations,
)

GROUP = "ingestion"
INGESTION_ASSETS = ["item_catalog", "raw_feedback", "validated_feedback", "feedback_features"]
BATCH_GROUP = "event_batches"  # per-batch partitions: outside the retrain jobs (automation.RETRAIN_ASSETS)
EVENT_BATCHES = dg.DynamicPartitionsDefinition(name="event_batches")
"""One partition per ingested events batch (landing file), added by ``raw_feedback``."""


def _preview(frame: pd.DataFrame, rows: int = 5) -> dg.MetadataValue:
    return dg.MetadataValue.md(frame.head(rows).to_markdown(index=False) if len(frame) else "_empty_")


def _counts(series: pd.Series) -> dg.MetadataValue:
    return dg.MetadataValue.json({str(k): int(v) for k, v in series.value_counts().items()})


@dg.asset(group_name=GROUP, kinds={"pandas"})
def item_catalog(context: dg.AssetExecutionContext, lake: LakeResource) -> dg.Output[pd.DataFrame]:
    """Every known item with its text fields; catalog files in the landing zone add or change
    items (titles and descriptions scrubbed of contact data). Rows without an item id are
    quarantined with a reason, unreadable files whole."""
    store = lake.store()
    report = store.ingest("catalog")
    for bad in report.quarantined_files:
        context.log.warning(f"quarantined catalog file {printable(bad['file'])}: {bad['reason']}")
    catalog = store.catalog()
    context.log.info(f"catalog: {len(catalog)} items ({report.rows_in} rows from {len(report.batches)} new files)")
    return dg.Output(
        catalog,
        metadata={
            "items": len(catalog),
            "new_rows": report.rows_in,
            "new_files": report.batches,
            "files": dg.MetadataValue.json(report.files),
            "quarantined_files": dg.MetadataValue.json(report.quarantined_files),
            "categories": int(catalog["category"].nunique()),
            "preview": _preview(catalog[["item_id", "title", "category"]]),
        },
    )


@dg.asset(group_name=GROUP, kinds={"parquet"})
def raw_feedback(context: dg.AssetExecutionContext, lake: LakeResource) -> dg.MaterializeResult:
    """Every feedback event ever ingested, one Parquet file per landing file in the lake
    (``<lake>/events/<batch>.parquet``, tagged with its batch id and source row). Ingests new
    landing files exactly once (content-hash ledger), with user ids pseudonymised and text
    scrubbed; unreadable files are quarantined whole. The asset is the lake table itself: its
    materialization records what changed, and no copy of the history is handed over (the
    ledger counts the rows). Each new batch becomes a partition of ``event_batch``."""
    store = lake.store()
    report = store.ingest("events")
    for bad in report.quarantined_files:
        context.log.warning(f"quarantined file {printable(bad['file'])}: {bad['reason']}")
    rows = store.ingested_rows("events")
    context.log.info(f"ingested {report.rows_in} rows from {len(report.batches)} new files; {rows} rows in all")
    known = set(context.instance.get_dynamic_partitions(EVENT_BATCHES.name))
    added = [b for b in store.batches("events") if b not in known]  # also batches of a lake older than partitions
    if added:
        context.instance.add_dynamic_partitions(EVENT_BATCHES.name, added)
    preview = store.read_batch("events", report.batches[-1]).drop(columns=["text"]) if report.batches else None
    return dg.MaterializeResult(
        metadata={
            "rows": rows,
            "new_rows": report.rows_in,
            "path": dg.MetadataValue.path(str(store.lake / "events")),
            "files": dg.MetadataValue.json(report.files),
            "new_batches": dg.MetadataValue.json(report.batches),
            "batches": len(store.batches("events")),
            "duplicate_files": dg.MetadataValue.json(report.duplicate_files),
            "quarantined_files": dg.MetadataValue.json(report.quarantined_files),
            "texts_truncated": report.texts_truncated,
            "preview": _preview(preview) if preview is not None else dg.MetadataValue.md("_no new batches_"),
        },
    )


class ValidationConfig(dg.Config):
    """Row rules that depend on the data source."""

    min_timestamp: int = Field(
        default=DEFAULT_MIN_TIMESTAMP,
        description="Epoch seconds; older events are quarantined (default 1995-01-01).")
    max_clock_skew_s: int = Field(
        default=MAX_CLOCK_SKEW_S, description="How far in the future a timestamp may be (producer clocks).")


class ValidatedFeedbackConfig(ValidationConfig):
    """Row rules, and when small batch files are compacted (``rec_pipelines.lake.compaction``)."""

    compact_min_files: int = Field(
        default=COMPACT_MIN_FILES, description="Compact once this many small validated batch files wait (at least 2).")
    compact_target_rows: int = Field(
        default=COMPACT_TARGET_ROWS, description="Rows a compacted file gathers at most.")


_ACCOUNT_FIELDS = ["batch_id", "file", "rows_in", "rows_valid", "rows_quarantined", "reasons"]


@dg.asset(group_name=GROUP, kinds={"parquet"}, deps=[raw_feedback])
def validated_feedback(
    context: dg.AssetExecutionContext, config: ValidatedFeedbackConfig, lake: LakeResource
) -> dg.Output[ValidatedEvents]:
    """Events that passed the row rules, batch by batch. Each new batch is validated exactly
    once; its bad rows go to the quarantine store with a reason each, nothing is dropped
    silently: for every batch rows_in = rows_valid + rows_quarantined (metadata
    ``batch_accounting``). Batches rejected by the Great Expectations check are left out.
    The output is a handle on the lake's validated Parquet batches (``ValidatedEvents``), not a
    copy of the history: readers take the columns they need; the statistics cover new batches.
    Before validating, runs of small batch files validated by earlier runs (and checked by
    the suite since) are compacted once ``compact_min_files`` of them wait."""
    store = lake.store()
    try:
        compaction = store.compact(min_files=config.compact_min_files, target_rows=config.compact_target_rows)
    except ValueError as error:
        raise dg.Failure(str(error)) from error
    if compaction["files_written"]:
        context.log.info(f"compacted {compaction['compacted_batches']} batch files into {compaction['files_written']}")
    accounts = store.validate_pending(
        min_timestamp=config.min_timestamp, max_clock_skew_s=config.max_clock_skew_s, run_id=context.run_id)
    for account in accounts:
        if account["rows_in"] != account["rows_valid"] + account["rows_quarantined"]:
            raise dg.Failure(f"row accounting broken for batch {account['batch_id']}: {account}")
        if account["rows_quarantined"]:
            context.log.warning(f"batch {account['batch_id']}: quarantined {account['rows_quarantined']} of "
                                f"{account['rows_in']} rows: {account['reasons']}")
    valid = store.validated_events()
    fresh = store.validated_events([a["batch_id"] for a in accounts]).read(["user_id", "item_id", "event_type"])
    new = pd.DataFrame([{k: a[k] for k in _ACCOUNT_FIELDS} for a in accounts], columns=_ACCOUNT_FIELDS)
    reasons: dict[str, int] = {}
    for account in accounts:
        for reason, count in account["reasons"].items():
            reasons[reason] = reasons.get(reason, 0) + count
    return dg.Output(
        valid,
        metadata={
            "new_batches": dg.MetadataValue.json([a["batch_id"] for a in accounts]),
            "rows_in": int(new["rows_in"].sum()),
            "rows_valid": int(new["rows_valid"].sum()),
            "rows_quarantined": int(new["rows_quarantined"].sum()),
            "quarantine_reasons": dg.MetadataValue.json(reasons),
            "batch_accounting": dg.MetadataValue.json([{k: a[k] for k in _ACCOUNT_FIELDS} for a in accounts]),
            "batch_accounting_table": dg.MetadataValue.md(
                new.assign(reasons=new["reasons"].map(str)).to_markdown(index=False) if len(new) else "_no new batches_"),
            "min_timestamp": config.min_timestamp,
            "compaction": dg.MetadataValue.json(compaction),
            "rows": valid.rows,
            "batches": len(valid.batches),
            "path": dg.MetadataValue.path(str(as_location(valid.lake) / "validated")),
            "new_users": int(fresh["user_id"].nunique()),
            "new_items": int(fresh["item_id"].nunique()),
            "new_event_types": _counts(fresh["event_type"]),
        },
    )


def _latest_metadata(context: dg.AssetCheckExecutionContext, asset: str) -> dict:
    event = context.instance.get_latest_materialization_event(dg.AssetKey(asset))
    metadata = event.asset_materialization.metadata if event else {}
    return {key: value.value for key, value in metadata.items()}


def _ge_reason(failed: list[dict]) -> str:
    return "batch failed the Great Expectations suite: " + ", ".join(f"{r['expectation']}({r['column']})" for r in failed)


@dg.asset_check(asset=validated_feedback, blocking=True,
                description="Great Expectations suite over the batches the latest materialisation added; "
                            "a failure stops training and quarantines those batches")
def feedback_expectations(context: dg.AssetCheckExecutionContext, lake: LakeResource) -> dg.AssetCheckResult:
    metadata = _latest_metadata(context, "validated_feedback")
    batches = list(metadata.get("new_batches") or [])
    store = lake.store()
    rows = store.read_validated(batches)
    if not len(rows):
        return dg.AssetCheckResult(passed=True, metadata={"batches": dg.MetadataValue.json(batches), "rows_checked": 0,
                                                          "note": "no new validated rows to check"})
    result = run_expectations(rows, int(metadata.get("min_timestamp", 0)), max_rows=GE_MAX_ROWS)
    failed = result.failed
    rejected = []
    if failed:
        rejected = store.reject_batches(batches, _ge_reason(failed))
        context.log.error(f"{_ge_reason(failed)}: {batches} quarantined")
    return dg.AssetCheckResult(
        passed=result.success,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={
            "batches": dg.MetadataValue.json(batches),
            "rows_total": result.rows_total,
            "rows_checked": result.rows_checked,
            "sampled": result.sampled,
            "expectations": len(result.results),
            "failed": len(failed),
            "rejected_batches": dg.MetadataValue.json(rejected),
            "results": dg.MetadataValue.json(result.results),
            "failing_examples": dg.MetadataValue.md(
                "\n".join(f"- `{r['expectation']}` on {r['column']}: {r['unexpected_count']} rows, e.g. {r['examples']}"
                          for r in failed) or "_none_"
            ),
        },
    )


@dg.asset_check(asset=validated_feedback, additional_ins={"item_catalog": dg.AssetIn()},
                description="Share of events whose item has no catalog entry yet (kept, reported)")
def events_with_catalog_entry(validated_feedback: ValidatedEvents, item_catalog: pd.DataFrame) -> dg.AssetCheckResult:
    # In Arrow: no Python string per event (10M events: ~1.5 -> ~0.3 s).
    events = validated_feedback.read_table(["item_id"]).column(0).cast(pa.string()) if validated_feedback.batches \
        else pa.chunked_array([], pa.string())
    unknown = pc.invert(pc.is_in(events, value_set=pa.array(item_catalog["item_id"].astype(str).tolist(), pa.string())))
    missing = int(pc.sum(unknown).as_py() or 0)
    share = missing / len(events) if len(events) else 0.0
    examples = pc.unique(events.filter(unknown)).to_pylist()[:5] if missing else []
    return dg.AssetCheckResult(
        passed=share <= 0.05,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"share_without_catalog_entry": share,
                  "events_without_catalog_entry": missing,
                  "examples": dg.MetadataValue.json(examples)},
    )


class BatchConfig(ValidationConfig):
    revalidate: bool = Field(
        default=False, description="Validate this batch again from its lake copy under these rules and the Great "
                                   "Expectations suite (a backfill over all partitions re-validates every batch).")


@dg.asset(group_name=BATCH_GROUP, kinds={"parquet"}, partitions_def=EVENT_BATCHES, deps=[raw_feedback],
          pool=USER_TABLE_POOL)
def event_batch(context: dg.AssetExecutionContext, config: BatchConfig, lake: LakeResource) -> dg.MaterializeResult:
    """One ingested landing batch (a partition per file): its accounting (rows_in = rows_valid
    + rows_quarantined), quarantine reasons and a preview. With ``revalidate`` its rows are
    validated again from the lake's copy of the raw file under the configured rules, then the
    Great Expectations suite runs on them (a failure quarantines the batch whole, as for new
    batches); its valid and quarantined rows and accounting are replaced, and the next
    training rebuilds the per-user table from them. Without it, nothing changes."""
    store, batch_id = lake.store(), context.partition_key
    if config.revalidate:
        def suite(rows: pd.DataFrame) -> str | None:  # before anything is written, under the lake's lock
            failed = run_expectations(rows, config.min_timestamp, max_rows=GE_MAX_ROWS).failed
            return _ge_reason(failed) if failed else None

        try:
            account = store.revalidate(batch_id, min_timestamp=config.min_timestamp,
                                       max_clock_skew_s=config.max_clock_skew_s, run_id=context.run_id, suite=suite)
        except KeyError as error:
            raise dg.Failure(f"cannot validate batch {printable(batch_id)} again: {error}") from error
        (context.log.error if account.get("rejected") else context.log.info)(
            f"batch {batch_id} validated again: {account['rows_valid']} valid, {account['rows_quarantined']} "
            f"quarantined of {account['rows_in']}" + (f" ({account['rejected']})" if account.get("rejected") else ""))
    else:
        account = store.account(batch_id)
        if account is None:
            raise dg.Failure(f"batch {printable(batch_id)} is not validated yet: materialize validated_feedback first")
    valid = store.read_validated([batch_id])
    return dg.MaterializeResult(
        metadata={
            **{k: account[k] for k in ("rows_in", "rows_valid", "rows_quarantined")},
            "file": account["file"],
            "revalidated": config.revalidate,
            "rejected": account.get("rejected") or "no",
            "quarantine_reasons": dg.MetadataValue.json(account["reasons"]),
            "validated_at": dg.MetadataValue.timestamp(account["validated_at"]),
            "users": int(valid["user_id"].nunique()),
            "event_types": _counts(valid["event_type"]),
            "preview": _preview(valid.drop(columns=["text", "key_hash"], errors="ignore")),
            "quarantined_preview": _preview(store.quarantined_rows(batch_id).drop(columns=["text"], errors="ignore")),
        },
    )


FEATURE_COLUMNS = ["user_id", "item_id", "event_type", "value", "timestamp"]  # what compute_features reads


class FeatureConfig(dg.Config):
    """Event-type weights and the bot-like activity threshold."""

    event_weights: dict[str, float] = Field(
        default_factory=lambda: dict(DEFAULT_EVENT_WEIGHTS),
        description="Weight per event type (a rating's is scaled by value/5); types left out keep their default.")
    bot_events_per_minute: int = Field(default=30, description="Events in one minute that no person produces.")
    bot_sustained_minutes: int = Field(default=3, description="Minutes at that rate that flag a user as bot-like.")
    session_gap_s: int = Field(default=1800, description="Inactivity that ends a session.")


@dg.asset(group_name=GROUP, kinds={"pandas"})
def feedback_features(
    context: dg.AssetExecutionContext, config: FeatureConfig, validated_feedback: ValidatedEvents
) -> dg.Output[FeedbackFeatures]:
    """Per-user and per-item features (counts, recency, engagement under configurable
    event-type weights, rating habits), with bot-like users flagged, not dropped."""
    try:
        features = compute_features(
            validated_feedback.read(FEATURE_COLUMNS), config.event_weights, max_events_per_minute=config.bot_events_per_minute,
            sustained_minutes=config.bot_sustained_minutes, session_gap_s=config.session_gap_s)
    except ValueError as exc:
        raise dg.Failure(str(exc)) from exc
    users, items = features.users, features.items
    bots = users[users["bot_like"]]
    bot_share = float(bots["events"].sum() / users["events"].sum()) if len(users) else 0.0
    if len(bots):
        context.log.warning(f"{len(bots)} bot-like users produce {bot_share:.1%} of events (flagged, kept)")
    return dg.Output(
        features,
        metadata={
            "users": len(users),
            "items": len(items),
            "bot_like_users": len(bots),
            "bot_like_event_share": bot_share,
            "bot_like_examples": dg.MetadataValue.json(
                bots.nlargest(5, "peak_events_per_minute")[["user_id", "peak_events_per_minute", "busy_minutes"]]
                .astype({"user_id": str}).to_dict("records")),
            "event_weights": dg.MetadataValue.json(features.weights),
            "as_of": features.as_of,
            "median_events_per_user": float(users["events"].median()) if len(users) else 0.0,
            "top_items": _preview(items.nlargest(5, "weighted_popularity")[["item_id", "events", "users", "weighted_popularity"]]),
        },
    )
