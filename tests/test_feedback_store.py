"""Landing zone → lake: formats, exactly-once ingestion and validation, whole-file and per-row
quarantine, pseudonymised ids and scrubbed text, the pseudonym key, concurrent ingestion."""

import gzip
import hashlib
import hmac
import json
import logging
import multiprocessing
import os
import stat

import numpy as np
import pandas as pd
import pytest

from rec_models.data.privacy import KEY_ENV, PSEUDONYM_PATTERN, pseudonymize, scrub_text
from rec_pipelines.lake import FeedbackStore, LakeError, is_ready, load_pseudonym_key

ROWS = [
    {"user_id": "u1", "item_id": "i1", "event_type": "view", "value": 12.0, "timestamp": 1_700_000_000},
    {"user_id": "u1", "item_id": "i2", "event_type": "rating", "value": 4.5, "timestamp": 1_700_000_001},
    {"user_id": "u2", "item_id": "i1", "event_type": "purchase", "value": None, "timestamp": 1_700_000_002},
]
KEY = "test-key-" + "0" * 23


def write_jsonl(path, rows, gz=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt") as handle:
            handle.write(text)
    else:
        path.write_text(text)


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    return FeedbackStore(tmp_path / "landing", tmp_path / "lake", pseudonym_key=KEY)


@pytest.mark.parametrize("name", ["a.jsonl", "a.ndjson", "a.jsonl.gz", "a.json", "a.csv", "a.csv.gz", "a.parquet",
                                  "a.pq"])
def test_reads_every_supported_format(store, name):
    path = store.landing_zone / "events" / name
    path.parent.mkdir(parents=True)
    frame = pd.DataFrame(ROWS)
    if name == "a.json":  # .json may also hold one array of objects
        path.write_text(json.dumps(ROWS))
    elif ".csv" in name:
        frame.to_csv(path, index=False, compression="gzip" if name.endswith(".gz") else None)
    elif name.endswith(("parquet", "pq")):
        frame.to_parquet(path)
    else:
        write_jsonl(path, ROWS, gz=name.endswith(".gz"))
    report = store.ingest("events")
    assert report.rows_in == 3 and not report.quarantined_files
    events = store.read("events")
    assert events["timestamp"].tolist() == [1_700_000_000, 1_700_000_001, 1_700_000_002]
    assert str(events["timestamp"].dtype) == "Int64"  # integer seconds, never float
    assert events["value"].iloc[1] == 4.5 and pd.isna(events["value"].iloc[2])
    assert events["source_row"].tolist() == [1, 2, 3]
    assert events["user_id"].tolist() == pseudonymize(["u1", "u1", "u2"], KEY)


def test_csv_ids_keep_their_leading_zeros(store):
    path = store.landing_zone / "events" / "zeros.csv"
    path.parent.mkdir(parents=True)
    path.write_text("user_id,item_id,event_type,timestamp\n007,0042,view,1700000000\n")
    store.ingest("events")
    events = store.read("events")
    assert events["item_id"].tolist() == ["0042"] and events["user_id"].tolist() == pseudonymize(["007"], KEY)


def test_each_file_is_ingested_and_validated_exactly_once(store):
    write_jsonl(store.landing_zone / "events" / "b1.jsonl", ROWS)
    assert store.ingest("events").rows_in == 3
    assert store.pending_files("events") == []
    assert store.ingest("events").rows_in == 0
    [account] = store.validate_pending()
    assert (account["rows_in"], account["rows_valid"], account["rows_quarantined"]) == (3, 3, 0)
    assert store.validate_pending() == []
    write_jsonl(store.landing_zone / "events" / "b2.jsonl", ROWS[:1] + [{**ROWS[0], "timestamp": 5}])
    report = store.ingest("events")
    assert report.rows_in == 2 and len(store.read("events")) == 5
    [account] = store.validate_pending()
    # b2's first row is b1's first row again: quarantined as a duplicate across batches
    assert account["reasons"] == {"duplicate of an event in an earlier batch": 1,
                                  "timestamp before the floor (1995-01-01)": 1}
    assert len(store.read_validated()) == 3 and len(store.quarantined_rows()) == 2
    # a restart (new store object) reads the same ledger and accounts
    again = FeedbackStore(store.landing_zone, store.lake, pseudonym_key=KEY)
    assert again.pending_files("events") == [] and again.validate_pending() == []


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
    write_jsonl(folder / "b3.jsonl", ROWS)
    (folder / "b3.jsonl.writing").touch()
    assert store.pending_files("events") == []
    os.replace(folder / ".b1.jsonl.tmp", folder / "b1.jsonl")
    (folder / "b3.jsonl.writing").unlink()
    assert [p.name for p in store.pending_files("events")] == ["b1.jsonl", "b3.jsonl"]
    assert not is_ready(folder / "b2.jsonl.part")


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "empty"),
        (b"\x00\xff\xfe garbage \x89PNG", "not UTF-8"),
        (b'{"user_id": "u1", "item_id": "i1"}\n', "missing required columns"),
        (gzip.compress(b'{"user_id": "u1"}\n' * 100)[:40], "truncated gzip"),
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
    [record] = (store.lake / "quarantine" / "files" / "events").glob("bad-*.json")
    assert reason in json.loads(record.read_text())["reason"]  # the reason, not the bytes (raw ids)
    assert bad.read_bytes() == content  # raw file kept for replay
    assert store.pending_files("events") == []  # and not retried forever


