"""The simulator as an online environment: identical situations for every recommender asked,
reactions driven by hidden tastes and attention, drift, and ``recsys simulate --online``
playing against a real ``recsys serve``."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from test_serving_http import running_server

from rec_models.simulator import FeedbackSimulator, SimulatorConfig
from rec_models.simulator.online import OnlineConfig, OnlineEnvironment


@pytest.fixture(scope="module")
def env():
    return OnlineEnvironment(FeedbackSimulator(SimulatorConfig(n_items=300, n_users=200)),
                             OnlineConfig(users_per_round=100, seed=3))


def oracle(env, state):
    """Each user's items by their current liking: the best any recommender could do."""
    def recommend(users, recent, k):
        items = np.arange(len(env.items.ids))
        lists = []
        for user, recent_items in zip(state.users, recent):
            seen = set(recent_items) | env.consumed.get(env.user_ids[user], set())
            liking = env.liking(np.full(len(items), user), items, state.at, np.zeros(len(items)))
            lists.append([env.items.ids[i] for i in np.argsort(-liking) if env.items.ids[i] not in seen][:k])
        return lists, [f"r{n}" for n in range(len(users))]
    return recommend


def random_lists(env, seed=0):
    rng = np.random.default_rng(seed)

    def recommend(users, recent, k):
        return [list(rng.choice(env.items.ids, k, replace=False)) for _ in users], [None] * len(users)
    return recommend


def test_every_recommender_meets_the_same_situation_and_taste_decides(env):
    state = env.round(0)
    again = env.round(0)
    pd.testing.assert_frame_equal(state.organic, again.organic)  # the same users and browsing
    assert np.array_equal(state.attention, again.attention) and len(state.users) == 100
    good, good_hits = env.play(state, oracle(env, state), arm="oracle")
    bad, bad_hits = env.play(state, random_lists(env), arm="random")
    assert good_hits.mean() > 0.6 > 0.3 > bad_hits.mean()
    assert set(good["event_type"]) <= {"click", "purchase"} and good["request_id"].notna().all()
    shown = set(oracle(env, state)(list(env.user_ids[state.users]), [[]] * 100, 10)[0][0])
    first_user = env.user_ids[state.users[0]]
    assert set(good.loc[good["user_id"] == first_user, "item_id"]) <= shown


def test_users_do_not_click_what_they_consumed_before():
    """Batch-0 history, earlier browsing and the arm's own earlier clicks are never clicked
    again, so a recommender that forgets them gains nothing; each arm keeps its own clicks."""
    env = OnlineEnvironment(FeedbackSimulator(SimulatorConfig(n_items=300, n_users=200)),
                            OnlineConfig(users_per_round=100, seed=3))
    first = env.round(0)
    clicks, _ = env.play(first, oracle(env, first), arm="a")
    clicks = clicks[clicks["event_type"] == "click"]
    assert len(clicks) > 30
    history = {u: set(g) for u, g in env.sim.events(0).groupby("user_id")["item_id"]}
    second = env.round(1)
    assert set(first.organic["item_id"][first.organic["user_id"] == first.organic["user_id"].iloc[0]]) <= \
        env.consumed[first.organic["user_id"].iloc[0]]  # last round's browsing is consumed now

    def show(lists_of):  # the same list to every user of the round, from what each one consumed
        def recommend(users, recent, k):
            return [lists_of(u)[:k] for u in users], [None] * len(users)
        return recommend
    old = show(lambda u: sorted(history.get(u, set()) | set(clicks["item_id"][clicks["user_id"] == u])))
    again, hits = env.play(second, old, arm="a")
    assert len(again) == 0 and not hits.any()
    # another arm's users never clicked those lists' items: only the shared history is skipped
    own_clicks = show(lambda u: sorted(set(clicks["item_id"][clicks["user_id"] == u]) - history.get(u, set())))
    other, _ = env.play(second, own_clicks, arm="b")
    assert len(other) > 0


def test_drift_moves_taste_from_early_to_late(env):
    users = np.arange(5)
    late_time = int(env.users.join_time.max() + 61 * 86_400)
    fixed = OnlineEnvironment(env.sim, OnlineConfig(drift=0.0))
    np.testing.assert_allclose(fixed.taste(users, late_time), env.users.early_taste[users])
    np.testing.assert_allclose(env.taste(users, late_time), env.users.late_taste[users])
    fast = OnlineEnvironment(env.sim, OnlineConfig(drift=3.0))
    halfway = int(env.users.join_time[0] + 10 * 86_400)
    assert np.abs(fast.taste(users[:1], halfway) - env.users.late_taste[:1]).sum() < \
        np.abs(env.taste(users[:1], halfway) - env.users.late_taste[:1]).sum()


def test_recsys_simulate_online_plays_against_a_running_server(tmp_path):
    from rec_pipelines.lake import FeedbackStore

    with running_server(tmp_path) as served:
        env = {**{k: v for k, v in __import__("os").environ.items() if not k.startswith(("RECSYS_", "DAGSTER_"))},
               "RECSYS_HOME": str(tmp_path)}
        done = subprocess.run([sys.executable, "-m", "rec_pipelines.cli", "simulate", "--online", "--server", served.url,
                               "--rounds", "2", "--users-per-round", "40"], env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    rounds = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["round"] for r in rounds] == [0, 1] and all(r["lists"] == 40 for r in rounds)
    files = sorted((tmp_path / "var" / "landing" / "events").glob("online-*.jsonl"))
    assert [f.name for f in files] == ["online-s0-r0000.jsonl", "online-s0-r0001.jsonl"]
    events = pd.concat([pd.read_json(f, lines=True) for f in files])
    clicks = events[(events["event_type"] == "click") & events["request_id"].notna()]  # reactions, not browsing
    assert len(clicks) == sum(r["clicks"] for r in rounds)
    served_ids = {json.loads(line)["request_id"] for f in (tmp_path / "var" / "landing" / "impressions").glob("*.jsonl")
                  for line in f.read_text().splitlines()}
    assert set(clicks["request_id"]) <= served_ids  # every click names the list it answers
    store = FeedbackStore(tmp_path / "var" / "landing", tmp_path / "var" / "lake", pseudonym_key="k" * 32)
    store.ingest("events")
    store.validate_pending()
    validated = store.read_validated()
    assert validated["request_id"].notna().sum() == len(events["request_id"].dropna())
