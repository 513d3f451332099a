"""One loop end to end on real services: PostgreSQL and an S3 API, started and stopped here.

    .venv/bin/python scripts/services_smoke.py [--keep]      (or: scripts/services-smoke)

Starts a PostgreSQL server (Debian's ``postgresql`` package: ``initdb`` + ``pg_ctl`` in a temp
folder, as the ``postgres`` user when run as root) and moto's standalone S3 server (a real HTTP
endpoint), then configures the project for them by environment alone:

* Dagster instance: ``RECSYS_DAGSTER_CONFIG=docker/dagster.postgres.yaml`` (runs, event log,
  schedules in PostgreSQL), ``DAGSTER_PG_*``;
* MLflow tracking and registry: ``MLFLOW_TRACKING_URI=postgresql+psycopg2://...``;
* MLflow artifacts: ``RECSYS_MLFLOW_ARTIFACTS=s3://mlflow/artifacts`` (``MLFLOW_S3_ENDPOINT_URL``);
* landing zone: ``RECSYS_LANDING_ZONE=s3://recsys/landing`` (s3fs, ``AWS_ENDPOINT_URL``);
* the lake (ledger, batches, validated events, asset outputs, caches):
  ``RECSYS_LAKE=s3://recsys/lake``, locked by a PostgreSQL advisory lock
  (``RECSYS_LAKE_LOCK=postgresql+psycopg2://...``), pseudonym key from ``RECSYS_PSEUDONYM_KEY``.

Then the loop: the simulator's batch 0 is uploaded into the S3 landing zone, the real
``dagster-daemon``'s sensor starts a retrain (a full one: no champion yet), batch 1 is uploaded
and the sensor's micro-batch retrain goes through the gate, and ``recsys serve`` answers from the
champion whose files are in S3, writing its impressions into the S3 landing zone. Everything is stopped at the end; the last line is one JSON
object: {"dagster_storage", "mlflow_backend", "artifact_root", "lake", "champion_version", "served_ok", ...}.
``tests/test_services.py`` runs the same harness.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
S3_KEYS = {"AWS_ACCESS_KEY_ID": "recsys", "AWS_SECRET_ACCESS_KEY": "recsys-secret", "AWS_DEFAULT_REGION": "us-east-1"}


class ServiceUnavailable(RuntimeError):
    """A service's program is not installed here."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def postgres_bin() -> Path:
    """The folder of PostgreSQL's server programs (``PG_BIN``, PATH, or Debian's layout)."""
    candidates = [os.environ.get("PG_BIN", "")]
    which = shutil.which("initdb")
    candidates += [str(Path(which).resolve().parent)] if which else []
    candidates += sorted((str(p) for p in Path("/usr/lib/postgresql").glob("*/bin")), reverse=True)
    for folder in filter(None, candidates):
        if (Path(folder) / "initdb").exists() and (Path(folder) / "pg_ctl").exists():
            return Path(folder)
    raise ServiceUnavailable("PostgreSQL is not installed (Debian: apt-get install postgresql; or set PG_BIN)")


