"""Binds every resource to the environment decided in ``rec_pipelines.settings``."""

import dagster as dg

from rec_pipelines.resources import LakeResource, MlflowResource, TextEncoderResource
from rec_pipelines.settings import Settings


@dg.definitions
def resources() -> dg.Definitions:
    settings = Settings.from_env()
    return dg.Definitions(
        # One process per run: on a laptop, paying the torch/transformers import once per run
        # beats a process per step.
        executor=dg.in_process_executor,
        resources={
            "lake": LakeResource(landing_zone=settings.landing_location, lake=str(settings.lake),
                                 pseudonym_key_file=str(settings.pseudonym_key_file)),
            "text_encoder": TextEncoderResource(model_path=settings.text_model),
            "mlflow": MlflowResource(
                tracking_uri=settings.mlflow_tracking_uri,
                artifact_root=str(settings.mlflow_artifact_root),
                model_name=settings.model_name,
            ),
            "io_manager": dg.FilesystemIOManager(base_dir=str(settings.lake / "assets")),
        }
    )
