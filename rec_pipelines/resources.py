"""Small Dagster resources: thin, configurable handles on the lake, the encoder and MLflow."""

from __future__ import annotations

from functools import lru_cache

import dagster as dg

from rec_pipelines.feedback_store import FeedbackStore
from rec_pipelines.registry import ModelRegistry


class LakeResource(dg.ConfigurableResource):
    """Where feedback lands and where ingested data lives."""

    landing_zone: str
    lake: str

    def store(self) -> FeedbackStore:
        return FeedbackStore(self.landing_zone, self.lake)


class TextEncoderResource(dg.ConfigurableResource):
    """A transformers sentence encoder; empty ``model_path`` means the bundled all-MiniLM-L6-v2."""

    model_path: str = ""
    batch_size: int = 64

    def encoder(self):
        return _load_encoder(self.model_path or None, self.batch_size)


@lru_cache(maxsize=2)
def _load_encoder(model_path: str | None, batch_size: int):
    from rec_models.text import TextEncoder  # transformers import is slow: only when needed

    return TextEncoder(model_path, batch_size=batch_size)


class MlflowResource(dg.ConfigurableResource):
    """MLflow tracking + registry for one registered model."""

    tracking_uri: str
    artifact_root: str
    model_name: str

    def registry(self) -> ModelRegistry:
        return ModelRegistry(self.tracking_uri, self.artifact_root, self.model_name)
