"""The model registry: MLflow access (``mlflow_registry``) and the promotion gate (``gate``)."""

from rec_pipelines.registry.gate import (
    MIN_COLD_USERS,
    NDCG_TOLERANCE,
    PRIMARY_METRIC,
    PromotionDecision,
    decide_promotion,
    metric_key,
)
from rec_pipelines.registry.mlflow_registry import (
    BATCHES_ARTIFACT,
    CHALLENGER,
    CHAMPION,
    SIGNATURE,
    MlflowEpochMetrics,
    ModelRegistry,
    RollbackError,
    batch_tags,
    pip_requirements,
)

__all__ = ["BATCHES_ARTIFACT", "CHALLENGER", "CHAMPION", "MIN_COLD_USERS", "NDCG_TOLERANCE", "PRIMARY_METRIC", "SIGNATURE", "MlflowEpochMetrics", "ModelRegistry",
           "PromotionDecision", "RollbackError", "batch_tags", "decide_promotion", "metric_key", "pip_requirements"]
