"""The loop on real services: a PostgreSQL server and an S3 API server (moto's), started and
stopped here (``scripts/services_smoke.py`` is the harness). Configuration alone moves the
Dagster instance and MLflow to PostgreSQL, and MLflow's artifacts, the lake and the landing zone
to S3 (the lake locked by a PostgreSQL advisory lock).

PostgreSQL comes from Debian's package; ``.ci/run`` installs it and sets
``RECSYS_REQUIRE_SERVICES=1``, so there a missing server fails the test instead of skipping it."""

from __future__ import annotations

import json
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
    uploaded = sorted(k.removeprefix("recsys/") for k in result["batch0_keys"] + result["batch1_keys"])
    assert uploaded == sorted(k for k in landed if not k.startswith("landing/impressions/"))
    # the lake is in S3: its ledger names every uploaded file, each events file is a validated
    # batch, asset outputs and the item vocabulary are there too; nothing of it on the local disk
    assert result["lake"] == "s3://recsys/lake" and not result["local_lake_folder"]
    lake = {o["Key"].removeprefix("lake/"): o for page in s3.get_paginator("list_objects_v2").paginate(
        Bucket="recsys", Prefix="lake/") for o in page.get("Contents", [])}
    ledger = [json.loads(line) for line in s3.get_object(Bucket="recsys", Key="lake/ledger.jsonl")["Body"].read().splitlines()]
    assert sorted(f"landing/{e['file']}" for e in ledger) == uploaded
    event_batches = [e["batch_id"] for e in ledger if e["kind"] == "events" and e["status"] == "ingested"]
    assert len(event_batches) == 2
    for batch in event_batches:
        assert {f"events/{batch}.parquet", f"validated/{batch}.parquet", f"validated/{batch}.json"} <= set(lake)
    assert "item_vocab.json" in lake and any(k.startswith("assets/") for k in lake)
    assert not any(k.startswith("secrets/") for k in lake)  # the key never lies beside the data
    # serving answered from the champion stored in S3
    assert result["served_ok"] and result["served_version"] == str(result["champion_version"])
    # ... and wrote what it served into the S3 landing zone (flushed at the latest on SIGTERM)
    impressions = [k for k in landed if k.startswith("landing/impressions/")]
    assert impressions, landed
    rows = [json.loads(line) for key in impressions
            for line in s3.get_object(Bucket="recsys", Key=key)["Body"].read().splitlines()]
    assert [r["item_id"] for r in rows] == result["served_items"]
    assert {r["model_version"] for r in rows} == {result["served_version"]}


def test_the_postgresql_lake_lock_lets_one_writer_in_at_a_time(services):
    """Two writers of one lake (threads here, each on its own connection, as two pods would be):
    the second enters only after the first left; another lake's lock is independent."""
    import threading

    from rec_pipelines.lake.locks import lake_lock

    _, pg, _ = services
    url = f"postgresql+psycopg2://{pg['user']}@{pg['host']}:{pg['port']}/dagster"
    inside, entered, release = threading.Event(), [], threading.Event()

    def first():
        with lake_lock("s3://recsys/lake", url):
            inside.set()
            release.wait(30)
            entered.append("first leaves")

    def second():
        with lake_lock("s3://recsys/lake", url):
            entered.append("second enters")

    holder = threading.Thread(target=first)
    holder.start()
    assert inside.wait(30)
    waiter = threading.Thread(target=second)
    waiter.start()
    waiter.join(2)
    assert waiter.is_alive() and entered == []  # blocked while the first holds the lock
    with lake_lock("s3://recsys/other-lake", url):  # a different lake: not blocked
        pass
    release.set()
    holder.join(30)
    waiter.join(30)
    assert entered == ["first leaves", "second enters"]

    # A holder whose connection dies has lost the lock: verify() says so before any write.
    import psycopg2

    from rec_pipelines.lake.locks import LockUnavailable

    with lake_lock("s3://recsys/lake", url) as verify:
        verify()  # held
        with psycopg2.connect(host=pg["host"], port=pg["port"], user=pg["user"], dbname="dagster") as admin:
            with admin.cursor() as cursor:
                cursor.execute("SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' "
                               "AND pid <> pg_backend_pid()")
        with pytest.raises(LockUnavailable, match="lost the lake's lock"):
            verify()
    with lake_lock("s3://recsys/lake", url) as verify:  # and the lake can be locked again
        verify()
