"""The per-user table behind ``training_data``: each user's protocol sequence (item ids in
stable time order, one interaction per item, event features, the batches it came from), kept
in the lake as ``<lake>/tables/user_sequences.parquet`` and updated by the batches a run adds.

An update rebuilds only the users with events in the new batches, from all of their rows (read
from the lake filtered to those users), with the same functions a full build uses, so the
table after any sequence of updates equals the table built from all batches at once
(``tests/test_user_table.py``); everyone else is kept as stored. A batch that left the
validated events after the table covered it (rejected after the fact) makes the next update a
full rebuild, and so does a covered batch validated again (``FeedbackStore.revalidate``: its
``validated_at`` changed). ``training_data_from`` then maps the table onto the append-only item vocabulary
and the leave-last-out split, without the excluded (bot-like) users. Each store gives the table
a new ``version``: what ``training_data`` hands over names the version it read. In memory, item ids are
codes into one array of the distinct ids (no Python string per row: at 10M events the table
loads in 1.9 s instead of 2.1 s and 0.7 GB instead of 1.25, and maps onto the vocabulary in
0.9 s instead of 4.3 s)."""

from __future__ import annotations

import hashlib
import inspect
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from rec_models.data import (
    ItemVocab,
    UserSequences,
    collapse_repeats,
    interactions,
    leave_last_out,
    list_array,
    split_at,
    split_lists,
)
from rec_models.data.schema import DEFAULT_EVENT_WEIGHTS, EVENT_TYPE_INDEX
from rec_models.files import parquet_source
from rec_models.models import event_features
from rec_pipelines.lake import ValidatedEvents, write_now
from rec_pipelines.lake.tables import write_arrow_atomic

TABLE_FORMAT = 1


