"""Online metrics: impressions from ``recsys serve`` joined with the feedback that followed
them (``rec_pipelines.online``), per model version and arm; and the optional online gate that
promotes a challenger only when it is not worse online with enough impressions."""

import dagster as dg
import pandas as pd
from pydantic import Field

from rec_pipelines.defs.resources import LakeResource, MlflowResource, ServingResource
from rec_pipelines.online import (
    CLICK_TYPES,
    attribute,
    challenger_not_worse,
    interleaving_wins,
    online_figure,
    summarize,
)
from rec_pipelines.plots import figure_to_md
from rec_pipelines.registry.gate import PromotionDecision

GROUP = "online"


class OnlineMetricsConfig(dg.Config):
    window_s: int = Field(default=3600, description="attribution window: feedback this long after a list counts for it")
    bucket_s: int = Field(default=3600, description="width of the time windows the metrics are reported in")
    click_event_types: list[str] = Field(default=list(CLICK_TYPES), description="event types that count as a click")


@dg.asset(group_name=GROUP, kinds={"pandas", "mlflow"}, deps=["validated_feedback"])
def online_metrics(context: dg.AssetExecutionContext, config: OnlineMetricsConfig, lake: LakeResource,
                   mlflow: MlflowResource) -> dg.Output[pd.DataFrame]:
    """Ingests new impression files, attributes validated feedback to the served lists, and
    reports CTR@k, conversion and MRR per model version, arm and time window (95 %
    intervals); each version's totals are logged to its MLflow run and tagged on the version."""
    store = lake.store()
    report = store.ingest("impressions")
    impressions = store.read("impressions")
    if not len(impressions):
        return dg.Output(pd.DataFrame(), metadata={"lists": 0, "note": "no impressions yet (is recsys serve running?)"})
    events = store.read_validated()
    lists = attribute(impressions, events, config.window_s, tuple(config.click_event_types))
    interleaved = interleaving_wins(impressions, events, config.window_s, tuple(config.click_event_types))
    table = summarize(lists, config.bucket_s)
    totals = summarize(lists, None)
    registry = mlflow.registry()
    for row in totals.itertuples():
        try:
            version = registry.client.get_model_version(registry.model_name, row.model_version)
        except Exception:  # noqa: BLE001 - a version of another store or model: report, do not log
            continue
        for name in ("ctr", "conversion", "mrr", "lists"):
            registry.client.log_metric(version.run_id, f"online_{name}", float(getattr(row, name)))
            registry.client.set_model_version_tag(registry.model_name, row.model_version, f"online_{name}",
                                                  f"{float(getattr(row, name)):.6g}")
    shown = totals[["model_version", "arm", "lists", "ctr", "ctr_lo", "ctr_hi", "conversion", "mrr"]]
    context.log.info(f"online metrics:\n{shown}")
    return dg.Output(lists, metadata={
        "lists": len(lists),
        "new_impression_files": len(report.batches),
        "quarantined_impression_files": dg.MetadataValue.json(report.quarantined_files),
        "totals": dg.MetadataValue.md(shown.to_markdown(index=False, floatfmt=".4f")),
        "interleaving": dg.MetadataValue.json(interleaved),
        "ctr_plot": dg.MetadataValue.md(figure_to_md(online_figure(table), alt="online CTR per model version")),
    })


class OnlineGateConfig(dg.Config):
    require_online: bool = Field(default=False, description="promote the challenger only on online evidence "
                                 "(the offline gate of champion_model stays the default)")
    min_lists: int = Field(default=1000, description="served lists each arm needs before a decision")
    significance_z: float = Field(default=1.645, description="one-sided z below which the challenger is worse")


@dg.asset(group_name=GROUP, kinds={"mlflow"})
def online_promotion(context: dg.AssetExecutionContext, config: OnlineGateConfig, online_metrics: pd.DataFrame,
                     mlflow: MlflowResource, serving: ServingResource) -> dg.Output[dict]:
    """With ``require_online``: promotes ``challenger`` to ``champion`` when it served enough
    lists and its CTR is not significantly below the champion's; the reason is tagged on the
    version. Without it, reports the comparison only."""
    registry = mlflow.registry()
    champion, challenger = registry.version_by_alias("champion"), registry.version_by_alias("challenger")
    if champion is None or challenger is None or champion.version == challenger.version or not len(online_metrics):
        return dg.Output({"decision": None}, metadata={"note": "no distinct challenger with impressions to compare"})
    verdict, reason = challenger_not_worse(online_metrics, champion.version, challenger.version, config.min_lists,
                                           config.significance_z)
    promoted = bool(config.require_online and verdict)
    if promoted:
        registry.apply_decision(challenger.version, PromotionDecision(True, f"online gate: {reason}", {}, None))
        serving.notify(context.log)
    context.log.info(f"challenger {challenger.version} vs champion {champion.version}: {reason}"
                     + (" -> PROMOTED" if promoted else ""))
    return dg.Output({"decision": verdict, "promoted": promoted, "reason": reason},
                     metadata={"challenger": challenger.version, "champion": champion.version, "reason": reason,
                               "promoted": promoted, "require_online": config.require_online})


online_metrics_job = dg.define_asset_job("online_metrics_job", selection=[online_metrics, online_promotion],
                                         description="Online metrics from impressions and the optional online gate.")
online_metrics_schedule = dg.ScheduleDefinition(name="online_metrics_schedule", job=online_metrics_job,
                                                cron_schedule="*/15 * * * *",
                                                default_status=dg.DefaultScheduleStatus.STOPPED)
