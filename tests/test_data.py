"""Tests for rec_models.data: vocab, interactions, sequences and the leave-last-out split."""

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from rec_models.data import (
    ItemVocab,
    UserSequences,
    build_sequences,
    interactions,
    leave_last_out,
    list_array,
    split_lists,
)
from rec_models.data.schema import DEFAULT_EVENT_WEIGHTS, EVENT_DTYPES, EVENT_TYPE_INDEX


def events_frame(rows: list[tuple]) -> pd.DataFrame:
    """rows of (user_id, item_id, event_type, value, timestamp)."""
    return pd.DataFrame(rows, columns=["user_id", "item_id", "event_type", "value", "timestamp"])


def test_vocab_extend_appends_and_never_changes_existing_indices():
    vocab = ItemVocab(["a", "b", "c"])
    before = vocab.index(["a", "b", "c"]).tolist()

    added = vocab.extend(["c", "d", "a", "e", "d"])

    assert added == 2
    assert vocab.index(["a", "b", "c"]).tolist() == before == [1, 2, 3]
    assert vocab.index(["d", "e"]).tolist() == [4, 5]
    assert len(vocab) == 5
    assert vocab.ids == ["a", "b", "c", "d", "e"]


def test_vocab_unknown_ids_and_round_trip():
    vocab = ItemVocab(["x", "y"])
    assert vocab.index(["y", "nope"]).tolist() == [2, 0]
    assert vocab.index(["nope"], unknown=-1).tolist() == [-1]
    assert vocab.index(["y", "nope"]).dtype == np.int64
    with pytest.raises(KeyError):
        vocab.index(["nope"], unknown=None)

    restored = ItemVocab.from_dict(vocab.to_dict())
    assert restored.ids == vocab.ids
    assert restored.index(["x", "y"]).tolist() == [1, 2]


def test_interactions_keeps_positives_and_weights_them():
    events = events_frame(
        [
            ("u1", "a", "view", np.nan, 10),
            ("u1", "b", "skip", np.nan, 11),
            ("u1", "c", "dislike", np.nan, 12),
            ("u1", "d", "rating", 2.0, 13),
            ("u1", "e", "rating", 4.0, 14),
            ("u1", "f", "purchase", np.nan, 15),
        ]
    )
    out = interactions(events)

    assert out["item_id"].tolist() == ["a", "e", "f"]
    expected = [
        DEFAULT_EVENT_WEIGHTS["view"],
        DEFAULT_EVENT_WEIGHTS["rating"] * 4.0 / 5.0,
        DEFAULT_EVENT_WEIGHTS["purchase"],
    ]
    np.testing.assert_allclose(out["weight"].to_numpy(), expected)
    assert len(events) == 6  # input untouched


def test_interactions_accepts_schema_dtypes_with_missing_values():
    events = events_frame(
        [
            ("u1", "a", "rating", None, 2),
            ("u1", "b", "rating", 5.0, 1),
            ("u1", "c", "click", None, 3),
        ]
    )
    events = events.astype({column: EVENT_DTYPES[column] for column in events.columns})
    out = interactions(events)
    # A rating without a value cannot be judged positive, so it is dropped.
    assert out["item_id"].tolist() == ["b", "c"]
    np.testing.assert_allclose(out["weight"].to_numpy(), [DEFAULT_EVENT_WEIGHTS["rating"], 1.0])


def test_interactions_sort_is_stable_for_equal_timestamps():
    events = events_frame(
        [
            ("u2", "z", "click", np.nan, 5),
            ("u1", "c", "click", np.nan, 7),
            ("u1", "a", "click", np.nan, 7),
            ("u1", "early", "click", np.nan, 1),
            ("u1", "b", "click", np.nan, 7),
        ]
    )
    out = interactions(events)

    assert out["user_id"].tolist() == ["u1", "u1", "u1", "u1", "u2"]
    # Same timestamp 7: file order c, a, b is kept (not alphabetical).
    assert out["item_id"].tolist() == ["early", "c", "a", "b", "z"]