def _definition() -> str:
    """A fingerprint of what a user's row is made of (the functions and weights that build it):
    a table stored by code that builds rows differently is rebuilt, never mixed with new rows."""
    parts = [inspect.getsource(f) for f in (interactions, collapse_repeats, event_features)]
    parts += [json.dumps(DEFAULT_EVENT_WEIGHTS, sort_keys=True), json.dumps(EVENT_TYPE_INDEX, sort_keys=True)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


DEFINITION = _definition()
TRAINING_COLUMNS = ["batch_id", "user_id", "item_id", "event_type", "value", "timestamp"]
"""The columns of the validated events that training data is built from."""
BUILD_ROWS = 2_000_000
"""A whole build reads about this many rows at a time (a share of the users, each with all of
their rows): at 10M events, 5 shares, the ``training_data`` step's peak RSS 5.7 -> 2.1 GB and
55 -> 46 s, the same table."""


@dataclass
class UserTable:
    user_ids: np.ndarray  # sorted (object array of str)
    item_codes: list[np.ndarray]  # per user, int32 positions in ``items``, in sequence order
    items: np.ndarray  # object array of item ids: the item of each code (10M rows hold 100k distinct ids)
    features: list[np.ndarray]  # per user, int64 event features (``sasrec.event_features``)
    batch_ids: list[list[str]]  # per user, the batches of its interactions, in sequence order
    covered: list[str]  # the validated batches the table holds, in ingestion order
    batches: list[str]  # ... those with at least one row
    flagged: list[str] | None = None  # users a flag function marked (bot-like), kept with the rows; None: not run
    covered_at: list[float] = field(default_factory=list)  # when each covered batch was validated ([]: not known)
    version: str | None = None  # a new random id each time the table is stored (None: never stored)

    @classmethod
    def build(cls, events: pd.DataFrame, covered: list[str], flag_users: Callable | None = None,
              covered_at: list[float] = ()) -> UserTable:
        """The table of ``events`` (validated rows in ingestion order, ``TRAINING_COLUMNS``)."""
        flagged = None if flag_users is None else sorted(set(flag_users(events)) if len(events) else set())
        return cls(*_per_user(events), list(covered), list(dict.fromkeys(events["batch_id"].astype(str))), flagged,
                   list(covered_at))

    @classmethod
    def build_from(cls, events: ValidatedEvents, flag_users: Callable | None = None) -> UserTable:
        """The table of every row of ``events``, built ``BUILD_ROWS`` rows at a time: the users
        are cut into shares (each user's rows all in one share) and the shares' tables joined.
        Rows, flags and order are those of one build over all rows; only the memory differs."""
        covered, covered_at = list(events.batches), list(events.validated_at)
        parts = [cls.build(frame, covered, flag_users, covered_at)
                 for frame in events.by_user_shares(TRAINING_COLUMNS, BUILD_ROWS)]
        if len(parts) == 1:
            return parts[0]
        items = pd.unique(np.concatenate([part.items for part in parts]))
        dictionary = pd.Index(items)
        codes = []
        for part in parts:
            recode = dictionary.get_indexer(part.items).astype(np.int32)
            codes += [recode[c] for c in part.item_codes]
        user_ids = np.concatenate([part.user_ids for part in parts])
        order = np.argsort(user_ids, kind="stable")  # shares are ranges of sorted ids: already in order
        pick = lambda lists: [lists[i] for i in order]  # noqa: E731
        with_rows = set().union(*(part.batches for part in parts))
        flagged = None if flag_users is None else sorted(set().union(*(part.flagged for part in parts)))
        return cls(user_ids[order], pick(codes), np.asarray(items, dtype=object),
                   pick([f for part in parts for f in part.features]), pick([b for part in parts for b in part.batch_ids]),
                   covered, [b for b in covered if b in with_rows], flagged, covered_at)

    def item_ids(self, position: int) -> np.ndarray:
        """The item ids of the user at ``position``, in sequence order."""
        return self.items[self.item_codes[position]]

    def updated(self, events: ValidatedEvents, flag_users: Callable | None = None) -> tuple[UserTable, dict]:
        """This table with the batches of ``events`` it does not cover yet, and what it did.
        ``flag_users`` (rows -> user ids) runs on every row of each rebuilt user; its marks
        are kept with the table, the rebuilt users' replaced."""
        current, current_at = list(events.batches), list(events.validated_at)
        covered = len(self.covered)
        # Rebuild when a covered batch was rejected or validated again, or to flag everyone once (never flagged).
        # A table stored before covered_at existed is rebuilt once (it cannot tell re-validated batches).
        if (current[:covered] != self.covered or (current_at and current_at[:covered] != self.covered_at)
                or (flag_users is not None and self.flagged is None)):
            return UserTable.build_from(events, flag_users), {"table_update": "rebuilt"}
        new = current[len(self.covered):]
        if not new:
            return self, {"table_update": "unchanged", "table_users_rebuilt": 0}
        fresh = ValidatedEvents(events.lake, tuple(new), 0).read(["batch_id", "user_id"])
        affected = fresh["user_id"].astype(str).unique()
        rows = events.read_users(affected, TRAINING_COLUMNS)
        ids, codes, items, features, batch_ids = _per_user(rows)
        known = pd.Index(self.items).get_indexer(items)  # the rebuilt users' codes, in this table's dictionary
        added = np.flatnonzero(known < 0)
        known[added] = len(self.items) + np.arange(len(added))
        codes = [known[c].astype(np.int32) for c in codes]
        flagged = None if flag_users is None else sorted((set(self.flagged) - set(affected)) | set(flag_users(rows)))
        keep = np.flatnonzero(~_members(self.user_ids, affected))
        user_ids = np.concatenate([self.user_ids[keep], ids])
        order = np.argsort(user_ids, kind="stable")
        pick = lambda old, rebuilt: [(old[keep[i]] if i < len(keep) else rebuilt[i - len(keep)]) for i in order]  # noqa: E731
        table = UserTable(user_ids[order], pick(self.item_codes, codes), np.concatenate([self.items, items[added]]),
                          pick(self.features, features), pick(self.batch_ids, batch_ids), current,
                          self.batches + list(dict.fromkeys(fresh["batch_id"].astype(str))), flagged, current_at)
        return table, {"table_update": "incremental", "table_users_rebuilt": len(affected),
                       "table_new_batches": len(new)}

    # -- the lake's copy ---------------------------------------------------------------------
    def save(self, path, version: str | None = None) -> None:
        """Store the table as a new ``version`` (given, or a random id)."""
        self.version = version or uuid.uuid4().hex
        lengths = [len(a) for a in self.item_codes]
        codes = np.concatenate(self.item_codes) if lengths else np.zeros(0, np.int32)
        table = pa.table({
            "user_id": pa.array(self.user_ids.tolist(), pa.string()),
            "item_ids": list_array(pa.array(self.items, pa.string()).take(pa.array(codes)), lengths),
            "features": list_array(pa.array(np.concatenate(self.features) if lengths else [], pa.int64()), lengths),
            "batch_ids": pa.array(self.batch_ids, pa.list_(pa.string())),
        }).replace_schema_metadata({"recsys": json.dumps(
            {"format": TABLE_FORMAT, "definition": DEFINITION, "covered": self.covered, "batches": self.batches,
             "flagged": self.flagged, "covered_at": self.covered_at, "version": self.version})})
        write_arrow_atomic(table, path)

    @classmethod
    def load(cls, path) -> UserTable | None:
        """The stored table, or None when there is none or it was built by other definitions."""
        try:  # item ids read as dictionary codes: no Python string per row (10M rows, 100k ids)
            table = pq.read_table(parquet_source(path), read_dictionary=["item_ids.list.element"])
        except FileNotFoundError:
            return None
        meta = json.loads((table.schema.metadata or {}).get(b"recsys", b"{}"))
        if meta.get("format") != TABLE_FORMAT or meta.get("definition") != DEFINITION:
            return None
        item_lists = table.column("item_ids").combine_chunks()  # (one dictionary for all chunks)
        encoded = item_lists.flatten()
        if not pa.types.is_dictionary(encoded.type):  # (a list field named otherwise)
            encoded = encoded.dictionary_encode()
        return cls(np.array(table.column("user_id").to_pylist(), dtype=object),
                   split_lists(item_lists, encoded.indices.to_numpy().astype(np.int32, copy=False)),
                   encoded.dictionary.to_numpy(zero_copy_only=False).astype(object),
                   split_lists(table.column("features")), table.column("batch_ids").to_pylist(),
                   meta["covered"], meta["batches"], meta.get("flagged"), meta.get("covered_at", []),
                   meta.get("version"))


def update_user_table(path, events: ValidatedEvents, flag_users: Callable[[pd.DataFrame], set[str]] | None = None,
                      write=write_now) -> tuple[UserTable, dict, set[str]]:
    """Bring the table at ``path`` up to ``events`` (built whole the first time) and store it
    (with ``write``: e.g. a ``BackgroundWrites``' ``submit``, so the caller's next work
    overlaps the write; the returned table must not change until it is done).
    Also returns the users ``flag_users`` marks (e.g. the bot-like): it runs on every row of
    each user the update rebuilds, and the marks are stored with the table, so a micro-batch
    flags the users it touches without reading anyone else's history and later updates keep
    them (empty without ``flag_users``)."""
    stored = UserTable.load(path)
    if stored is None:
        table, stats = UserTable.build_from(events, flag_users), {"table_update": "built"}
    else:
        table, stats = stored.updated(events, flag_users)
    if stats["table_update"] != "unchanged":
        table.version = uuid.uuid4().hex  # (known at once: the write may still be under way)
        write(table.save, path, table.version)
    return table, stats, set(table.flagged or []) if flag_users is not None else set()


def training_data_from(table: UserTable, vocab: ItemVocab, excluded_users: set[str]):
    """``(sequences, split, user_batches, stats)`` of the table without ``excluded_users``, in
    the indices of ``vocab``, which is extended (append-only) with items seen only in feedback,
    in order of first appearance (users sorted by id)."""
    kept = np.flatnonzero(~_members(table.user_ids, excluded_users))
    lengths = np.array([len(table.item_codes[i]) for i in kept], dtype=np.int64)
    flat = np.concatenate([table.item_codes[i] for i in kept]) if len(kept) else np.zeros(0, dtype=np.int32)
    used = pd.unique(flat)  # codes in order of first appearance
    vocab.extend(table.items[used])
    bounds = np.r_[0, np.cumsum(lengths)]
    to_vocab = np.zeros(len(table.items), dtype=np.int64)
    to_vocab[used] = vocab.index(table.items[used], unknown=None)
    indices = to_vocab[flat]
    sequences = UserSequences([str(table.user_ids[i]) for i in kept],
                              split_at(indices, bounds),
                              [table.features[i] for i in kept])
    all_lengths = np.array([len(a) for a in table.item_codes], dtype=np.int64)
    stats = {
        "items": len(vocab), "users": len(sequences),
        "interactions": int(lengths.sum()), "bot_users_excluded": len(excluded_users),
        "bot_interactions_excluded": int(all_lengths.sum() - lengths.sum()),
        "median_sequence_length": float(np.median(lengths)) if len(lengths) else 0.0, "batches": len(table.batches),
    }
    # the table's own lists, not copies (250k users at 10M events: 0.7 -> 0.1 s); nobody changes them
    user_batches = dict(zip(sequences.user_ids, (table.batch_ids[i] for i in kept)))
    return sequences, leave_last_out(sequences), user_batches, stats


def _members(user_ids: np.ndarray, ids) -> np.ndarray:
    """Bool mask of the ``user_ids`` (an object array of str) that are in ``ids``: one hash
    lookup each (``np.isin`` sorts the Python strings: ~0.45 s for 250k users)."""
    wanted = set(ids)
    return np.fromiter((user in wanted for user in user_ids), dtype=bool, count=len(user_ids))


def _per_user(events: pd.DataFrame) -> tuple[np.ndarray, list, np.ndarray, list, list]:
    """Each user's protocol sequence of ``events`` (all of that user's rows): as the full
    pipeline builds it, one interaction per item at its first contact with its strongest event.
    ``(user ids, item codes per user, the item id of each code, features, batches)``."""
    positives = collapse_repeats(interactions(events, min_rating=None))
    ordered = positives.sort_values(["user_id", "timestamp"], kind="stable").reset_index(drop=True)
    users = ordered["user_id"].astype(str).to_numpy(dtype=object)
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]]) if len(users) else np.zeros(0, dtype=np.int64)
    bounds = np.r_[starts, len(users)]
    codes, items = pd.factorize(ordered["item_id"].astype(str).to_numpy(dtype=object))
    codes = codes.astype(np.int32)
    features = np.asarray(event_features(ordered), dtype=np.int64)
    batches = ordered["batch_id"].astype(str).to_numpy(dtype=object)
    spans = list(zip(bounds[:-1], bounds[1:]))
    return (users[starts], [codes[s:e] for s, e in spans], np.asarray(items, dtype=object),
            [features[s:e] for s, e in spans], [list(dict.fromkeys(batches[s:e])) for s, e in spans])

