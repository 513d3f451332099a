"""The per-user table behind ``training_data``: updated batch by batch in a real lake, it gives
exactly the training data the whole-history build gives (the previous implementation, kept
below as the reference), rebuilding only the users of each new batch; a rejected batch makes
the next update a full rebuild; the table survives in the lake between runs."""

from __future__ import annotations

import json
import threading

import numpy as np
import pandas as pd
import pytest

from rec_models.data import ItemVocab, collapse_repeats, interactions, leave_last_out
from rec_models.evaluation import protocol_sequences
from rec_models.files import write_json_atomic
from rec_models.models import event_features
from rec_pipelines.lake import BackgroundWrites, FeedbackStore, write_now
from rec_pipelines.training import assemble_training_data
from rec_pipelines.user_table import TRAINING_COLUMNS, UserTable, update_user_table

TYPES = ["view", "click", "like", "rating", "purchase", "review", "skip", "dislike"]


def reference_training_data(events: pd.DataFrame, catalog: pd.DataFrame, vocab_path, excluded: set[str]):
    """The whole-history build as the pipeline ran it before the per-user table."""
    vocab = ItemVocab.from_dict(json.loads(vocab_path.read_text())) if vocab_path.exists() else ItemVocab()
    added = vocab.extend(catalog["item_id"].astype(str))
    positives = collapse_repeats(interactions(events, min_rating=None))
    dropped = positives["user_id"].astype(str).isin(excluded).to_numpy()
    positives = positives[~dropped]
    sequences = protocol_sequences(positives, vocab, event_features)
    write_json_atomic(vocab_path, vocab.to_dict())
    lengths = np.array([len(s) for s in sequences.items]) if len(sequences) else np.zeros(1)
    stats = {"items": len(vocab), "new_items_in_vocab": added, "users": len(sequences),
             "interactions": len(positives), "bot_users_excluded": len(excluded),
             "bot_interactions_excluded": int(dropped.sum()), "median_sequence_length": float(np.median(lengths)),
             "batches": len(dict.fromkeys(events["batch_id"].astype(str)))}
    user_batches = positives.groupby("user_id", sort=False)["batch_id"].unique().map(list).to_dict()
    return vocab, sequences, leave_last_out(sequences), {str(k): v for k, v in user_batches.items()}, stats


def land_batch(landing, batch: int, rng: np.random.Generator, users: int = 25, items: int = 40) -> list[str]:
    """One landing file of random feedback: repeats of an item, negative events, ratings,
    timestamp ties and events older than earlier batches (late arrivals)."""
    rows = []
    for _ in range(int(rng.integers(40, 90))):
        kind = TYPES[int(rng.integers(len(TYPES)))]
        row = {"user_id": f"user-{int(rng.integers(users)):02d}", "item_id": f"item-{int(rng.integers(items))}",
               "event_type": kind, "timestamp": 1_700_000_000 + int(rng.integers(0, 60)) * 60 + batch * int(rng.integers(-2, 3))}
        if kind == "rating":
            row["value"] = float(rng.choice([1.0, 2.5, 3.5, 5.0]))
        rows.append(row)
    folder = landing / "events"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"batch-{batch:02d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return sorted({r["user_id"] for r in rows})


def assert_same(got, expected):
    (vocab, sequences, split, user_batches, stats), (ref_vocab, ref_sequences, ref_split, ref_batches, ref_stats) = got, expected
    assert vocab.ids == ref_vocab.ids
    assert sequences.user_ids == ref_sequences.user_ids
    for mine, theirs in ((sequences.items, ref_sequences.items), (sequences.event_types, ref_sequences.event_types),
                         (split.train.items, ref_split.train.items)):
        assert len(mine) == len(theirs) and all(np.array_equal(a, b) for a, b in zip(mine, theirs))
    np.testing.assert_array_equal(split.val_targets, ref_split.val_targets)
    np.testing.assert_array_equal(split.test_targets, ref_split.test_targets)
    np.testing.assert_array_equal(split.val_event_types, ref_split.val_event_types)
    assert user_batches == ref_batches
    assert {k: v for k, v in stats.items() if k != "users_in_split"} == ref_stats


