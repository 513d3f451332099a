"""MLflow access for one registered model: experiments and runs, logging the served model
(models-from-code with its code and pinned requirements), versions, aliases (``champion`` /
``challenger``, never stages), rollback."""

from __future__ import annotations

import importlib.metadata
import json
import tempfile
import time
from pathlib import Path

import lightning as L
import pandas as pd
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository
from mlflow.types import ColSpec, DataType, Schema
from mlflow.types.schema import AnyType, Array

import mlflow
from mlflow import MlflowClient
from rec_models.models import HybridRecommender
from rec_models.serving import ENCODER_DIR
from rec_pipelines.registry.gate import PromotionDecision, metric_key
from rec_pipelines.settings import artifact_root_uri

CHAMPION, CHALLENGER = "champion", "challenger"

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
BATCHES_ARTIFACT = "batches.json"
"""Each training run's record of the batches it was trained on ({"batches", "new_batches"}): an
artifact, not a version tag, since the list grows with every batch and a tag holds at most
100,000 characters (about 3,000 batch ids, two days of a micro-batch a minute)."""


def batch_tags(batches: list[str], new_batches: list[str]) -> dict[str, str]:
    """Version tags that summarise the batches (the full lists are the run's ``BATCHES_ARTIFACT``)."""
    return {"batches.count": str(len(batches)), "batches.last": batches[-1] if batches else "",
            "new_batches.count": str(len(new_batches)), "new_batches.last": new_batches[-1] if new_batches else ""}


SERVING_PACKAGES = ["mlflow", "torch", "lightning", "pandas", "pyarrow", "numpy", "pydantic", "pydantic-settings"]
TEXT_ENCODER_PACKAGES = ["transformers", "tokenizers", "safetensors"]  # bundles that carry the encoder
MODEL_CODE = Path(__file__).resolve().parents[2] / "rec_models" / "serving" / "pyfunc_model.py"
MODEL_PACKAGE = MODEL_CODE.parents[1]  # rec_models: travels with the model as code_paths


def pip_requirements(text_encoder: bool = False) -> list[str]:
    """Exact pins of what the served model needs (torch without a local build label, so the
    requirement resolves anywhere; the CPU build satisfies it too)."""
    names = SERVING_PACKAGES + (TEXT_ENCODER_PACKAGES if text_encoder else [])
    return [f"{name}=={importlib.metadata.version(name).split('+')[0]}" for name in names]

class RollbackError(RuntimeError):
    """Raised when there is no earlier champion to go back to."""


