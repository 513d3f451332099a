"""The one place that decides the environment: where things live and what they are called.

Every path and name the pipeline uses comes from here, read from environment variables with
laptop-friendly defaults under one home folder (``RECSYS_HOME``, default: the current
directory, i.e. the checkout):

=========================  ===========================================  =========================
variable                   meaning                                      default
=========================  ===========================================  =========================
``RECSYS_HOME``            root of all local state                      current directory
``RECSYS_LANDING_ZONE``    folder (or fsspec URL) new files land in     ``$RECSYS_HOME/var/landing``
``RECSYS_LAKE``            ingested, validated data and asset outputs   ``$RECSYS_HOME/var/lake``
``DAGSTER_HOME``           Dagster instance folder (holds dagster.yaml) ``$RECSYS_HOME/var/dagster_home``
``MLFLOW_TRACKING_URI``    MLflow tracking + registry store             ``sqlite:///$RECSYS_HOME/mlflow/mlflow.db``
``RECSYS_MLFLOW_ARTIFACTS`` artifact root for new experiments            ``$RECSYS_HOME/mlflow/artifacts``
``RECSYS_MODEL_NAME``      registered model name                        ``recsys-sasrec``
``RECSYS_TEXT_MODEL``      transformers encoder folder or name          bundled all-MiniLM-L6-v2
``RECSYS_PSEUDONYM_KEY_FILE`` file holding the user-id pseudonym key  ``$RECSYS_LAKE/secrets/pseudonym.key``
=========================  ===========================================  =========================

The pseudonym key itself may come from ``RECSYS_PSEUDONYM_KEY`` instead (a secret store's
environment variable); otherwise it is generated into its file on first ingest. Serving reads
the same variables, so requests may name users by their raw ids.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def is_remote_url(location: str) -> bool:
    """Whether a landing-zone location is an fsspec URL other than a local ``file://`` one."""
    return "://" in location and not location.startswith("file://")


@dataclass(frozen=True)
class Settings:
    home: Path
    landing_zone: Path  # a remote zone's local mirror (see feedback_store.RemoteLandingZone)
    lake: Path
    dagster_home: Path
    mlflow_tracking_uri: str
    mlflow_artifact_root: Path
    model_name: str
    text_model: str  # "" means the bundled default encoder
    pseudonym_key_file: Path
    landing_zone_url: str = ""  # set when the landing zone is an fsspec URL such as s3://bucket/prefix

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "Settings":
        env = dict(os.environ if env is None else env)
        home = Path(env.get("RECSYS_HOME") or os.getcwd()).resolve()
        mlflow_dir = home / "mlflow"
        lake = Path(env.get("RECSYS_LAKE") or home / "var" / "lake")
        landing = env.get("RECSYS_LANDING_ZONE") or ""
        remote = landing if is_remote_url(landing) else ""
        return cls(
            home=home,
            landing_zone=lake / "landing-mirror" if remote else Path(landing.removeprefix("file://") or home / "var" / "landing"),
            lake=lake,
            dagster_home=Path(env.get("DAGSTER_HOME") or home / "var" / "dagster_home"),
            mlflow_tracking_uri=env.get("MLFLOW_TRACKING_URI") or f"sqlite:///{mlflow_dir / 'mlflow.db'}",
            mlflow_artifact_root=Path(env.get("RECSYS_MLFLOW_ARTIFACTS") or mlflow_dir / "artifacts"),
            model_name=env.get("RECSYS_MODEL_NAME") or "recsys-sasrec",
            text_model=env.get("RECSYS_TEXT_MODEL") or "",
            pseudonym_key_file=Path(env.get("RECSYS_PSEUDONYM_KEY_FILE") or lake / "secrets" / "pseudonym.key"),
            landing_zone_url=remote,
        )

    @property
    def landing_location(self) -> str:
        """What the pipeline reads: the fsspec URL of a remote landing zone, else the folder."""
        return self.landing_zone_url or str(self.landing_zone)

    def local_landing_zone(self, command: str) -> Path:
        """The landing folder for a command that writes into it; a remote zone is refused."""
        if self.landing_zone_url:
            raise SystemExit(f"recsys {command}: the landing zone is {self.landing_zone_url}; this command writes into "
                             "a local one. Upload files there with your storage's tools and the sensor picks them up.")
        return self.landing_zone

    def export(self) -> dict[str, str]:
        """Environment variables that make child processes (webserver, daemon, runs) agree."""
        return {

            "RECSYS_HOME": str(self.home),
            "RECSYS_LANDING_ZONE": self.landing_location,
            "RECSYS_LAKE": str(self.lake),
            "DAGSTER_HOME": str(self.dagster_home),
            "MLFLOW_TRACKING_URI": self.mlflow_tracking_uri,
            "RECSYS_MLFLOW_ARTIFACTS": str(self.mlflow_artifact_root),
            "RECSYS_MODEL_NAME": self.model_name,
            "RECSYS_TEXT_MODEL": self.text_model,
            "RECSYS_PSEUDONYM_KEY_FILE": str(self.pseudonym_key_file),
        }