def test_the_lake_holds_pseudonyms_and_scrubbed_text_only(store):
    rows = [{**ROWS[0], "session_id": "u1-s1", "text": "mail u1 at jane@example.org or +44 20 7946 0958"}]
    write_jsonl(store.landing_zone / "events" / "b1.jsonl", rows + [{**ROWS[1], "user_id": "u1"}])
    store.ingest("events")
    store.validate_pending()
    for path in store.lake.rglob("*.parquet"):
        frame = pd.read_parquet(path)
        assert frame["user_id"].str.fullmatch(PSEUDONYM_PATTERN).all(), path
        assert frame["session_id"].dropna().str.startswith("s_").all()
        assert not frame["text"].dropna().str.contains("jane@|7946", regex=True).any()
    validated = store.read_validated()
    assert validated["text"].iloc[0] == "mail u1 at [email] or [phone]"
    assert validated["user_id"].nunique() == 1  # one user, one pseudonym across rows
    assert store.pseudonymizer()(["u1"]) == [validated["user_id"].iloc[0]]
    assert (store.landing_zone / "events" / "b1.jsonl").read_text().count("jane@example.org") == 1  # raw kept


def test_the_pseudonym_key_is_generated_once_kept_private_and_guarded(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv(KEY_ENV, raising=False)
    lake = tmp_path / "lake"
    with pytest.raises(LakeError, match="no pseudonym key"):  # looking a key up never invents one
        load_pseudonym_key(lake)
    with caplog.at_level(logging.WARNING, logger="rec_models.data.privacy"):
        key = FeedbackStore(tmp_path / "landing", lake).pseudonym_key()
    assert "generated a new pseudonym key" in caplog.text
    key_file = lake / "secrets" / "pseudonym.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600 and len(key) == 32
    assert load_pseudonym_key(lake) == key == FeedbackStore(tmp_path / "landing", lake).pseudonym_key()

    write_jsonl(tmp_path / "landing" / "events" / "b1.jsonl", ROWS)
    FeedbackStore(tmp_path / "landing", lake).ingest("events")
    monkeypatch.setenv(KEY_ENV, "another-key-" + "1" * 20)  # the environment wins over the file...
    other = FeedbackStore(tmp_path / "landing", lake)
    assert other.pseudonym_key() != key
    write_jsonl(tmp_path / "landing" / "events" / "b2.jsonl", ROWS[:1])
    with pytest.raises(LakeError, match="pseudonym key changed"):  # ...but never mixes pseudonym spaces
        other.ingest("events")


def test_a_lake_from_before_pseudonymisation_is_refused(store):
    store.lake.mkdir(parents=True)
    store.ledger_path.write_text(json.dumps({"kind": "events", "file": "events/old.jsonl", "sha256": "0" * 64,
                                             "size": 1, "status": "ingested", "batch_id": "old-00000000"}) + "\n")
    with pytest.raises(LakeError, match="older version"):
        store.validate_pending()


def test_rejected_batches_leave_training_data_for_the_quarantine(store):
    write_jsonl(store.landing_zone / "events" / "b1.jsonl", ROWS + [{**ROWS[0], "event_type": "teleport"}])
    write_jsonl(store.landing_zone / "events" / "b2.jsonl", [{**ROWS[0], "item_id": "i9"}])
    store.ingest("events")
    first, second = store.validate_pending()
    assert store.reject_batches([first["batch_id"]], "failed the suite") == [first["batch_id"]]
    assert store.reject_batches([first["batch_id"]], "failed the suite") == []  # once
    account = store.account(first["batch_id"])
    assert (account["rows_in"], account["rows_valid"], account["rows_quarantined"]) == (4, 0, 4)
    assert account["reasons"] == {"unknown event_type": 1, "failed the suite": 3}
    assert store.read_validated()["batch_id"].tolist() == [second["batch_id"]]
    assert store.quarantined_rows(first["batch_id"])["source_row"].tolist() == [1, 2, 3, 4]


def test_catalog_updates_replace_earlier_rows_and_rows_without_id_are_quarantined(store):
    folder = store.landing_zone / "catalog"
    write_jsonl(folder / "c0.jsonl", [{"item_id": "i1", "title": "Old", "tags": ["a"]},
                                      {"item_id": "i2", "title": "Two", "tags": []},
                                      {"item_id": None, "title": "Nobody"}])
    report = store.ingest("catalog")
    assert report.rows_in == 3
    assert store.quarantined_rows(report.batches[0])["reason"].tolist() == ["missing item_id"]
    write_jsonl(folder / "c1.jsonl", [{"item_id": "i1", "title": "New", "tags": ["b", "c"],
                                       "description": "ask sales@shop.example"}])
    store.ingest("catalog")
    catalog = store.catalog().set_index("item_id")
    assert catalog.loc["i1", "title"] == "New" and catalog.loc["i1", "tags"] == ["b", "c"]
    assert catalog.loc["i1", "description"] == "ask [email]"
    assert len(catalog) == 2


def _ingest(landing, lake, queue):
    report = FeedbackStore(landing, lake, pseudonym_key=KEY).ingest("events")
    queue.put(report.batches)


def test_concurrent_ingestion_reads_each_file_once(store):
    for i in range(8):
        write_jsonl(store.landing_zone / "events" / f"b{i}.jsonl", [{**ROWS[0], "timestamp": 1_700_000_000 + i}])
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    workers = [context.Process(target=_ingest, args=(store.landing_zone, store.lake, queue)) for _ in range(3)]
    for worker in workers:
        worker.start()
    batches = [b for _ in workers for b in queue.get(timeout=60)]
    for worker in workers:
        worker.join(timeout=60)
    assert sorted(batches) == sorted(store.batches("events")) and len(batches) == 8


def test_pseudonyms_and_scrubbing():
    ids = pseudonymize(["u1", None, "u1", 42, "42"], KEY)
    assert ids[0] == ids[2] and ids[1] is None and ids[3] == ids[4]  # 42 and "42" are one id
    assert all(pd.Series([i for i in ids if i]).str.fullmatch(PSEUDONYM_PATTERN))
    assert ids[0] == "p_" + hmac.new(KEY.encode(), b"u1", hashlib.sha256).hexdigest()[:16]  # HMAC-SHA256
    assert pseudonymize(["u1"], "x" * 32) != pseudonymize(["u1"], KEY)
    series = pseudonymize(pd.Series(["u1", None], index=[5, 7], dtype="string"), KEY)
    assert series.index.tolist() == [5, 7] and series.isna().tolist() == [False, True]
    with pytest.raises(ValueError):
        pseudonymize(["u1"], "short")
    assert scrub_text("write jane.doe+x@mail.example.com now") == "write [email] now"
    assert scrub_text("call (555) 123-4567 or +44 20 7946 0958") == "call [phone] or [phone]"
    assert scrub_text("on 2024-01-02 I paid 25 dollars in 1999") == "on 2024-01-02 I paid 25 dollars in 1999"
    assert scrub_text(None) is None
    many = pseudonymize(pd.Series(np.arange(50_000) % 5_000).astype("string"), KEY)
    assert many.nunique() == 5_000


def test_the_persisted_key_index_reads_only_newer_batches_and_heals_when_stale(store, monkeypatch):
    """``validate_pending`` catches duplicates of earlier batches from the sorted key index, reading
    only the partitions of batches it does not cover; a batch rejected since, or a torn index,
    makes it rebuild from the partitions, so no event is lost or counted twice."""
    from rec_pipelines.lake.batches import KEY_INDEX

    earlier = "duplicate of an event in an earlier batch"

    def land(name, rows):
        write_jsonl(store.landing_zone / "events" / name, rows)
        store.ingest("events")
        (account,) = store.validate_pending()
        return account

    read = []
    original = type(store)._validated_keys
    monkeypatch.setattr(type(store), "_validated_keys", lambda self, ids=None: read.append(ids) or original(self, ids))
    first = land("b1.jsonl", ROWS)
    index = store.lake / "validated" / KEY_INDEX
    covering_first = index.read_bytes()
    seven = {**ROWS[0], "item_id": "i7"}
    second = land("b2.jsonl", [ROWS[0], seven])
    assert second["reasons"] == {earlier: 1} and second["rows_valid"] == 1
    assert read == [[]]  # the index covered b1: no partition read for it
    index.write_bytes(covering_first)  # as if a crash came after b2's accounts, before its index
    third = land("b3.jsonl", [seven, {**ROWS[1], "item_id": "i8"}])
    assert read[-1] == [second["batch_id"]]  # only the batch the index does not cover
    assert third["reasons"] == {earlier: 1} and third["rows_valid"] == 1

    store.reject_batches([second["batch_id"]], "failed the suite")  # the index still holds its keys
    fourth = land("b4.jsonl", [seven])
    assert read[-1] == [first["batch_id"], third["batch_id"]]  # stale: rebuilt from every valid batch
    assert fourth["rows_valid"] == 1 and fourth["reasons"] == {}  # no valid copy of it is left

    index.write_bytes(b"torn")
    fifth = land("b5.jsonl", [seven, {**ROWS[2], "item_id": "i9"}])
    assert len(read[-1]) == 3 and fifth["reasons"] == {earlier: 1}
    events = store.read_validated()
    assert len(events) == len(ROWS) + 3 and events.duplicated(["user_id", "item_id", "event_type", "timestamp"]).sum() == 0
    sixth = land("b6.jsonl", [{**ROWS[2], "item_id": "i9"}])  # the rebuilt index covers b5: nothing read
    assert len(read) == 4 and sixth["reasons"] == {earlier: 1} and sixth["rows_valid"] == 0
