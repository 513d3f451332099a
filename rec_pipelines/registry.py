"""MLflow tracking and the model registry: experiments, model logging, the promotion gate.

The registry uses aliases, never the deprecated stages: every registered version gets
``challenger``; it becomes ``champion`` only when it is not worse than the current champion on
the same held-out data. The decision, the numbers and the reason are written as tags on the
model version, and serving always loads ``models:/<name>@champion``.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.types import ColSpec, DataType, Schema
from mlflow.types.schema import AnyType, Array

from rec_models.serving import ENCODER_DIR

CHAMPION, CHALLENGER = "champion", "challenger"
PRIMARY_METRIC = "ndcg@10"

SIGNATURE = ModelSignature(
    inputs=Schema([
        ColSpec(DataType.string, "user_id"),
        # Any: the pyfunc validates these itself (rec_models.serving.parse_requests), so a row
        # may leave any of them out and a bad value gets a clear HTTP 400. Typed columns would
        # make MLflow truncate k=2.5 to 2, turn ["i1", null] into ["i", "n"], and reject
        # requests where only some rows carry the field.
        ColSpec(AnyType(), "recent_item_ids", required=False),  # list of item ids, newest last
        ColSpec(AnyType(), "k", required=False),  # integer in 1..MAX_K, default 10
        ColSpec(AnyType(), "exclude", required=False),  # list of item ids never to recommend
        ColSpec(AnyType(), "diversity", required=False),  # MMR diversity 0..1 (0 = off), default: the model's
        ColSpec(AnyType(), "context_text", required=False),  # stated interests of a user without history
    ]),
    outputs=Schema([
        ColSpec(DataType.string, "user_id"),
        ColSpec(DataType.long, "rank"),
        ColSpec(DataType.string, "item_id"),
        ColSpec(DataType.double, "score"),
        ColSpec(DataType.string, "title"),
        ColSpec(DataType.string, "explanation"),
        ColSpec(Array(DataType.string), "warnings"),
    ]),
)
# What the pyfunc imports at load time (rec_models' serving path), pinned to the versions it
# was trained with; given explicitly so MLflow does not re-import the model to infer them.
SERVING_PACKAGES = ["mlflow", "torch", "lightning", "pandas", "pyarrow", "numpy", "pydantic", "pydantic-settings"]
TEXT_ENCODER_PACKAGES = ["transformers", "tokenizers", "safetensors"]  # bundles that carry the encoder
MODEL_CODE = Path(__file__).resolve().parents[1] / "rec_models" / "pyfunc_model.py"


def pip_requirements(text_encoder: bool = False) -> list[str]:
    """Exact pins of what the served model needs (torch without a local build label, so the
    requirement resolves anywhere; the CPU build satisfies it too)."""
    names = SERVING_PACKAGES + (TEXT_ENCODER_PACKAGES if text_encoder else [])
    return [f"{name}=={importlib.metadata.version(name).split('+')[0]}" for name in names]


def metric_key(name: str) -> str:
    """MLflow names cannot hold '@': ``ndcg@10`` is logged as ``ndcg_at_10``."""
    return name.replace("@", "_at_")


@dataclass
class PromotionDecision:
    promoted: bool
    reason: str
    candidate: dict
    champion: dict | None
    paired: dict | None = None  # evaluation.paired_difference of per-user NDCG@10

    def tags(self) -> dict[str, str]:
        tags = {"promotion.decision": "promoted" if self.promoted else "rejected", "promotion.reason": self.reason}
        for key, value in (self.paired or {}).items():
            tags[f"paired.ndcg_{key}"] = f"{value:.6g}"
        for key, value in self.candidate.items():
            tags[f"candidate.{metric_key(key)}"] = f"{value:.6g}"
        for key, value in (self.champion or {}).items():
            tags[f"champion.{metric_key(key)}"] = f"{value:.6g}"
        return tags


def decide_promotion(
    candidate: dict,
    champion: dict | None,
    tolerance: float = 0.002,
    coverage_tolerance: float = 0.2,
    cold_tolerance: float = 0.01,
    min_cold_users: int = 20,
    paired: dict | None = None,
    significance_z: float = 1.645,
    max_relative_shortfall: float = 0.1,
) -> PromotionDecision:
    """The gate. ``candidate``/``champion`` hold protocol metrics on the same held-out data.

    Promote when NDCG@10 is not worse than the champion's beyond ``tolerance`` (absolute) and
    the guard metrics did not regress: coverage@10 may lose at most ``coverage_tolerance``
    (relative), and NDCG@10 on the cold-start users (test item unseen in training; counted only
    when at least ``min_cold_users`` of them) at most ``cold_tolerance`` (absolute).

    ``paired`` (``evaluation.paired_difference`` of the two models' per-user NDCG@10) makes the
    NDCG rule noise-aware: a shortfall beyond ``tolerance`` rejects the candidate only when it
    is also significant, i.e. ``diff + significance_z * se < 0`` (one-sided, 95 % by default).
    On a few thousand users the NDCG of two equally good models differs by about as much as
    the tolerance, so without this a fine-tune would be rejected at random; a truly worse model
    (e.g. a degraded one) is still rejected. Noise never excuses more than
    ``max_relative_shortfall`` (10 % of the champion's NDCG): on a small held-out set nothing is
    significant, and a model that much worse is not promoted on a shrug. ``significance_z = 0``
    restores the plain rule.
    """
    decision = _decide(candidate, champion, tolerance, coverage_tolerance, cold_tolerance, min_cold_users,
                       paired, significance_z, max_relative_shortfall)
    decision.paired = paired if champion is not None else None
    return decision


def _decide(candidate, champion, tolerance, coverage_tolerance, cold_tolerance, min_cold_users, paired,
            significance_z, max_relative_shortfall) -> PromotionDecision:
    if champion is None:
        return PromotionDecision(True, "no champion yet", candidate, None)
    new, old = candidate[PRIMARY_METRIC], champion[PRIMARY_METRIC]
    noise = ""
    if new < old - tolerance:
        excusable = (paired is not None and significance_z > 0 and new >= old * (1 - max_relative_shortfall)
                     and paired["diff"] + significance_z * paired["se"] >= 0)
        if not excusable:
            significance = (f"; paired difference {paired['diff']:+.4f} ± {paired['se']:.4f} over {paired['users']} users"
                            if paired else "")
            return PromotionDecision(
                False, f"{PRIMARY_METRIC} {new:.4f} is worse than champion {old:.4f} beyond tolerance {tolerance}"
                f"{significance}", candidate, champion)
        noise = (f" (shortfall not significant: paired difference {paired['diff']:+.4f} ± {paired['se']:.4f}, "
                 f"z {significance_z})")
    cov_new, cov_old = candidate.get("coverage@10", 0.0), champion.get("coverage@10", 0.0)
    if cov_new < cov_old * (1 - coverage_tolerance):
        return PromotionDecision(
            False, f"coverage@10 {cov_new:.4f} fell more than {coverage_tolerance:.0%} below champion {cov_old:.4f}",
            candidate, champion)
    cold_users = min(candidate.get("cold_users", 0), champion.get("cold_users", 0))
    if cold_users >= min_cold_users:
        cold_new, cold_old = candidate["cold_ndcg@10"], champion["cold_ndcg@10"]
        if cold_new < cold_old - cold_tolerance:
            return PromotionDecision(
                False, f"cold-start ndcg@10 {cold_new:.4f} is worse than champion {cold_old:.4f} "
                f"beyond tolerance {cold_tolerance} ({cold_users} cold users)", candidate, champion)
    return PromotionDecision(
        True, f"{PRIMARY_METRIC} {new:.4f} vs champion {old:.4f} (tolerance {tolerance}){noise}; guard metrics passed",
        candidate, champion)


class RollbackError(RuntimeError):
    """Raised when there is no earlier champion to go back to."""


class ModelRegistry:
    """A small façade over MlflowClient for one registered model."""

    def __init__(self, tracking_uri: str, artifact_root: Path | str, model_name: str):
        self.tracking_uri = tracking_uri
        self.artifact_root = Path(artifact_root)
        self.model_name = model_name
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)

    def experiment_id(self) -> str:
        """One experiment per model, created on first use with artifacts under artifact_root."""
        experiment = self.client.get_experiment_by_name(self.model_name)
        if experiment is not None:
            return experiment.experiment_id
        self.artifact_root.mkdir(parents=True, exist_ok=True)
        return self.client.create_experiment(
            self.model_name, artifact_location=(self.artifact_root / self.model_name).resolve().as_uri()
        )

    def start_run(self, run_name: str, tags: dict[str, str] | None = None):
        mlflow.set_tracking_uri(self.tracking_uri)
        return mlflow.start_run(experiment_id=self.experiment_id(), run_name=run_name, tags=tags)

    @staticmethod
    def log_recommender(bundle_dir: Path, input_example: pd.DataFrame):
        """Log the bundle as a pyfunc model in the active run; returns the ModelInfo.

        Models-from-code: the model is ``rec_models/pyfunc_model.py`` and the ``rec_models``
        package travels in ``code_paths``, so loading it needs only the pip requirements,
        not this project."""
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=str(MODEL_CODE),
            code_paths=[str(MODEL_CODE.parent)],
            artifacts={"bundle": str(bundle_dir)},
            signature=SIGNATURE,
            input_example=input_example,
            pip_requirements=pip_requirements(text_encoder=(Path(bundle_dir) / ENCODER_DIR).is_dir()),
        )

    def version_by_alias(self, alias: str):
        try:
            return self.client.get_model_version_by_alias(self.model_name, alias)
        except MlflowException:
            return None

    def register(self, model_uri: str, run_id: str, tags: dict[str, str]):
        try:
            self.client.get_registered_model(self.model_name)
        except MlflowException:
            self.client.create_registered_model(
                self.model_name, description="Sequential recommender (SASRec + LLM text embeddings)."
            )
        version = self.client.create_model_version(self.model_name, model_uri, run_id=run_id, tags=tags)
        self.client.set_registered_model_alias(self.model_name, CHALLENGER, version.version)
        return version

    def apply_decision(self, version: str, decision: PromotionDecision) -> None:
        for key, value in decision.tags().items():
            self.client.set_model_version_tag(self.model_name, version, key, value)
        if decision.promoted:
            previous = self.version_by_alias(CHAMPION)
            if previous is not None:
                self.client.set_model_version_tag(self.model_name, version, "previous_champion", str(previous.version))
            self.client.set_registered_model_alias(self.model_name, CHAMPION, version)

    def rollback(self, reason: str) -> tuple[str, str]:
        """Point ``champion`` back at the version it replaced; returns (from, to) versions."""
        current = self.version_by_alias(CHAMPION)
        if current is None:
            raise RollbackError(f"model {self.model_name!r} has no champion")
        previous = current.tags.get("previous_champion")
        if not previous:
            raise RollbackError(f"champion version {current.version} has no previous champion to restore")
        self.client.set_registered_model_alias(self.model_name, CHAMPION, previous)
        self.client.set_model_version_tag(self.model_name, str(current.version), "rolled_back", reason)
        self.client.set_model_version_tag(self.model_name, previous, "restored_by_rollback_from", str(current.version))
        return str(current.version), previous

    def download_bundle(self, alias: str = CHAMPION, dst: Path | None = None) -> Path | None:
        """Local folder of the bundle behind ``alias`` (None when the alias is not set)."""
        version = self.version_by_alias(alias)
        if version is None:
            return None
        local = Path(mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{self.model_name}/{version.version}", dst_path=str(dst) if dst else None
        ))
        flavor = Model.load(str(local / "MLmodel")).flavors["python_function"]
        return local / flavor["artifacts"]["bundle"]["path"]


class MlflowEpochMetrics(L.Callback):
    """Logs every epoch's validation/training metrics to the active MLflow run as they happen."""

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = {metric_key(k): float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        if metrics:
            mlflow.log_metrics(metrics, step=trainer.current_epoch)
