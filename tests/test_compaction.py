"""Compaction of the validated events: small batch files merged into files of consecutive
batches read exactly as before, each batch still validated again, rejected and accounted on its
own, replaced files deleted one compaction later."""

import json

import numpy as np
import pandas as pd
import pytest

from rec_pipelines.lake import FeedbackStore
from rec_pipelines.lake.tables import compacted_batches
from rec_pipelines.user_table import UserTable

KEY = "test-key-" + "0" * 23
COLUMNS = ["batch_id", "user_id", "item_id", "event_type", "value", "timestamp"]


def add_batch(store, n, rows):
    path = store.landing_zone / "events" / f"batch-{n:03d}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    store.ingest("events")
    store.validate_pending()


def small_batches(store, count, seed=0):
    """``count`` batches of a few events each; some rows invalid, some events repeated in a
    later batch (quarantined there as duplicates), some timestamps tied across users."""
    rng = np.random.default_rng(seed)
    earlier = []
    for n in range(count):
        rows = [{"user_id": f"u{rng.integers(12)}", "item_id": f"i{rng.integers(30)}",
                 "event_type": str(rng.choice(["view", "click", "rating"])), "value": float(rng.integers(1, 6)),
                 "timestamp": 1_700_000_000 + int(rng.integers(50))} for _ in range(6)]
        rows.append({"user_id": "", "item_id": "i1", "event_type": "view", "value": 1.0, "timestamp": 1_700_000_000})
        if earlier:
            rows.append(earlier[-1])  # an event already valid in the previous batch
        earlier = rows[:6]
        add_batch(store, n, rows)


def reads(store):
    """Everything readers take from the validated events, in the order they get it."""
    events = store.validated_events()
    some_users = sorted(events.read(["user_id"])["user_id"].unique())[:3]
    table = UserTable.build_from(events)
    return {
        "all": events.read(COLUMNS),
        "users": events.read_users(some_users, COLUMNS),
        "distinct": sorted(events.distinct("item_id")),
        "shares": pd.concat(events.by_user_shares(COLUMNS, 20)).sort_values(["user_id", "timestamp"], kind="stable"),
        "part": store.validated_events(events.batches[3:7:2]).read(COLUMNS),  # two batches of one compacted file
        "keys": np.sort(store._validated_keys()),
        "table": (list(table.user_ids), [list(table.item_ids(i)) for i in range(len(table.user_ids))],
                  [list(f) for f in table.features], table.batch_ids),
    }


def assert_same(got, expected):
    for name, value in expected.items():
        if isinstance(value, pd.DataFrame):
            pd.testing.assert_frame_equal(got[name].reset_index(drop=True), value.reset_index(drop=True), obj=name)
        elif isinstance(value, np.ndarray):
            np.testing.assert_array_equal(got[name], value)
        else:
            assert got[name] == value, name


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.delenv("RECSYS_PSEUDONYM_KEY", raising=False)
    return FeedbackStore(tmp_path / "landing", tmp_path / "lake", pseudonym_key=KEY)


def validated_files(store):
    return sorted(p.relative_to(store.lake / "validated").as_posix() for p in (store.lake / "validated").rglob("*.parquet"))


def test_compacted_batches_read_exactly_as_before(store):
    small_batches(store, 12)
    before = reads(store)
    handle = store.validated_events()  # made before the compaction: still reads
    assert store.compact(min_files=13)["files_written"] == 0  # fewer small files than asked for: nothing to do

    report = store.compact(min_files=4, target_rows=30)
    assert report["small_files"] == 12 and report["compacted_batches"] == 12
    assert report["files_written"] == len({n for n in compacted_batches(store.lake).values()}) >= 2
    assert_same(reads(store), before)
    pd.testing.assert_frame_equal(handle.read(COLUMNS), before["all"])
    assert {a["rows_in"] for a in store.accounts()} == {7, 8}  # each batch keeps its own accounting

    # the replaced batch files stay for readers that listed them, until the next compaction
    assert len(validated_files(store)) == 12 + report["files_written"]
    add_batch(store, 50, [{"user_id": "u1", "item_id": "i99", "event_type": "view", "value": 1.0,
                           "timestamp": 1_700_000_100}])
    second = store.compact(min_files=4, target_rows=30)
    assert second["retired_deleted"] == 12 and second["files_written"] == 0  # one new small file waits
    assert validated_files(store) == sorted([*{n for n in compacted_batches(store.lake).values()},
                                             f"{store.validated_events().batches[-1]}.parquet"])
    assert store.validated_events().read(["item_id"])["item_id"].iloc[-1] == "i99"
    assert store.validated_events().rows == before["all"].shape[0] + 1


