"""Feedback in: landing zone → raw feedback → validated feedback, plus the item catalog."""


import json

import dagster as dg
import pandas as pd

from rec_pipelines.resources import LakeResource
from rec_pipelines.validation import run_expectations, split_valid_rows

GROUP = "ingestion"


def _preview(frame: pd.DataFrame, rows: int = 5) -> dg.MetadataValue:
    return dg.MetadataValue.md(frame.head(rows).to_markdown(index=False) if len(frame) else "_empty_")


@dg.asset(group_name=GROUP, kinds={"pandas"})
def item_catalog(context: dg.AssetExecutionContext, lake: LakeResource) -> dg.Output[pd.DataFrame]:
    """Every known item with its text fields; catalog files in the landing zone add or change items."""
    store = lake.store()
    report = store.ingest("catalog")
    catalog = store.catalog()
    context.log.info(f"catalog: {len(catalog)} items ({report.rows_in} rows from {len(report.batches)} new files)")
    return dg.Output(
        catalog,
        metadata={
            "items": len(catalog),
            "new_rows": report.rows_in,
            "new_files": report.batches,
            "quarantined_files": dg.MetadataValue.json(report.quarantined_files),
            "categories": int(catalog["category"].nunique()),
            "preview": _preview(catalog[["item_id", "title", "category"]]),
        },
    )


@dg.asset(group_name=GROUP, kinds={"pandas"})
def raw_feedback(context: dg.AssetExecutionContext, lake: LakeResource) -> dg.Output[pd.DataFrame]:
    """Every feedback event ever ingested, tagged with its batch id. Ingests new landing files
    exactly once (content-hash ledger); unreadable files are quarantined whole."""
    store = lake.store()
    report = store.ingest("events")
    for bad in report.quarantined_files:
        context.log.warning(f"quarantined file {bad['file']}: {bad['reason']}")
    events = store.read("events")
    context.log.info(f"ingested {report.rows_in} rows from {len(report.batches)} new files; {len(events)} rows in all")
    return dg.Output(
        events,
        metadata={
            "rows": len(events),
            "new_rows": report.rows_in,
            "new_batches": dg.MetadataValue.json(report.batches),
            "batches": len(store.batches("events")),
            "duplicate_files": dg.MetadataValue.json(report.duplicate_files),
            "quarantined_files": dg.MetadataValue.json(report.quarantined_files),
            "preview": _preview(events),
        },
    )


@dg.asset(group_name=GROUP, kinds={"pandas"})
def validated_feedback(
    context: dg.AssetExecutionContext, lake: LakeResource, raw_feedback: pd.DataFrame
) -> dg.Output[pd.DataFrame]:
    """Events that pass the row rules. Bad rows go to the quarantine store with a reason per
    row; nothing is dropped silently (rows_in = rows_valid + rows_quarantined)."""
    valid, quarantined = split_valid_rows(raw_feedback)
    if len(valid) + len(quarantined) != len(raw_feedback):
        raise dg.Failure("row accounting broken: rows_in != rows_valid + rows_quarantined")
    store = lake.store()
    for batch_id, rows in quarantined.groupby("batch_id", sort=False):
        store.write_quarantined_rows(str(batch_id), rows)
    reasons = quarantined["reason"].value_counts().to_dict()
    if reasons:
        context.log.warning(f"quarantined {len(quarantined)} rows: {reasons}")
    return dg.Output(
        valid.reset_index(drop=True),
        metadata={
            "rows_in": len(raw_feedback),
            "rows_valid": len(valid),
            "rows_quarantined": len(quarantined),
            "quarantine_reasons": dg.MetadataValue.json({str(k): int(v) for k, v in reasons.items()}),
            "users": int(valid["user_id"].nunique()),
            "items": int(valid["item_id"].nunique()),
            "event_types": dg.MetadataValue.json(
                {str(k): int(v) for k, v in valid["event_type"].value_counts().items()}
            ),
        },
    )


@dg.asset_check(asset=validated_feedback, blocking=True, description="Great Expectations suite over validated feedback")
def feedback_expectations(validated_feedback: pd.DataFrame) -> dg.AssetCheckResult:
    success, results = run_expectations(validated_feedback)
    failed = [r for r in results if not r["success"]]
    return dg.AssetCheckResult(
        passed=success,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={
            "expectations": len(results),
            "failed": len(failed),
            "results": dg.MetadataValue.json(results),
            "failing_examples": dg.MetadataValue.md(
                "\n".join(f"- `{r['expectation']}` on {r['column']}: {r['unexpected_count']} rows, e.g. {r['examples']}"
                          for r in failed) or "_none_"
            ),
        },
    )


@dg.asset_check(asset=validated_feedback, additional_ins={"item_catalog": dg.AssetIn()},
                description="Share of events whose item has no catalog entry yet (kept, reported)")
def events_with_catalog_entry(validated_feedback: pd.DataFrame, item_catalog: pd.DataFrame) -> dg.AssetCheckResult:
    unknown = ~validated_feedback["item_id"].isin(item_catalog["item_id"])
    share = float(unknown.mean()) if len(unknown) else 0.0
    return dg.AssetCheckResult(
        passed=share <= 0.05,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"share_without_catalog_entry": share,
                  "examples": dg.MetadataValue.json(validated_feedback.loc[unknown, "item_id"].drop_duplicates().head(5).tolist())},
    )
