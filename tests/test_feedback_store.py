"""Landing zone → lake: formats, exactly-once ingestion, whole-file quarantine."""

import gzip
import json
import os

import pandas as pd
import pytest

from rec_pipelines.feedback_store import FeedbackStore, is_ready

ROWS = [
    {"user_id": "u1", "item_id": "i1", "event_type": "view", "value": 12.0, "timestamp": 1_700_000_000},
    {"user_id": "u1", "item_id": "i2", "event_type": "rating", "value": 4.5, "timestamp": 1_700_000_001},
    {"user_id": "u2", "item_id": "i1", "event_type": "purchase", "value": None, "timestamp": 1_700_000_002},
]


def write_jsonl(path, rows, gz=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt") as handle:
            handle.write(text)
    else:
        path.write_text(text)


@pytest.fixture
def store(tmp_path):
    return FeedbackStore(tmp_path / "landing", tmp_path / "lake")


@pytest.mark.parametrize("name", ["a.jsonl", "a.jsonl.gz", "a.csv", "a.csv.gz", "a.parquet"])
def test_reads_every_supported_format(store, name):
    path = store.landing_zone / "events" / name
    path.parent.mkdir(parents=True)
    frame = pd.DataFrame(ROWS)
    if name.startswith("a.jsonl"):
        write_jsonl(path, ROWS, gz=name.endswith(".gz"))
    elif name.startswith("a.csv"):
        frame.to_csv(path, index=False, compression="gzip" if name.endswith(".gz") else None)
    else:
        frame.to_parquet(path)
    report = store.ingest("events")
    assert report.rows_in == 3 and not report.quarantined_files
    events = store.read("events")
    assert events["timestamp"].tolist() == [1_700_000_000, 1_700_000_001, 1_700_000_002]
    assert str(events["timestamp"].dtype) == "Int64"  # integer seconds, never float
    assert events["value"].iloc[1] == 4.5 and pd.isna(events["value"].iloc[2])


def test_each_file_is_ingested_exactly_once(store):
    write_jsonl(store.landing_zone / "events" / "b1.jsonl", ROWS)
    assert store.ingest("events").rows_in == 3
    assert store.pending_files("events") == []
    assert store.ingest("events").rows_in == 0
    write_jsonl(store.landing_zone / "events" / "b2.jsonl", ROWS[:1])
    report = store.ingest("events")
    assert report.rows_in == 1 and len(store.read("events")) == 4
    # a restart (new store object) reads the same ledger
    assert FeedbackStore(store.landing_zone, store.lake).pending_files("events") == []


def test_same_bytes_under_a_new_name_are_not_ingested_twice(store):
    write_jsonl(store.landing_zone / "events" / "b1.jsonl", ROWS)
    store.ingest("events")
    write_jsonl(store.landing_zone / "events" / "copy-of-b1.jsonl", ROWS)
    report = store.ingest("events")
    assert report.duplicate_files == ["events/copy-of-b1.jsonl"] and report.rows_in == 0
    assert len(store.read("events")) == 3


def test_files_still_being_written_are_invisible(store):
    folder = store.landing_zone / "events"
    write_jsonl(folder / ".b1.jsonl.tmp", ROWS)
    write_jsonl(folder / "b2.jsonl.part", ROWS)
    assert store.pending_files("events") == []
    os.replace(folder / ".b1.jsonl.tmp", folder / "b1.jsonl")
    assert [p.name for p in store.pending_files("events")] == ["b1.jsonl"]
    assert not is_ready(folder / "b2.jsonl.part")


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "empty"),
        (b"\x00\xff\xfe garbage \x89PNG", "cannot parse"),
        (b'{"user_id": "u1", "item_id": "i1"}\n', "missing required columns"),
        (gzip.compress(b'{"user_id": "u1"}\n' * 100)[:40], "cannot parse"),
    ],
)
def test_unreadable_files_are_quarantined_whole_and_others_go_on(store, content, reason):
    folder = store.landing_zone / "events"
    folder.mkdir(parents=True)
    bad = folder / ("bad.jsonl.gz" if content[:2] == b"\x1f\x8b" else "bad.jsonl")
    bad.write_bytes(content)
    write_jsonl(folder / "good.jsonl", ROWS)
    report = store.ingest("events")
    assert report.rows_in == 3
    assert [q["file"] for q in report.quarantined_files] == [f"events/{bad.name}"]
    assert reason in report.quarantined_files[0]["reason"]
    assert (store.lake / "quarantine" / "files" / "events" / bad.name).read_bytes() == content
    assert bad.exists()  # raw file kept for replay
    assert store.pending_files("events") == []  # and not retried forever


def test_catalog_updates_replace_earlier_rows(store):
    folder = store.landing_zone / "catalog"
    write_jsonl(folder / "c0.jsonl", [{"item_id": "i1", "title": "Old", "tags": ["a"]},
                                      {"item_id": "i2", "title": "Two", "tags": []}])
    store.ingest("catalog")
    write_jsonl(folder / "c1.jsonl", [{"item_id": "i1", "title": "New", "tags": ["b", "c"]}])
    store.ingest("catalog")
    catalog = store.catalog().set_index("item_id")
    assert catalog.loc["i1", "title"] == "New" and catalog.loc["i1", "tags"] == ["b", "c"]
    assert len(catalog) == 2