class ModelRegistry:
    """A small façade over MlflowClient for one registered model."""

    def __init__(self, tracking_uri: str, artifact_root: Path | str, model_name: str):
        self.tracking_uri = tracking_uri
        self.artifact_root = str(artifact_root)  # a folder, a URL (s3://...), or "" (the tracking server's)
        self.model_name = model_name
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)

    def experiment_id(self) -> str:
        """One experiment per model, created on first use with artifacts under artifact_root."""
        experiment = self.client.get_experiment_by_name(self.model_name)
        if experiment is not None:
            return experiment.experiment_id
        return self.client.create_experiment(self.model_name, artifact_location=self.artifact_location())

    def artifact_location(self) -> str | None:
        """Where a new experiment keeps its artifacts: ``<root>/<model name>`` (a local folder as
        a file URI, created), or None to leave it to the tracking server."""
        root = artifact_root_uri(self.artifact_root)
        if root is not None and root.startswith("file://"):
            Path(self.artifact_root.removeprefix("file://")).mkdir(parents=True, exist_ok=True)
        return None if root is None else f"{root}/{self.model_name}"

    def start_run(self, run_name: str, tags: dict[str, str] | None = None):
        mlflow.set_tracking_uri(self.tracking_uri)
        return mlflow.start_run(experiment_id=self.experiment_id(), run_name=run_name, tags=tags)

    @staticmethod
    def log_recommender(bundle_dir: Path, input_example: pd.DataFrame):
        """Log the bundle as a pyfunc model in the active run; returns the ModelInfo.

        Models-from-code: the model is ``rec_models/pyfunc_model.py`` and the ``rec_models``
        package travels in ``code_paths``, so loading it needs only the pip requirements,
        not this project."""
        try:
            return mlflow.pyfunc.log_model(
                name="model",
                python_model=str(MODEL_CODE),
                code_paths=[str(MODEL_PACKAGE)],
                artifacts={"bundle": str(bundle_dir)},
                signature=SIGNATURE,
                input_example=input_example,
                pip_requirements=pip_requirements(text_encoder=(Path(bundle_dir) / ENCODER_DIR).is_dir()),
            )
        finally:
            # MLflow keeps the last models-from-code object it ran in a module global: here the
            # served model it loaded to check the input example (0.7 GB at 10M events), which
            # the run that trained it would otherwise carry to its end.
            mlflow.models.model.__mlflow_model__ = None

    def version_by_alias(self, alias: str):
        try:
            return self.client.get_model_version_by_alias(self.model_name, alias)
        except MlflowException:
            return None

    def training_record(self, version) -> dict:
        """What model ``version`` was trained on: its run's ``BATCHES_ARTIFACT`` ({"batches"
        in ingestion order, "new_batches", "validated_at": batch -> when it was last validated
        then}); versions registered before it existed kept the batches in their ``batches`` tag."""
        if "batches" in version.tags:
            return {"batches": json.loads(version.tags["batches"]), "new_batches": [], "validated_at": {}}
        with tempfile.TemporaryDirectory(prefix="recsys-batches-") as folder:
            path = self.client.download_artifacts(version.run_id, BATCHES_ARTIFACT, folder)
            return json.loads(Path(path).read_text())

    def trained_batches(self, version) -> list[str]:
        """The batches model ``version`` was trained on, in ingestion order."""
        return self.training_record(version)["batches"]

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

    def download_bundle(self, alias: str = CHAMPION, dst: Path | None = None, model_uri: str | None = None) -> Path | None:
        """Local folder of the bundle behind ``alias`` (None when the alias is not set), or of
        the logged model ``model_uri``."""
        if model_uri is None:
            version = self.version_by_alias(alias)
            if version is None:
                return None
            model_uri = f"models:/{self.model_name}/{version.version}"
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst) if dst else None))
        return _bundle_in(local)

    def load_recommender(self, alias: str = CHAMPION, model_uri: str | None = None) -> HybridRecommender:
        """The recommender behind ``alias`` (KeyError when no version has it, e.g. removed
        meanwhile), or of the logged model ``model_uri``. Read in place when the artifact store
        is this machine's file system (at 10M events a bundle is ~200 MB: a copy cost ~1 s per
        load), else from a download into a temporary folder that is removed afterwards (one per
        run would fill the disk)."""
        if model_uri is None:
            version = self.version_by_alias(alias)
            if version is None:
                raise KeyError(f"no model version has the alias {alias!r}")
            model_uri = f"models:/{self.model_name}/{version.version}"
        local = local_artifacts(model_uri)
        if local is not None:
            return HybridRecommender.load(_bundle_in(local))
        with tempfile.TemporaryDirectory(prefix="recsys-bundle-") as folder:
            return HybridRecommender.load(self.download_bundle(dst=Path(folder), model_uri=model_uri))


def local_artifacts(model_uri: str) -> Path | None:
    """The folder holding the files of the logged model ``model_uri`` when its artifact store
    is a local folder (None: a remote store, e.g. S3, to download from)."""
    repository = get_artifact_repository(model_uri)
    repository = getattr(repository, "repo", repository)  # models:/ and runs:/ resolve to the store's repository
    return Path(repository.artifact_dir) if isinstance(repository, LocalArtifactRepository) else None


def _bundle_in(model_dir: Path) -> Path:
    """The bundle folder inside a pyfunc model's folder (its ``bundle`` artifact)."""
    flavor = Model.load(str(model_dir / "MLmodel")).flavors["python_function"]
    return model_dir / flavor["artifacts"]["bundle"]["path"]


class MlflowEpochMetrics(L.Callback):
    """Logs every epoch's validation/training metrics to the MLflow run active when it was made,
    as they happen. Under multi-process training (``ddp_spawn``) the callback travels to every
    rank, where no run is active: it logs by run id, from rank 0 only."""

    def __init__(self):
        run = mlflow.active_run()
        self.run_id = run.info.run_id if run else None
        self.tracking_uri = mlflow.get_tracking_uri()

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or self.run_id is None:
            return
        metrics = {metric_key(k): float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        if metrics:
            MlflowClient(tracking_uri=self.tracking_uri).log_batch(
                self.run_id, [Metric(k, v, int(time.time() * 1000), trainer.current_epoch) for k, v in metrics.items()])

