"""The one place that decides the environment: every path, name and schedule the project
uses, read from environment variables (``Settings``, a pydantic-settings object extending
``rec_models.settings.ModelSettings``) with laptop-friendly defaults under ``RECSYS_HOME``.
The README's configuration table is ``Settings.table()`` (``tests/test_settings.py``)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from pydantic import model_validator

from rec_models.files import as_location, is_remote
from rec_models.settings import ModelSettings, env_field

REPO_ROOT = Path(__file__).resolve().parents[1]


def artifact_root_uri(root: str) -> str | None:
    """An MLflow artifact root as a URI: a URL as it is, a folder (or ``file://`` path) as a file
    URI, None for "" (the tracking server's root)."""
    if not root:
        return None
    if is_remote(root):
        return root.rstrip("/")
    return Path(root.removeprefix("file://")).resolve().as_uri()


class Settings(ModelSettings):
    """Every setting of the project; paths left unset derive from ``home``."""

    home: Path = env_field("RECSYS_HOME", Path.cwd, "root of all local state", "current directory")
    landing: str = env_field(
        "RECSYS_LANDING_ZONE", "", "folder new files land in, or any fsspec URL (e.g. `s3://bucket/prefix`; "
        "install its filesystem package, e.g. `s3fs`)", "`$RECSYS_HOME/var/landing`")
    lake: str | Path | None = env_field(
        "RECSYS_LAKE", None, "ingested, validated data and asset outputs: a folder or a URL such as `s3://bucket/lake` "
        "(then set `RECSYS_LAKE_LOCK` and `RECSYS_PSEUDONYM_KEY`)", "`$RECSYS_HOME/var/lake`")
    lake_lock: str = env_field(
        "RECSYS_LAKE_LOCK", "", "what serialises writes to the lake: a PostgreSQL URL (an advisory lock; needed when "
        "the lake is on object storage) or a lock file", "`$RECSYS_LAKE/.lock` (a local lake)")
    dagster_home: Path | None = env_field("DAGSTER_HOME", None, "Dagster instance folder (holds dagster.yaml)",
                                          "`$RECSYS_HOME/var/dagster_home`")
    mlflow_tracking_uri: str = env_field("MLFLOW_TRACKING_URI", "", "MLflow tracking and registry store",
                                         "`sqlite:///$RECSYS_HOME/mlflow/mlflow.db`")
    mlflow_artifact_root: str = env_field(
        "RECSYS_MLFLOW_ARTIFACTS", "", "artifact root of new experiments: a folder or a URL such as `s3://bucket/prefix` "
        "(any S3 API: set `MLFLOW_S3_ENDPOINT_URL` and the `AWS_*` credentials)",
        "`$RECSYS_HOME/mlflow/artifacts`; with an `http(s)://` tracking server, the server's")
    dagster_config: Path | None = env_field(
        "RECSYS_DAGSTER_CONFIG", None, "Dagster instance config copied into `$DAGSTER_HOME/dagster.yaml` before every "
        "command (`docker/dagster.postgres.yaml`: runs, events and schedules in PostgreSQL)",
        "`$RECSYS_HOME/dagster.yaml`, else the repository's `dagster.yaml`")
    model_name: str = env_field("RECSYS_MODEL_NAME", "recsys-sasrec", "registered model name")
    full_retrain_cron: str = env_field("RECSYS_FULL_RETRAIN_CRON", "0 2 * * *", "schedule of the full retrain")
    sensor_interval_s: int = env_field("RECSYS_SENSOR_INTERVAL_S", 10, "seconds between landing-zone sensor ticks")
    serve_urls: str = env_field("RECSYS_SERVE_URLS", "", "comma-separated base URLs of `recsys serve` processes "
                                "told of a new champion at once (`POST /reload`); they poll the registry anyway",
                                "none")
    ingest_max_file_bytes: int = env_field("RECSYS_INGEST_MAX_FILE_BYTES", 1 << 30,
                                           "largest landing file once decompressed; larger ones are quarantined")
    ingest_max_line_bytes: int = env_field("RECSYS_INGEST_MAX_LINE_BYTES", 1 << 20,
                                           "longest line of a JSON Lines or CSV landing file")
    umask: str = env_field("RECSYS_UMASK", "077", "umask (octal) of every file and folder the project creates: "
                           "077 keeps the lake, ledger, MLflow store and run state private to their owner")

    @model_validator(mode="after")
    def _derive(self) -> Settings:
        if not (self.umask.isdigit() and set(self.umask) <= set("01234567") and int(self.umask, 8) <= 0o777):
            raise ValueError(f"RECSYS_UMASK must be an octal umask such as 077 or 022, got {self.umask!r}")
        self.home = Path(self.home).resolve()
        mlflow_dir = self.home / "mlflow"
        self.lake = as_location(self.lake or self.home / "var" / "lake")
        self.dagster_home = Path(self.dagster_home or self.home / "var" / "dagster_home")
        self.mlflow_tracking_uri = self.mlflow_tracking_uri or f"sqlite:///{mlflow_dir / 'mlflow.db'}"
        if not self.mlflow_artifact_root and not self.mlflow_tracking_uri.startswith(("http://", "https://")):
            self.mlflow_artifact_root = str(mlflow_dir / "artifacts")
        if self.pseudonym_key_file is None and not is_remote(self.lake):  # never beside data on object storage
            self.pseudonym_key_file = self.lake / "secrets" / "pseudonym.key"
        return self

    @property
    def local_artifact_root(self) -> Path | None:
        """The folder of MLflow artifacts when they are local files, else None."""
        root = self.mlflow_artifact_root
        return Path(root.removeprefix("file://")) if root and not is_remote(root) else None

    @property
    def instance_config(self) -> Path | None:
        """The Dagster instance config to copy into DAGSTER_HOME."""
        if self.dagster_config is not None:
            return Path(self.dagster_config)
        return next((p for p in (self.home / "dagster.yaml", REPO_ROOT / "dagster.yaml") if p.exists()), None)

    @property
    def landing_zone_url(self) -> str:
        """The fsspec URL of a remote landing zone (such as ``s3://bucket/prefix``), else ""."""
        return self.landing if is_remote(self.landing) else ""

    @property
    def landing_zone(self) -> Path:
        """The local landing folder: a remote zone's mirror (see lake.RemoteLandingZone)."""
        if self.landing_zone_url:
            return self.lake_work / "landing-mirror"
        return Path(self.landing.removeprefix("file://") or self.home / "var" / "landing")

    @property
    def lake_work(self) -> Path:
        """The local folder for what the lake keeps on this machine (a remote landing zone's
        mirror, model bundles before upload): the lake itself when it is local."""
        return self.lake if not is_remote(self.lake) else self.home / "var" / "lake-work"

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
            "RECSYS_MLFLOW_ARTIFACTS": self.mlflow_artifact_root,
            "RECSYS_MODEL_NAME": self.model_name,
            "RECSYS_TEXT_MODEL": self.text_model,
            "RECSYS_LAKE_LOCK": self.lake_lock,
            "RECSYS_PSEUDONYM_KEY_FILE": str(self.pseudonym_key_file or ""),
            "RECSYS_FULL_RETRAIN_CRON": self.full_retrain_cron,
            "RECSYS_SENSOR_INTERVAL_S": str(self.sensor_interval_s),
            "RECSYS_INGEST_MAX_FILE_BYTES": str(self.ingest_max_file_bytes),
            "RECSYS_INGEST_MAX_LINE_BYTES": str(self.ingest_max_line_bytes),
            "RECSYS_UMASK": self.umask,
            "RECSYS_SERVE_URLS": self.serve_urls,
        }

    def apply_umask(self) -> None:
        """Make this process (and the processes it starts) create files with ``umask``."""
        os.umask(int(self.umask, 8))

    @classmethod
    def markdown_table(cls) -> str:
        """The README's configuration table."""
        rows = ["| variable | meaning | default |", "|---|---|---|"]
        own = [row for row in cls.table() if row[0] not in {name for name, _, _ in ModelSettings.table()}]
        rows += [f"| `{name}` | {meaning} | {default} |" for name, meaning, default in own + ModelSettings.table()]
        return "\n".join(rows)


def prepare_environment(settings: Settings | None = None) -> Settings:
    """Export the settings so every Dagster process agrees, and give DAGSTER_HOME its
    dagster.yaml (copied from ``RECSYS_DAGSTER_CONFIG``, by default the repository root's, the
    one source of truth)."""
    settings = settings or Settings.from_env()
    settings.apply_umask()
    os.environ.update(settings.export())
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    settings.dagster_home.mkdir(parents=True, exist_ok=True)
    source = settings.instance_config
    if source is not None and not source.exists():
        raise SystemExit(f"RECSYS_DAGSTER_CONFIG names {source}, which does not exist")
    target = settings.dagster_home / "dagster.yaml"
    if source is not None and (not target.exists() or target.read_bytes() != source.read_bytes()):
        shutil.copyfile(source, target)
    for folder in (settings.landing_zone, settings.lake, settings.local_artifact_root):  # (a remote zone's mirror)
        if folder is not None and not is_remote(folder):
            folder.mkdir(parents=True, exist_ok=True)
    return settings