def test_interactions_sort_is_stable_with_many_ties():
    # Small inputs are sorted stably even by quicksort; 200 rows with 3 distinct timestamps
    # would be reordered by an unstable sort.
    timestamps = np.random.default_rng(0).integers(0, 3, size=200)
    rows = [("u1", f"i{row}", "click", np.nan, ts) for row, ts in enumerate(timestamps)]
    events = events_frame(rows)
    out = interactions(events)

    expected_rows = np.lexsort((np.arange(200), timestamps))  # by timestamp, then row
    assert out["item_id"].tolist() == [f"i{row}" for row in expected_rows]


def test_interactions_rejects_unknown_event_types():
    with pytest.raises(ValueError, match="unknown event types"):
        interactions(events_frame([("u1", "a", "teleport", np.nan, 1)]))


def test_build_sequences_is_chronological_and_extends_vocab_in_appearance_order():
    vocab = ItemVocab(["known"])
    events = events_frame(
        [
            ("u2", "known", "like", np.nan, 3),
            ("u1", "new2", "purchase", np.nan, 2),
            ("u1", "new1", "click", np.nan, 1),
            ("u2", "new3", "view", np.nan, 1),
        ]
    )
    seqs = build_sequences(interactions(events), vocab)

    assert vocab.ids == ["known", "new1", "new2", "new3"]
    assert seqs.user_ids == ["u1", "u2"]
    assert [s.tolist() for s in seqs.items] == [[2, 3], [4, 1]]
    assert [t.tolist() for t in seqs.event_types] == [
        [EVENT_TYPE_INDEX["click"], EVENT_TYPE_INDEX["purchase"]],
        [EVENT_TYPE_INDEX["view"], EVENT_TYPE_INDEX["like"]],
    ]


def make_sequences(lengths: dict[str, int]) -> UserSequences:
    """User u with n interactions: items 1..n in order, event types 10+1..10+n."""
    return UserSequences(
        user_ids=list(lengths),
        items=[np.arange(1, n + 1, dtype=np.int64) for n in lengths.values()],
        event_types=[np.arange(11, n + 11, dtype=np.int64) for n in lengths.values()],
    )


def test_leave_last_out_drops_short_users_and_holds_out_last_two():
    split = leave_last_out(make_sequences({"short": 4, "five": 5, "long": 8}))

    assert split.train.user_ids == ["five", "long"]
    assert [s.tolist() for s in split.train.items] == [[1, 2, 3], [1, 2, 3, 4, 5, 6]]
    assert split.val_targets.tolist() == [4, 7]
    assert split.test_targets.tolist() == [5, 8]
    assert split.val_targets.dtype == split.test_targets.dtype == np.int64
    assert split.val_histories() is split.train

    test_hist = split.test_histories()
    assert test_hist.user_ids == ["five", "long"]
    assert [s.tolist() for s in test_hist.items] == [[1, 2, 3, 4], [1, 2, 3, 4, 5, 6, 7]]
    assert [t.tolist() for t in test_hist.event_types] == [
        [11, 12, 13, 14],
        [11, 12, 13, 14, 15, 16, 17],
    ]
    # test_histories must not modify the training sequences.
    assert len(split.train.items[0]) == 3


def test_leave_last_out_min_interactions_is_configurable():
    split = leave_last_out(make_sequences({"a": 3, "b": 4}), min_interactions=4)
    assert split.train.user_ids == ["b"]
    with pytest.raises(ValueError):
        leave_last_out(make_sequences({"a": 3}), min_interactions=2)


def test_end_to_end_from_events_to_split():
    rows = []
    for user, n in [("u1", 6), ("u2", 3)]:
        for t in range(n):
            rows.append((user, f"i{t}", "click", np.nan, 100 + t))
    rows.append(("u1", "bad", "dislike", np.nan, 200))  # negative: not the test target
    vocab = ItemVocab()
    split = leave_last_out(build_sequences(interactions(events_frame(rows)), vocab))

    assert split.train.user_ids == ["u1"]
    assert vocab.ids[split.test_targets[0] - 1] == "i5"
    assert vocab.ids[split.val_targets[0] - 1] == "i4"
    assert "bad" not in vocab


def test_collapse_repeats_keeps_first_contact_with_strongest_event():
    from rec_models.data import collapse_repeats

    events = pd.DataFrame({
        "user_id": ["u1", "u1", "u1", "u1"],
        "item_id": ["a", "b", "a", "c"],
        "event_type": ["view", "click", "purchase", "view"],
        "value": [5.0, 3.0, None, 1.0],
        "timestamp": [1, 2, 3, 4],
    })
    collapsed = collapse_repeats(interactions(events))
    assert collapsed["item_id"].tolist() == ["a", "b", "c"]  # "a" stays at its first contact
    assert collapsed["event_type"].tolist() == ["purchase", "click", "view"]  # with its strongest event
    assert collapsed["timestamp"].tolist() == [1, 2, 4]


