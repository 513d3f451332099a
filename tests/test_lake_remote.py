"""The lake on an fsspec filesystem other than the local disk (``memory://`` here, a real S3
server in ``tests/test_services.py``): the same code ingests, validates, rejects and reads back
exactly what a local lake does, writes nothing of the lake locally, and refuses to run without
a lock or with a key beside the data."""

from __future__ import annotations

import json

import fsspec
import numpy as np
import pandas as pd
import pytest

from rec_models.files import as_location, is_remote
from rec_models.text.cache import EmbeddingCache
from rec_pipelines.lake import FeedbackStore, LakeError
from rec_pipelines.lake.locks import LockUnavailable, _postgres_url
from rec_pipelines.server.impressions import ImpressionLog
from rec_pipelines.settings import Settings

KEY = "ab" * 32


def _land(landing, name: str, rows: list[dict]) -> None:
    folder = landing / "events"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("".join(json.dumps(row) + "\n" for row in rows))


def _events(first: int, n: int, users: int = 4) -> list[dict]:
    return [{"user_id": f"u{i % users}", "item_id": f"i{i % 7}", "event_type": "click", "timestamp": 1_700_000_000 + i}
            for i in range(first, first + n)]


@pytest.fixture
def memory_lake(tmp_path):
    url = f"memory://lake-{tmp_path.name}"
    yield url
    fsspec.filesystem("memory").rm(url.removeprefix("memory://"), recursive=True)


def test_a_remote_lake_behaves_like_a_local_one(tmp_path, memory_lake):
    landing = tmp_path / "landing"
    _land(landing, "a.jsonl", _events(0, 40))
    _land(landing, "b.jsonl", _events(40, 20) + [{"user_id": "u1", "item_id": "", "event_type": "click",
                                                  "timestamp": 1_700_000_100}])
    _land(landing, "copy-of-a.jsonl", _events(0, 40))
    remote_landing = f"{memory_lake}-landing"  # the same files in a remote landing zone
    fsspec.filesystem("memory").put(str(landing), remote_landing.removeprefix("memory://"), recursive=True)
    stores = {
        "local": FeedbackStore(landing, tmp_path / "lake", pseudonym_key=KEY),
        "remote": FeedbackStore(remote_landing, memory_lake, pseudonym_key=KEY, lock=str(tmp_path / "remote.lock"),
                                work=tmp_path / "work"),
    }
    reports = {name: store.ingest("events").as_dict() for name, store in stores.items()}
    assert reports["remote"] == reports["local"]
    assert reports["remote"]["duplicate_files"] == ["events/copy-of-a.jsonl"]
    accounts = {name: store.validate_pending() for name, store in stores.items()}
    assert [(a["rows_valid"], a["rows_quarantined"]) for a in accounts["remote"]] == [(40, 0), (20, 1)]
    assert [a["rows_in"] for a in accounts["remote"]] == [a["rows_in"] for a in accounts["local"]]
    # exactly once: nothing new to ingest or validate, however often it runs
    assert stores["remote"].ingest("events").batches == [] and stores["remote"].validate_pending() == []
    pd.testing.assert_frame_equal(stores["remote"].read_validated(), stores["local"].read_validated())
    pd.testing.assert_frame_equal(stores["remote"].quarantined_rows(), stores["local"].quarantined_rows())
    assert [e["status"] for e in stores["remote"].ledger()] == [e["status"] for e in stores["local"].ledger()]

    # a batch rejected after the fact leaves the validated events, on both
    batch = stores["remote"].batches("events")[0]
    for store in stores.values():
        assert store.reject_batches([batch], "bad upstream export") == [batch]
    assert len(stores["remote"].read_validated()) == len(stores["local"].read_validated()) == 20
    assert stores["remote"].quarantined_rows(batch)["reason"].eq("bad upstream export").sum() == 40

    # the remote lake's files are all in the remote filesystem; the local work folder holds the
    # landing zone's mirror and nothing of the lake
    remote_files = fsspec.filesystem("memory").find(memory_lake.removeprefix("memory://"))
    assert any(f.endswith("ledger.jsonl") for f in remote_files)
    assert sum(f.endswith(".parquet") and "/validated/" in f for f in remote_files) == 1
    local = sorted(p.relative_to(tmp_path / "work").as_posix() for p in (tmp_path / "work").rglob("*") if p.is_file())
    assert local == ["landing-mirror/.remote-index.json", "landing-mirror/events/a.jsonl",
                     "landing-mirror/events/b.jsonl", "landing-mirror/events/copy-of-a.jsonl"]