@contextlib.contextmanager
def postgres_server(workdir: Path, databases: tuple[str, ...] = ("dagster", "mlflow")) -> Iterator[dict]:
    """A throwaway PostgreSQL server on a free port; yields {"host", "port", "user"}.
    PostgreSQL refuses to run as root: then its programs run as the ``postgres`` user."""
    folder = postgres_bin()
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    workdir.mkdir(parents=True, exist_ok=True)
    # the postgres user must reach its data folder: a folder of its own under the system temp dir
    # (pytest's and mkdtemp's folders are private to their owner)
    data = Path(tempfile.mkdtemp(prefix="recsys-pgdata-")) if as_user else workdir / "pgdata"
    data.mkdir(mode=0o700, exist_ok=True)
    if as_user:
        shutil.chown(data, "postgres", "postgres")
    port, user = free_port(), "recsys"

    def pg(*args: str) -> subprocess.CompletedProcess:
        done = subprocess.run([*as_user, *args], capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}): {done.stdout[-2000:]}{done.stderr[-2000:]}")
        return done

    pg(str(folder / "initdb"), "-D", str(data), "-U", user, "-A", "trust", "-E", "UTF8", "--no-sync")
    options = f"-p {port} -c listen_addresses=127.0.0.1 -k {data} -c fsync=off -c max_connections=200"
    pg(str(folder / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(data / "server.log"), "-w", "-t", "60",
       "start")
    try:
        import psycopg2

        connection = psycopg2.connect(host="127.0.0.1", port=port, user=user, dbname="postgres")
        connection.autocommit = True
        with connection.cursor() as cursor:  # (not "with connection": that opens a transaction)
            for name in databases:
                cursor.execute(f'CREATE DATABASE "{name}"')
        connection.close()
        yield {"host": "127.0.0.1", "port": port, "user": user}
    finally:
        subprocess.run([*as_user, str(folder / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                       capture_output=True)
        shutil.rmtree(data, ignore_errors=True)


@contextlib.contextmanager
def s3_server(workdir: Path, buckets: tuple[str, ...] = ("mlflow", "recsys")) -> Iterator[str]:
    """moto's standalone S3 server (a real HTTP endpoint) with ``buckets``; yields its URL."""
    program = BIN / "moto_server"
    if not program.exists():
        raise ServiceUnavailable("moto's server is not installed (pip install 'moto[server]')")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(workdir / "moto.log", "w")
    process = subprocess.Popen([str(program), "-H", "127.0.0.1", "-p", str(port)], stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(f"{url}/moto-api/", process, workdir / "moto.log", timeout_s=60)
        import boto3

        client = boto3.client("s3", endpoint_url=url, region_name=S3_KEYS["AWS_DEFAULT_REGION"],
                              aws_access_key_id=S3_KEYS["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=S3_KEYS["AWS_SECRET_ACCESS_KEY"])
        for bucket in buckets:
            client.create_bucket(Bucket=bucket)
        yield url
    finally:
        from rec_pipelines.cli import stop_processes

        stop_processes([process])
        log.close()


def wait_for(url: str, process: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not answer:\n{log.read_text()[-3000:]}") from None
            time.sleep(0.3)


DAGSTER_CONFIG = REPO / "docker" / "dagster.postgres.yaml"


def service_environment(home: Path, pg: dict, s3_url: str, dagster_config: Path = DAGSTER_CONFIG) -> dict[str, str]:
    """The environment variables that move the project onto the services (nothing else)."""
    database = f"postgresql+psycopg2://{pg['user']}@{pg['host']}:{pg['port']}"
    return {
        "RECSYS_HOME": str(home),
        "RECSYS_DAGSTER_CONFIG": str(dagster_config),
        "DAGSTER_PG_HOST": pg["host"], "DAGSTER_PG_PORT": str(pg["port"]), "DAGSTER_PG_USER": pg["user"],
        "DAGSTER_PG_PASSWORD": "", "DAGSTER_PG_DB": "dagster",
        "MLFLOW_TRACKING_URI": f"{database}/mlflow",
        "RECSYS_MLFLOW_ARTIFACTS": "s3://mlflow/artifacts",
        "RECSYS_LANDING_ZONE": "s3://recsys/landing",
        "RECSYS_LAKE": "s3://recsys/lake", "RECSYS_LAKE_LOCK": f"{database}/dagster",
        "RECSYS_PSEUDONYM_KEY": "5e" * 32,  # a test secret (in production: from a secret store)
        "MLFLOW_S3_ENDPOINT_URL": s3_url, "AWS_ENDPOINT_URL": s3_url, **S3_KEYS,
        "RECSYS_SENSOR_INTERVAL_S": "2",
    }


def upload_batch(simulator, batch: int, landing_url: str, endpoint: str) -> list[str]:
    """Write one simulator batch locally, then put its files into the S3 landing zone (an S3
    PUT is atomic: the sensor never sees half a file)."""
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=endpoint, key=S3_KEYS["AWS_ACCESS_KEY_ID"],
                           secret=S3_KEYS["AWS_SECRET_ACCESS_KEY"])
    keys = []
    with tempfile.TemporaryDirectory() as tmp:
        for path in simulator.write_batch(Path(tmp), batch):
            key = f"{landing_url.removeprefix('s3://')}/{path.parent.name}/{path.name}"
            fs.put_file(str(path), key)
            keys.append(key)
    return keys


def run_loop(home: Path, pg: dict, s3_url: str, timeout_s: float = 420, dagster_config: Path = DAGSTER_CONFIG) -> dict:
    """Drive the loop against the services (environment only); returns what was observed. This
    process's environment is the services' meanwhile, and restored after."""
    saved = dict(os.environ)
    try:
        return _drive(home, pg, s3_url, timeout_s, dagster_config)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _drive(home: Path, pg: dict, s3_url: str, timeout_s: float, dagster_config: Path) -> dict:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("RECSYS_", "DAGSTER_", "MLFLOW_"))},
           **service_environment(home, pg, s3_url, dagster_config)}
    for name in [n for n in os.environ if n.startswith(("RECSYS_", "DAGSTER_", "MLFLOW_"))]:
        del os.environ[name]
    os.environ.update(env)
    from rec_models.simulator import FeedbackSimulator, SimulatorConfig
    from rec_pipelines.cli import stop_processes
    from rec_pipelines.registry import CHAMPION, ModelRegistry
    from rec_pipelines.settings import prepare_environment

    settings = prepare_environment()  # exports the derived settings (DAGSTER_HOME, ...) too
    env = dict(os.environ)
    registry = ModelRegistry(settings.mlflow_tracking_uri, settings.mlflow_artifact_root, settings.model_name)
    simulator = FeedbackSimulator(SimulatorConfig(n_items=150, n_users=100, events_per_user=20, batch_users=30,
                                                  batch_events_per_user=6, batch_new_items=5))
    serve_port = free_port()
    url = f"http://127.0.0.1:{serve_port}"
    env["RECSYS_SERVE_URLS"] = url
    logs = [open(home / "daemon.log", "w"), open(home / "serve.log", "w")]
    daemon = subprocess.Popen([str(BIN / "dagster-daemon"), "run", "-m", "rec_pipelines.definitions"], env=env,
                              stdout=logs[0], stderr=subprocess.STDOUT, start_new_session=True)
    server = None
    result: dict = {"decisions": {}}
    try:
        for batch in (0, 1):
            before = {v.version for v in registry.client.search_model_versions(f"name = '{settings.model_name}'")}
            result[f"batch{batch}_keys"] = upload_batch(simulator, batch, settings.landing_location, s3_url)
            version = wait_for_decision(registry, settings.model_name, before, daemon, home, timeout_s)
            result["decisions"][str(version.version)] = {k: version.tags.get(k) for k in
                                                    ("promotion.decision", "promotion.reason")}
        champion = registry.version_by_alias(CHAMPION)
        server = subprocess.Popen([sys.executable, "-m", "rec_pipelines.cli", "serve", "--port", str(serve_port)],
                                  env=env, stdout=logs[1], stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(f"{url}/ping", server, home / "serve.log", timeout_s=180)
        user = simulator.events(0)["user_id"].iloc[0]
        body = json.dumps({"dataframe_records": [{"user_id": user, "k": 5}]}).encode()
        request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as answer:
            served_version = answer.headers.get("x-recsys-model-version")
            items = [row["item_id"] for row in json.loads(answer.read())["predictions"]]
        result.update(champion_version=int(champion.version), served_version=served_version, served_items=items,
                      served_ok=served_version == str(champion.version) and len(items) == 5,
                      champion_source=registry.client.get_model_version_download_uri(settings.model_name,
                                                                                       champion.version))
        wait_for_runs(timeout_s=120)  # the last run ends after the promotion (it tells the server)
    finally:
        stop_processes([p for p in (server, daemon) if p is not None], grace_s=20)
        for log in logs:
            log.close()
    result.update(describe_stores(settings, registry))
    return result


def wait_for_decision(registry, name: str, before: set, daemon: subprocess.Popen, home: Path, timeout_s: float):
    """The first model version registered after ``before`` once the gate has tagged it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        new = [v for v in registry.client.search_model_versions(f"name = '{name}'")
               if v.version not in before and "promotion.decision" in v.tags]
        champion = registry.version_by_alias("champion")
        # a promotion is complete once the alias moved (the tags are written just before)
        if new and (new[0].tags["promotion.decision"] != "promoted"
                    or (champion is not None and str(champion.version) == str(new[0].version))):
            return new[0]
        if daemon.poll() is not None:
            break
        time.sleep(1)
    raise RuntimeError(f"no new model version (daemon exit code {daemon.poll()}):\n{(home / 'daemon.log').read_text()[-4000:]}")


def wait_for_runs(timeout_s: float) -> None:
    """Until no Dagster run is queued or in progress."""
    import dagster as dg

    active = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
              dg.DagsterRunStatus.STARTED]
    deadline = time.monotonic() + timeout_s
    with dg.DagsterInstance.get() as instance:
        while running := instance.get_runs(filters=dg.RunsFilter(statuses=active)):
            if time.monotonic() > deadline:
                raise RuntimeError(f"runs still in progress after {timeout_s}s: {[r.run_id for r in running]}")
            time.sleep(1)


def describe_stores(settings, registry) -> dict:
    """Where everything ended up: the Dagster instance's storage and runs, MLflow's backend and
    artifact location."""
    import dagster as dg

    with dg.DagsterInstance.get() as instance:
        storage = type(instance.run_storage).__name__
        runs = instance.get_runs()
        run_rows = [{"job": r.job_name, "status": r.status.value, "sensor": r.tags.get("dagster/sensor_name")}
                    for r in runs]
    experiment = registry.client.get_experiment(registry.experiment_id())
    return {"dagster_storage": "postgres" if storage.startswith("Postgres") else storage, "dagster_run_storage": storage,
            "dagster_runs": run_rows, "mlflow_backend": settings.mlflow_tracking_uri.split(":", 1)[0],
            "mlflow_tracking_uri": settings.mlflow_tracking_uri, "artifact_root": experiment.artifact_location,
            "local_mlflow_folder": (settings.home / "mlflow").exists(), "lake": str(settings.lake),
            "local_lake_folder": (settings.home / "var" / "lake").exists()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (logs, PostgreSQL data)")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    workdir = Path(tempfile.mkdtemp(prefix="recsys-services-"))
    started = time.perf_counter()
    try:
        with postgres_server(workdir / "pg") as pg, s3_server(workdir) as s3_url:
            print(f"PostgreSQL on {pg['host']}:{pg['port']}, S3 API on {s3_url}; home {workdir / 'home'}", flush=True)
            result = run_loop(workdir / "home", pg, s3_url)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    result["seconds"] = round(time.perf_counter() - started, 1)
    for version, decision in result["decisions"].items():
        print(f"v{version}: {decision['promotion.decision']} ({decision['promotion.reason']})")
    print(f"served v{result['served_version']} (champion v{result['champion_version']}) from {result['champion_source']}")
    print(json.dumps({k: result[k] for k in ("dagster_storage", "mlflow_backend", "artifact_root", "lake", "champion_version",
                                             "served_ok", "served_version", "decisions", "seconds")}))
    return 0 if result["served_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
