"""The loop on real services: a PostgreSQL server and an S3 API server (moto's), started and
stopped here (``scripts/services_smoke.py`` is the harness). Configuration alone moves the
Dagster instance and MLflow to PostgreSQL and MLflow's artifacts and the landing zone to S3.

PostgreSQL comes from Debian's package; ``.ci/run`` installs it and sets
``RECSYS_REQUIRE_SERVICES=1``, so there a missing server fails the test instead of skipping it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import services_smoke  # noqa: E402


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("services")
    try:
        services_smoke.postgres_bin()
    except services_smoke.ServiceUnavailable as missing:
        if os.environ.get("RECSYS_REQUIRE_SERVICES") == "1":
            raise
        pytest.skip(str(missing))
    with services_smoke.postgres_server(workdir / "pg") as pg, services_smoke.s3_server(workdir) as s3_url:
        yield workdir, pg, s3_url


def test_the_loop_runs_on_postgresql_and_s3(services):
    import boto3
    import psycopg2

    workdir, pg, s3_url = services
    result = services_smoke.run_loop(workdir / "home", pg, s3_url)

    # Dagster: the instance is PostgreSQL's, and the sensor started both retrains
    assert result["dagster_storage"] == "postgres", result["dagster_run_storage"]
    sensor_runs = [r for r in result["dagster_runs"] if r["sensor"] == "landing_zone_sensor"]
    assert len(sensor_runs) == 2 and {r["status"] for r in sensor_runs} == {"SUCCESS"}, result["dagster_runs"]
    with psycopg2.connect(host=pg["host"], port=pg["port"], user=pg["user"], dbname="dagster") as connection:
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM runs")
            assert cursor.fetchone()[0] == len(result["dagster_runs"])
            cursor.execute("SELECT count(*) FROM event_logs WHERE dagster_event_type = 'ASSET_MATERIALIZATION'")
            assert cursor.fetchone()[0] > 0
        with psycopg2.connect(host=pg["host"], port=pg["port"], user=pg["user"], dbname="mlflow") as mlflow_db:
            with mlflow_db.cursor() as cursor:
                cursor.execute("SELECT version, aliases.alias FROM model_versions "
                               "JOIN registered_model_aliases aliases USING (name, version)")
                aliases = {alias: int(version) for version, alias in cursor.fetchall()}
    # MLflow: registry in PostgreSQL, the micro-batch candidate went through the gate
    assert result["mlflow_backend"] == "postgresql+psycopg2"
    assert aliases["champion"] == result["champion_version"]
    decisions = result["decisions"]
    assert decisions["1"]["promotion.decision"] == "promoted"
    assert decisions["2"]["promotion.reason"]  # promoted or rejected, with the gate's reason
    # artifacts in S3, none on the local disk
    assert result["artifact_root"] == "s3://mlflow/artifacts/recsys-sasrec"
    assert result["champion_source"].startswith("s3://mlflow/artifacts/")
    assert not result["local_mlflow_folder"]
    s3 = boto3.client("s3", endpoint_url=s3_url, region_name="us-east-1",
                      aws_access_key_id=services_smoke.S3_KEYS["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=services_smoke.S3_KEYS["AWS_SECRET_ACCESS_KEY"])
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket="mlflow") for o in page.get("Contents", [])]
    assert any(k.endswith("recommender.json") for k in keys) and any(k.endswith("MLmodel") for k in keys)
    landed = [o["Key"] for o in s3.list_objects_v2(Bucket="recsys", Prefix="landing/")["Contents"]]
    assert sorted(k.removeprefix("recsys/") for k in result["batch0_keys"] + result["batch1_keys"]) == sorted(landed)
    # serving answered from the champion stored in S3
    assert result["served_ok"] and result["served_version"] == str(result["champion_version"])
