"""Registry actions that are not assets: rolling the champion back from the UI."""

import dagster as dg

from rec_pipelines.defs.resources import MlflowResource


class RollbackConfig(dg.Config):
    reason: str = "rollback from the Dagster UI"


@dg.op(description="Point the champion alias back at the version it replaced.")
def restore_previous_champion(context: dg.OpExecutionContext, config: RollbackConfig, mlflow: MlflowResource) -> dict:
    old, new = mlflow.registry().rollback(config.reason)
    context.log.info(f"champion rolled back from version {old} to {new}: {config.reason}")
    context.add_output_metadata({"from_version": old, "to_version": new, "reason": config.reason})
    return {"from_version": old, "to_version": new}


@dg.job(description="Restore the previous champion (same as `recsys rollback`).")
def rollback_champion_job():
    restore_previous_champion()
