"""The resources: small, configurable handles on the lake, the text encoder and MLflow, bound
to the environment decided in ``rec_pipelines.settings``."""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Optional

import dagster as dg

from rec_models.allocator import keep_freed_memory
from rec_pipelines.lake import FeedbackStore, IngestLimits, StaleLakeTable
from rec_pipelines.registry import ModelRegistry
from rec_pipelines.settings import Settings

ASSET_STORE = "assets"
USER_TABLE_POOL = "recsys_user_table"
"""The steps that rebuild the per-user table from the validated batches (``training_data``) or
change a validated batch (``event_batch`` re-validation): one at a time across all runs, so a
build never reads a batch while it is being replaced (dagster.yaml: every pool has one slot)."""
"""The lake folder the IO manager keeps asset values in (``<lake>/assets/<asset name>``)."""


class LakeResource(dg.ConfigurableResource):
    """Where feedback lands, where ingested data lives (a folder or an fsspec URL), which file
    keeps the pseudonym key (empty: ``<lake>/secrets/pseudonym.key`` for a local lake, else
    ``$RECSYS_PSEUDONYM_KEY``), what locks the lake and the local work folder (empty: see
    ``FeedbackStore``)."""

    landing_zone: str
    lake: str
    pseudonym_key_file: str = ""
    lock: str = ""
    work: str = ""
    max_file_bytes: int = IngestLimits.max_file_bytes
    max_line_bytes: int = IngestLimits.max_line_bytes

    def store(self) -> FeedbackStore:
        return FeedbackStore(self.landing_zone, self.lake, key_file=self.pseudonym_key_file or None,
                             lock=self.lock, work=self.work or None,
                             limits=IngestLimits(self.max_file_bytes, self.max_line_bytes))


class TextEncoderResource(dg.ConfigurableResource):
    """A transformers sentence encoder (``rec_models.text.TextEncoder``).

    Empty ``model_path`` means the bundled all-MiniLM-L6-v2 (``RECSYS_TEXT_MODEL`` sets it);
    ``max_length`` 0 means the model's own limit; empty ``device`` picks cuda when present,
    else cpu; ``bf16`` None decides by hardware (native bf16 CPUs and GPUs).
    """

    model_path: str = ""
    batch_size: int = 256
    max_batch_tokens: int = 4096
    max_length: int = 0
    device: str = ""
    bf16: Optional[bool] = None

    def encoder(self):
        return _load_encoder(
            self.model_path or None, self.batch_size, self.max_batch_tokens, self.max_length or None,
            self.device or None, self.bf16,
        )


@lru_cache(maxsize=2)
def _load_encoder(model_path: str | None, batch_size: int, max_batch_tokens: int, max_length: int | None,
                  device: str | None, bf16: bool | None):
    from rec_models.text import (
        TextEncoder,  # transformers import is slow: only when needed
    )

    return TextEncoder(model_path, batch_size=batch_size, max_batch_tokens=max_batch_tokens,
                       max_length=max_length, device=device, bf16=bf16)


class MlflowResource(dg.ConfigurableResource):
    """MLflow tracking + registry for one registered model."""

    tracking_uri: str
    artifact_root: str
    model_name: str

    def registry(self) -> ModelRegistry:
        return ModelRegistry(self.tracking_uri, self.artifact_root, self.model_name)


class ServingResource(dg.ConfigurableResource):
    """The ``recsys serve`` processes to tell of a new champion (comma-separated base URLs)."""

    urls: str = ""

    def notify(self, log) -> dict[str, str]:
        """``POST <url>/reload`` to each server, so it loads the alias' new version now (within
        a second) instead of at its next poll; a server that does not answer is logged, not an
        error (it still polls)."""
        import urllib.request

        answers = {}
        for url in [u.strip().rstrip("/") for u in self.urls.split(",") if u.strip()]:
            try:
                with urllib.request.urlopen(urllib.request.Request(f"{url}/reload", method="POST"), timeout=10) as reply:
                    answers[url] = f"serving version {json.loads(reply.read()).get('version')}"
            except (OSError, ValueError) as error:
                log.warning(f"could not tell {url} of the new champion ({error}); it will find it by polling")
                answers[url] = f"unreachable: {error}"
        return answers


@dg.definitions
def resources() -> dg.Definitions:
    settings = Settings.from_env()
    settings.apply_umask()  # any process that loads the code creates private files
    keep_freed_memory()  # and reuses the memory of freed score tensors (see rec_models.allocator)
    return dg.Definitions(
        # One process per run: on a laptop, paying the torch/transformers import once per run
        # beats a process per step.
        executor=dg.in_process_executor,
        resources={
            "lake": LakeResource(landing_zone=settings.landing_location, lake=str(settings.lake),
                                 pseudonym_key_file=str(settings.pseudonym_key_file or ""),
                                 lock=settings.lake_lock, work=str(settings.lake_work),
                                 max_file_bytes=settings.ingest_max_file_bytes,
                                 max_line_bytes=settings.ingest_max_line_bytes),
            "text_encoder": TextEncoderResource(model_path=settings.text_model),
            "mlflow": MlflowResource(
                tracking_uri=settings.mlflow_tracking_uri,
                artifact_root=str(settings.mlflow_artifact_root),
                model_name=settings.model_name,
            ),
            "serving": ServingResource(urls=settings.serve_urls),
            "io_manager": dg.FilesystemIOManager(base_dir=str(settings.lake / ASSET_STORE)),
        }
    )


def load_ref(ref):
    """What a lake-table reference an asset handed over names (``TrainingDataRef``,
    ``ItemEmbeddingsRef``: ``ref.load()``), or a run failure saying why it cannot be had."""
    try:
        return ref.load()
    except StaleLakeTable as error:
        raise dg.Failure(str(error)) from error