def test_batch_by_batch_updates_equal_the_whole_history_build(tmp_path):
    rng = np.random.default_rng(11)
    store = FeedbackStore(tmp_path / "landing", tmp_path / "lake", pseudonym_key="cd" * 32)
    catalog = pd.DataFrame({"item_id": [f"item-{i}" for i in range(0, 40, 3)]})
    table_path = tmp_path / "lake" / "tables" / "user_sequences.parquet"
    pseudonymize = store.pseudonymizer()
    excluded = set(pseudonymize(["user-03", "user-07"]))
    versions = set()
    for batch in range(6):
        raw_users = land_batch(tmp_path / "landing", batch, rng)
        store.ingest("events")
        store.validate_pending()
        events = store.validated_events()
        seen = []
        with BackgroundWrites() as writes:  # odd batches: stored while the training data is built, as the asset does
            table, update, flagged = update_user_table(table_path, events, lambda rows: seen.append(rows) or {"x"},
                                                       writes.submit if batch % 2 else write_now)
            got = assemble_training_data(table, catalog, tmp_path / "vocab.json", excluded)
        everything = events.read(TRAINING_COLUMNS)
        if batch == 0:
            assert update == {"table_update": "built"}
            assert len(seen[0]) == len(everything)
        else:  # only the users of the new batch were rebuilt, from all of their rows
            assert update["table_update"] == "incremental"
            assert update["table_users_rebuilt"] == len(raw_users)
            assert set(seen[0]["user_id"]) == set(pseudonymize(raw_users))
            assert len(seen[0]) == everything["user_id"].isin(set(pseudonymize(raw_users))).sum()
        assert flagged == {"x"}
        expected = reference_training_data(events.read(TRAINING_COLUMNS), catalog, tmp_path / "ref-vocab.json", excluded)
        data, stats = got
        assert_same((data.vocab, data.sequences, data.split, data.user_batches, stats), expected)
        assert data.batches == list(events.batches)
        # what the lake keeps is the table itself
        stored = UserTable.load(table_path)
        assert stored.covered == list(events.batches) and list(stored.user_ids) == list(table.user_ids)
        assert stored.version == table.version and table.version not in versions
        versions.add(table.version)
        assert all(np.array_equal(stored.item_ids(i), table.item_ids(i)) for i in range(len(table.user_ids)))

    # nothing new: unchanged, nothing written
    _, update, _ = update_user_table(table_path, store.validated_events())
    assert update["table_update"] == "unchanged"
    # a batch rejected after the table covered it: its rows are gone, the table is rebuilt
    store.reject_batches([store.validated_events().batches[2]], "bad export")
    events = store.validated_events()
    table, update, _ = update_user_table(table_path, events)
    assert update == {"table_update": "rebuilt"}
    data, stats = assemble_training_data(table, catalog, tmp_path / "vocab.json", excluded)
    expected = reference_training_data(events.read(TRAINING_COLUMNS), catalog, tmp_path / "ref-vocab.json", excluded)
    assert_same((data.vocab, data.sequences, data.split, data.user_batches, stats), expected)


def test_a_table_of_another_format_is_rebuilt(tmp_path):
    path = tmp_path / "user_sequences.parquet"
    assert UserTable.load(path) is None
    path.write_bytes(b"PAR1 not a table")
    with pytest.raises(Exception):  # a damaged file is an error, never silently a partial table
        UserTable.load(path)


def test_a_whole_build_in_shares_of_users_equals_one_pass(tmp_path, monkeypatch):
    """``build_from`` reads a share of the users at a time (bounded memory on large histories):
    the table, the flags and the training data are those of one pass over every row."""
    import rec_pipelines.user_table as user_table

    rng = np.random.default_rng(5)
    store = FeedbackStore(tmp_path / "landing", tmp_path / "lake", pseudonym_key="ab" * 32)
    for batch in range(4):
        land_batch(tmp_path / "landing", batch, rng, users=40)
    store.ingest("events")
    store.validate_pending()
    events = store.validated_events()
    calls = []

    def flag(rows):  # per user, as the bot rule: here users with more than 6 rows
        calls.append(set(rows["user_id"]))
        counts = rows["user_id"].value_counts()
        return set(counts.index[counts > 6])

    whole = UserTable.build_from(events, flag)
    assert len(calls) == 1
    monkeypatch.setattr(user_table, "BUILD_ROWS", events.rows // 4)
    calls.clear()
    shared = UserTable.build_from(events, flag)
    assert len(calls) >= 4 and all(a.isdisjoint(b) for i, a in enumerate(calls) for b in calls[i + 1:])
    assert list(shared.user_ids) == list(whole.user_ids) and len(whole.user_ids) > 30
    for i in range(len(whole.user_ids)):
        assert np.array_equal(shared.item_ids(i), whole.item_ids(i))
        assert np.array_equal(shared.features[i], whole.features[i])
    assert shared.batch_ids == whole.batch_ids and shared.batches == whole.batches and shared.covered == whole.covered
    assert shared.flagged == whole.flagged and len(whole.flagged) > 0
    catalog = pd.DataFrame({"item_id": ["item-1", "item-2"]})
    got, expected = training(shared, catalog, tmp_path / "a.json"), training(whole, catalog, tmp_path / "b.json")
    expected[4].pop("users_in_split")  # assert_same compares it on one side only
    assert_same(got, expected)


def training(table, catalog, vocab_path):
    data, stats = assemble_training_data(table, catalog, vocab_path, set())
    return data.vocab, data.sequences, data.split, data.user_batches, stats


def test_background_writes_finish_before_the_block_ends_and_raise_their_failure(tmp_path):
    release, done = threading.Event(), []
    with BackgroundWrites() as writes:
        writes.submit(lambda: (release.wait(30), done.append("written")))
        assert done == []  # the caller goes on while the write runs
        release.set()
    assert done == ["written"]  # and the block ends when it is done
    with pytest.raises(FileNotFoundError), BackgroundWrites() as writes:
        writes.submit((tmp_path / "missing" / "table.parquet").write_bytes, b"x")
    with pytest.raises(KeyError), BackgroundWrites() as writes:  # the block's own error wins
        writes.submit((tmp_path / "missing" / "table.parquet").write_bytes, b"x")
        raise KeyError("the caller's")