def test_a_compacted_batch_is_validated_again_and_rejected_on_its_own(store, tmp_path):
    twin = FeedbackStore(tmp_path / "landing", tmp_path / "twin", pseudonym_key=KEY)
    small_batches(store, 8)
    twin.ingest("events")
    twin.validate_pending()
    store.compact(min_files=4, target_rows=1_000)
    assert len(set(compacted_batches(store.lake).values())) == 1
    batch, other = store.validated_events().batches[2], store.validated_events().batches[5]

    strict = dict(min_timestamp=1_700_000_025)  # about half of the rows are now too old
    assert store.revalidate(batch, **strict)["rows_valid"] == twin.revalidate(batch, **strict)["rows_valid"]
    assert batch not in compacted_batches(store.lake) and not compacted_batches(store.lake)  # its file split back
    assert store.reject_batches([other], "bad export") == twin.reject_batches([other], "bad export") == [other]
    assert_same(reads(store), reads(twin))
    for account, twin_account in zip(store.accounts(), twin.accounts()):
        assert account["rows_in"] == account["rows_valid"] + account["rows_quarantined"]
        assert {k: account[k] for k in ("batch_id", "rows_valid", "reasons")} == \
            {k: twin_account[k] for k in ("batch_id", "rows_valid", "reasons")}
    pd.testing.assert_frame_equal(store.quarantined_rows(other), twin.quarantined_rows(other))

    # compacted again around the rejected batch: it ends a run, the files stay in ingestion order
    store.compact(min_files=2, target_rows=1_000)
    assert other not in compacted_batches(store.lake) and len(set(compacted_batches(store.lake).values())) == 2
    assert_same(reads(store), reads(twin))


def test_batches_after_one_not_validated_yet_wait(store):
    small_batches(store, 6)
    path = store.landing_zone / "events" / "late.jsonl"
    path.write_text(json.dumps({"user_id": "u1", "item_id": "i1", "event_type": "view", "value": 1.0,
                                "timestamp": 1_700_000_000}) + "\n")
    store.ingest("events")  # ingested, not validated: it and anything after it stay as they are
    report = store.compact(min_files=2, target_rows=1_000)
    assert report["compacted_batches"] == 6
    waiting = store.batches("events")[-1]
    assert waiting not in compacted_batches(store.lake)
    with pytest.raises(ValueError, match="min_files"):
        store.compact(min_files=1)


def test_a_compaction_that_dies_before_its_manifest_leaves_nothing_behind(store, monkeypatch):
    """Killed between writing its files and naming them in the manifest, a compaction changes
    nothing readers see; the next one deletes the files it left and compacts again."""
    small_batches(store, 8)
    before = reads(store)

    def die(manifest):
        raise KeyboardInterrupt("killed")
    with monkeypatch.context() as patched:
        patched.setattr(store, "_write_manifest", die)
        with pytest.raises(KeyboardInterrupt):
            store.compact(min_files=4, target_rows=30)
    left = [name for name in validated_files(store) if name.startswith("compacted/")]
    assert left and not compacted_batches(store.lake)  # written, never named
    assert_same(reads(store), before)

    report = store.compact(min_files=4, target_rows=30)
    assert report["orphans_deleted"] == len(left) and report["files_written"] >= 2
    named = set(compacted_batches(store.lake).values())
    assert {name for name in validated_files(store) if name.startswith("compacted/")} == named
    assert not named & set(left)
    assert_same(reads(store), before)