def test_a_remote_lake_needs_a_lock_and_a_key_from_outside(tmp_path, memory_lake, monkeypatch):
    monkeypatch.delenv("RECSYS_PSEUDONYM_KEY", raising=False)
    landing = tmp_path / "landing"
    _land(landing, "a.jsonl", _events(0, 5))
    with pytest.raises(LockUnavailable, match="RECSYS_LAKE_LOCK"):
        FeedbackStore(landing, memory_lake, pseudonym_key=KEY).ingest("events")
    with pytest.raises(LakeError, match="RECSYS_PSEUDONYM_KEY"):
        FeedbackStore(landing, memory_lake, lock=str(tmp_path / "lock")).ingest("events")
    # a key file that is missing (an unmounted secret) is not a reason to invent a key
    with pytest.raises(LakeError, match="holds none"):
        FeedbackStore(landing, memory_lake, lock=str(tmp_path / "lock"), key_file=tmp_path / "no.key").ingest("events")
    assert not (tmp_path / "no.key").exists()
    # a lock setting that is a URL but not PostgreSQL's is refused, not taken for a file name
    with pytest.raises(LockUnavailable, match="s3://"):
        FeedbackStore(landing, memory_lake, pseudonym_key=KEY, lock="s3://bucket/lock").ingest("events")
    assert _postgres_url("postgres://user@db/recsys") == "postgresql+psycopg2://user@db/recsys"
    assert _postgres_url("postgresql+psycopg2://user@db/recsys") == "postgresql+psycopg2://user@db/recsys"
    assert _postgres_url(str(tmp_path / "lock")) is None
    monkeypatch.setenv("RECSYS_PSEUDONYM_KEY", KEY)
    assert FeedbackStore(landing, memory_lake, lock=str(tmp_path / "lock")).ingest("events").rows_in == 5
    assert not fsspec.filesystem("memory").find(f"{memory_lake.removeprefix('memory://')}/secrets")


def test_settings_put_the_lake_on_object_storage(tmp_path):
    settings = Settings.from_env({"RECSYS_HOME": str(tmp_path), "RECSYS_LAKE": "s3://bucket/lake/",
                                  "RECSYS_LANDING_ZONE": "s3://bucket/landing",
                                  "RECSYS_LAKE_LOCK": "postgresql+psycopg2://db/recsys"})
    assert is_remote(settings.lake) and str(settings.lake) == "s3://bucket/lake"
    assert settings.pseudonym_key_file is None  # never beside the data
    assert settings.landing_zone == tmp_path / "var" / "lake-work" / "landing-mirror"  # local
    exported = settings.export()
    assert exported["RECSYS_LAKE"] == "s3://bucket/lake" and exported["RECSYS_PSEUDONYM_KEY_FILE"] == ""
    again = Settings.from_env({k: v for k, v in exported.items() if v})
    assert str(again.lake) == "s3://bucket/lake" and again.lake_lock == "postgresql+psycopg2://db/recsys"
    local = Settings.from_env({"RECSYS_HOME": str(tmp_path)})
    assert local.lake == tmp_path / "var" / "lake" and local.lake_work == local.lake
    assert local.pseudonym_key_file == local.lake / "secrets" / "pseudonym.key"


def test_caches_and_impressions_write_to_object_storage(memory_lake):
    lake = as_location(memory_lake)
    cache = EmbeddingCache(lake / "item_text_embeddings.parquet")
    cache.put("model", "v1", "sha", np.array([0.25, 0.5], dtype=np.float32))
    cache.save()
    again = EmbeddingCache(lake / "item_text_embeddings.parquet")
    assert again.get("model", "v1", "sha").tolist() == [0.25, 0.5]

    log = ImpressionLog(lake / "landing" / "impressions")
    log.record(["r1"], ["user-pseudonym"], {"item_id": ["a", "b"], "rank": [1, 2], "arm": ["champion"] * 2,
                                            "model_version": ["3", "3"]}, [2])
    written = log.flush()
    rows = [json.loads(line) for line in written.read_text().splitlines()]
    assert [(r["item_id"], r["rank"], r["user_id"]) for r in rows] == [("a", 1, "user-pseudonym"),
                                                                     ("b", 2, "user-pseudonym")]