def test_unique_sorted_is_np_unique():
    from rec_models.data import unique_sorted

    rng = np.random.default_rng(3)
    for values in (rng.integers(0, 50, 1000), rng.integers(0, 2**63, 500, dtype=np.int64).astype(np.uint64),
                   np.zeros(0, dtype=np.int64), np.array([7]), np.array([[3, 1], [3, 2]])):
        got = unique_sorted(values)
        np.testing.assert_array_equal(got, np.unique(values))
        assert got.dtype == np.asarray(values).dtype


@pytest.mark.parametrize(("values", "packed"), [
    ([np.array([3, 1, 2]), np.array([], dtype=np.int64), np.array([70_000, 5])], np.int32),
    ([np.array([1, 2]), np.array([3])], np.int8),
    ([np.array([-1, 2]), np.array([2**40])], np.int64),
    ([np.array([1.5, 2.0])], np.float64),
    ([np.array([1, 2]), np.array([1.5])], None),  # mixed dtypes: pickled per user
    ([[1, 2], np.array([3])], None),  # a list: pickled per user
    ([], np.int64),
])
def test_user_sequences_pickle_round_trip_keeps_values_and_dtypes(values, packed):
    import pickle

    seqs = UserSequences([f"u{i}" for i in range(len(values))], values, [v.copy() for v in values])
    unaligned = UserSequences(["a", "b"], [np.array([1, 2]), np.array([3])], [np.array([1]), np.array([2, 3])])
    assert [a.tolist() for a in pickle.loads(pickle.dumps(unaligned)).event_types] == [[1], [2, 3]]
    back = pickle.loads(pickle.dumps(seqs))

    assert back.user_ids == seqs.user_ids
    for name in ("items", "event_types"):
        assert len(getattr(back, name)) == len(values)
        for got, want in zip(getattr(back, name), values):
            assert np.asarray(got).dtype == np.asarray(want).dtype and list(got) == list(want)
    state = seqs.__getstate__()
    assert (state["items"].values.dtype if "lengths" in state else None) == packed


@pytest.mark.parametrize("lengths", [[3, 0, 2, 1], [0, 0], []])
def test_list_array_and_split_lists_round_trip(lengths):
    arrays = [np.arange(n, dtype=np.int64) + 10 * i for i, n in enumerate(lengths)]
    flat = np.concatenate(arrays) if arrays else np.zeros(0, np.int64)
    lists = list_array(flat, lengths)
    assert lists.to_pylist() == [a.tolist() for a in arrays]
    back = split_lists(pa.chunked_array([lists]), dtype=np.int32)
    assert [a.tolist() for a in back] == [a.tolist() for a in arrays]
    assert all(a.dtype == np.int32 for a in back)
    if len(arrays) > 1:  # a slice (offsets not from 0) and several chunks
        assert [a.tolist() for a in split_lists(lists.slice(1))] == [a.tolist() for a in arrays[1:]]
        chunked = pa.chunked_array([lists.slice(0, 1), lists.slice(1)])
        assert [a.tolist() for a in split_lists(chunked)] == [a.tolist() for a in arrays]


def test_text_matrix_puts_each_vector_on_its_vocab_row():
    from rec_pipelines.item_embeddings import ItemEmbeddings
    from rec_pipelines.training import text_matrix

    vocab = ItemVocab(["a", "b", "c"])
    vectors = np.arange(12, dtype=np.float32).reshape(4, 3) + 1
    for ids, rows in ((["c", "a", "b"], [3, 1, 2]), (["c", "zz", "a"], [3, 0, 1])):  # every id known; one not in the vocab
        matrix = text_matrix(vocab, ItemEmbeddings(np.array(ids, dtype=object), vectors[: len(ids)])).numpy()
        expected = np.zeros((4, 3), np.float32)
        for vector, row in zip(vectors, rows):
            if row:
                expected[row] = vector
        assert np.array_equal(matrix, expected)
