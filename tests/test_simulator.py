"""Tests of the feedback simulator: determinism, a natural catalog, the event schema, time
order, tastes that follow the text, sequential structure, and landing-zone files."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rec_models.data.schema import (
    CATALOG_COLUMNS,
    EVENT_COLUMNS,
    EVENT_DTYPES,
    EVENT_TYPES,
    NEGATIVE_EVENT_TYPES,
    RATING_RANGE,
)
from rec_models.simulator import (
    CATEGORIES,
    FeedbackSimulator,
    SimulatorConfig,
    next_batch_index,
)

SMALL = SimulatorConfig(n_items=200, n_users=100, batch_users=40, batch_new_items=10)


@pytest.fixture(scope="module")
def sim() -> FeedbackSimulator:
    return FeedbackSimulator(SMALL)


@pytest.fixture(scope="module")
def history(sim: FeedbackSimulator) -> pd.DataFrame:
    return sim.events(0)


def _full_catalog(sim: FeedbackSimulator, last_batch: int) -> pd.DataFrame:
    return pd.concat([sim.catalog()] + [sim.catalog_update(b) for b in range(1, last_batch + 1)], ignore_index=True)


def _positive(events: pd.DataFrame, catalog: pd.DataFrame) -> pd.DataFrame:
    positive = events[~events["event_type"].isin(list(NEGATIVE_EVENT_TYPES))].copy()
    positive["category"] = positive["item_id"].map(dict(zip(catalog["item_id"], catalog["category"])))
    return positive


# -- determinism --------------------------------------------------------------------------------


def test_same_seed_gives_equal_frames_and_another_seed_differs(history: pd.DataFrame):
    again = FeedbackSimulator(SMALL)
    pd.testing.assert_frame_equal(again.events(0), history)
    pd.testing.assert_frame_equal(again.catalog(), FeedbackSimulator(SMALL).catalog())

    other = FeedbackSimulator(SimulatorConfig(n_items=200, n_users=100, batch_users=40, batch_new_items=10, seed=8))
    assert not other.catalog()["title"].equals(again.catalog()["title"])
    assert not other.events(0)[["user_id", "item_id", "timestamp"]].equals(history[["user_id", "item_id", "timestamp"]])


def test_batches_do_not_depend_on_the_order_they_are_generated_in():
    forward, backward = FeedbackSimulator(SMALL), FeedbackSimulator(SMALL)
    forward_frames = [forward.catalog(), forward.catalog_update(1), forward.catalog_update(2),
                      forward.events(1), forward.events(2)]
    late_events, early_events = backward.events(2), backward.events(1)
    late_items = backward.catalog_update(2)
    backward_frames = [backward.catalog(), backward.catalog_update(1), late_items, early_events, late_events]
    for mine, theirs in zip(forward_frames, backward_frames):
        pd.testing.assert_frame_equal(mine, theirs)


# -- catalog ------------------------------------------------------------------------------------


def test_catalog_has_the_schema_and_natural_distinct_text(sim: FeedbackSimulator):
    catalog = _full_catalog(sim, 3)
    assert list(catalog.columns) == CATALOG_COLUMNS
    assert len(sim.catalog()) == SMALL.n_items
    assert catalog["item_id"].str.fullmatch(r"i\d{5}").all()
    assert catalog["title"].is_unique
    assert not catalog["title"].str.contains(r"\bitems?[\s_-]*\d", case=False, regex=True).any()
    assert catalog["title"].str.contains(r"[A-Za-z]{3}", regex=True).all()

    by_name = {c.name: c for c in CATEGORIES}
    assert 12 <= len(by_name) <= 16
    assert set(catalog["category"]) == set(by_name)  # every category is stocked
    for row in catalog.itertuples():
        category = by_name[row.category]
        assert row.description.endswith(".") and 1 <= row.description.count(". ") + 1 <= 2
        assert any(theme in row.description for theme in category.themes)
        assert row.title[0].isupper() or row.title[0].isdigit()
        assert isinstance(row.tags, list) and all(isinstance(t, str) for t in row.tags)
        own = [t for t in row.tags if t in category.tags]
        assert 2 <= len(own) <= 5 and len(row.tags) - len(own) <= 2
        assert len(set(row.tags)) == len(row.tags)


def test_catalog_updates_continue_the_numbering_without_collisions(sim: FeedbackSimulator):
    assert sim.catalog_update(0).empty
    assert list(sim.catalog_update(0).columns) == CATALOG_COLUMNS
    seen = set(sim.catalog()["item_id"])
    for batch in (1, 2, 3):
        update = sim.catalog_update(batch)
        assert len(update) == SMALL.batch_new_items
        ids = set(update["item_id"])
        assert not ids & seen
        numbers = sorted(int(i[1:]) for i in ids)
        assert numbers[0] == max(int(i[1:]) for i in seen) + 1
        assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))
        seen |= ids


# -- events -------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [0, 1])
def test_events_have_the_schema_and_consistent_values(sim: FeedbackSimulator, history: pd.DataFrame, batch: int):
    events = history if batch == 0 else sim.events(batch)
    assert list(events.columns) == EVENT_COLUMNS
    assert {c: str(t) for c, t in events.dtypes.items()} == EVENT_DTYPES
    assert events["user_id"].str.fullmatch(r"u\d{5}").all()
    assert events["item_id"].isin(_full_catalog(sim, batch)["item_id"]).all()
    assert set(events["event_type"]) <= set(EVENT_TYPES)
    assert events["session_id"].notna().all()

    kind = events["event_type"]
    counts = kind.value_counts(normalize=True)
    if batch == 0:  # the mix of a realistic feedback log
        assert counts.idxmax() == "view" and counts["view"] > counts["click"] > counts["like"]
        assert counts["purchase"] < counts["click"] and set(EVENT_TYPES) == set(counts.index)
    ratings = events.loc[kind == "rating", "value"]
    assert ratings.between(*RATING_RANGE).all() and (ratings * 2 == (ratings * 2).round()).all()
    assert (events.loc[kind.isin(["view", "click"]), "value"] > 0).all()
    assert events.loc[~kind.isin(["rating", "view", "click"]), "value"].isna().all()
    assert (events["text"].notna() == (kind == "review")).all()


def test_ratings_and_negative_feedback_follow_taste(sim: FeedbackSimulator, history: pd.DataFrame):
    catalog = sim.catalog()
    category = dict(zip(catalog["item_id"], catalog["category"]))
    favourites = sim.user_profiles().set_index("user_id")["favourite_categories"]
    in_favourites = np.array([category[i] in favourites[u] for u, i in zip(history["user_id"], history["item_id"])])
    kind = history["event_type"].to_numpy()

    ratings = history["value"].to_numpy()[kind == "rating"]
    liked, other = ratings[in_favourites[kind == "rating"]], ratings[~in_favourites[kind == "rating"]]
    assert len(other) >= 10 and liked.mean() > other.mean() + 1.0

    negative = np.isin(kind, list(NEGATIVE_EVENT_TYPES))
    assert (~in_favourites[negative]).mean() > 2 * (~in_favourites[~negative]).mean()


def test_timestamps_are_ordered_within_users_and_later_batches_come_later(sim, history):
    previous_end = None
    for batch in range(4):
        events = history if batch == 0 else sim.events(batch)
        assert events.groupby("user_id")["timestamp"].apply(lambda t: t.is_monotonic_increasing).all()
        # A session is one contiguous stretch of a user's timeline.
        spans = events.groupby(["user_id", "session_id"])["timestamp"].agg(["min", "max"]).sort_values("min")
        for _, user_spans in spans.groupby(level="user_id"):
            assert (user_spans["min"].to_numpy()[1:] >= user_spans["max"].to_numpy()[:-1]).all()
        if previous_end is not None:
            assert events["timestamp"].min() > previous_end
        previous_end = events["timestamp"].max()
    assert history["timestamp"].min() >= SMALL.start_time


def test_later_batches_bring_new_users_and_feedback_on_new_items(sim: FeedbackSimulator):
    known = set(sim.user_profiles(0)["user_id"])
    for batch in (1, 2):
        events = sim.events(batch)
        users = set(events["user_id"])
        new_users = users - known
        assert len(users) == SMALL.batch_users
        assert len(new_users) == round(0.1 * SMALL.batch_users)
        assert new_users <= set(sim.user_profiles(batch)["user_id"])
        assert events["item_id"].isin(sim.catalog_update(batch)["item_id"]).sum() > 0
        known |= new_users


# -- behaviour ----------------------------------------------------------------------------------


def test_tastes_follow_the_items_text(sim: FeedbackSimulator, history: pd.DataFrame):
    catalog = sim.catalog()
    profiles = sim.user_profiles().set_index("user_id")
    positive = _positive(history, catalog)
    favourites = profiles.loc[positive["user_id"], "favourite_categories"].to_numpy()

    in_favourites = np.mean([c in f for c, f in zip(positive["category"], favourites)])
    chance = np.mean([len(f) / len(CATEGORIES) for f in favourites])
    assert in_favourites > 0.6 and in_favourites > 3 * chance

    # Within a category, users pick items carrying their favourite tags more often than a
    # random item of that category would.
    tags = dict(zip(catalog["item_id"], catalog["tags"]))
    stock = catalog.groupby("category")["tags"].apply(list)
    picked, expected = [], []
    for user, item, category in zip(positive["user_id"], positive["item_id"], positive["category"]):
        wanted = set(profiles.at[user, "favourite_tags"])
        picked.append(bool(wanted & set(tags[item])))
        expected.append(np.mean([bool(wanted & set(t)) for t in stock[category]]))
    assert np.mean(picked) > np.mean(expected) + 0.1


def test_consecutive_items_are_related(sim: FeedbackSimulator, history: pd.DataFrame):
    positive = _positive(history, sim.catalog())
    shuffle = np.random.default_rng(0)
    consecutive, shuffled = [], []
    for _, group in positive.groupby("user_id", sort=False):
        categories = group["category"].to_numpy()  # already in time order
        consecutive += list(categories[1:] == categories[:-1])
        mixed = shuffle.permutation(categories)
        shuffled += list(mixed[1:] == mixed[:-1])
    assert np.mean(consecutive) > np.mean(shuffled) + 0.15


# -- landing zone -------------------------------------------------------------------------------


def test_write_batch_is_atomic_idempotent_and_counted(sim: FeedbackSimulator, tmp_path: Path, monkeypatch):
    zone = tmp_path / "landing"
    assert next_batch_index(zone) == 0

    renames = []
    real_replace = os.replace

    def recording_replace(src, dst):
        renames.append((Path(src), Path(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", recording_replace)
    paths = sim.write_batch(zone, 0)
    assert paths == [zone / "catalog" / "catalog-00000.jsonl", zone / "events" / "events-00000.jsonl"]
    assert [dst for _, dst in renames] == paths
    assert all(src.parent == dst.parent and src.name.startswith(".") for src, dst in renames)
    assert sorted(p.name for p in zone.rglob("*") if p.is_file()) == ["catalog-00000.jsonl", "events-00000.jsonl"]

    events = pd.read_json(paths[1], lines=True, dtype=False)
    assert list(events.columns) == EVENT_COLUMNS and len(events) == len(sim.events(0))
    likes = events[events["event_type"] == "like"]
    assert likes["value"].isna().all() and likes["text"].isna().all()
    catalog = pd.read_json(paths[0], lines=True, dtype=False)
    assert len(catalog) == SMALL.n_items and isinstance(catalog["tags"].iat[0], list)

    # Re-running leaves identical files untouched.
    before = [(p.stat().st_ino, p.stat().st_mtime_ns) for p in paths]
    renames.clear()
    assert sim.write_batch(zone, 0) == paths
    assert renames == [] and [(p.stat().st_ino, p.stat().st_mtime_ns) for p in paths] == before
    assert next_batch_index(zone) == 1

    # A file with other content under the same name is replaced; temp files are not batches.
    (zone / "events" / "events-00001.jsonl").write_text("stale\n")
    (zone / "events" / ".events-00007.jsonl.abc.tmp").write_text("half")
    assert next_batch_index(zone) == 2
    written = sim.write_batch(zone, 1)
    assert [p.name for p in written] == ["catalog-00001.jsonl", "events-00001.jsonl"]
    assert len(pd.read_json(written[1], lines=True)) == len(sim.events(1))
    assert next_batch_index(zone) == 2


def test_default_config_has_the_documented_sizes():
    sim = FeedbackSimulator()
    events = sim.events(0)
    assert len(sim.catalog()) == 3000
    assert events["user_id"].nunique() == 2000
    assert 70_000 <= len(events) <= 90_000
    assert re.fullmatch(r"u\d{5}-b000-s\d{3}", events["session_id"].iat[0])
