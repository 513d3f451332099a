"""What ``recsys serve`` served comes back as impressions: written into the landing zone
(atomically, flushed on SIGTERM), ingested and validated like any other landing file;
challenger routing is stable per user; ``POST /reload`` serves a new champion at once."""

import json
import os
import signal
import time

import pytest
from test_serving_http import get, post, records, running_server

from rec_models.data.privacy import KEY_ENV, USER_PREFIX, pseudonymize
from rec_pipelines.lake import FeedbackStore
from rec_pipelines.registry import decide_promotion

KEY = "impression-test-key-" + "0" * 12


def impression_rows(root) -> list[dict]:
    folder = root / "var" / "landing" / "impressions"
    return [json.loads(line) for path in sorted(folder.glob("*.jsonl")) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("impressions"), "--challenger-share", "0.5",
                        env={KEY_ENV: KEY}) as served:
        yield served


def test_served_lists_are_recorded_with_pseudonyms_and_flushed_on_sigterm(tmp_path):
    with running_server(tmp_path, env={KEY_ENV: KEY}) as served:
        users = served.bundle.sequences.user_ids[:6]
        answers = [post(served.url, records({"user_id": user, "k": 3}, {"user_id": "stranger", "k": 2}))[1]
                   for user in users]
        os.killpg(served.process.pid, signal.SIGTERM)  # before any periodic flush could matter
        served.process.wait(timeout=30)
        rows = impression_rows(tmp_path)
    served_ids = {(row["request_id"], row["item_id"], row["rank"]) for answer in answers for row in answer["predictions"]}
    assert {(row["request_id"], row["item_id"], row["rank"]) for row in rows} == served_ids
    assert len(rows) == len(users) * 5
    key = KEY.encode()
    assert {row["user_id"] for row in rows} == set(pseudonymize([*users, "stranger"], key, USER_PREFIX))
    assert {row["arm"] for row in rows} == {"champion"} and {row["model_version"] for row in rows} == {"1"}
    store = FeedbackStore(tmp_path / "var" / "landing", tmp_path / "var" / "lake", pseudonym_key=KEY)
    report = store.ingest("impressions")
    assert report.rows_in == len(rows) and not report.quarantined_files
    lake = store.read("impressions")
    assert len(lake) == len(rows) and set(lake["request_id"]) == {r for r, _, _ in served_ids}


def test_impressions_with_raw_ids_or_bad_ranks_are_quarantined(tmp_path):
    store = FeedbackStore(tmp_path / "landing", tmp_path / "lake", pseudonym_key=KEY)
    good = {"request_id": "r1", "user_id": pseudonymize(["u1"], KEY.encode(), USER_PREFIX)[0], "item_id": "i1",
            "rank": 1, "model_version": "3", "arm": "champion", "timestamp": 1_700_000_000}
    rows = [good, {**good, "rank": 2, "user_id": "alice@example.com"}, {**good, "rank": 0}, {**good, "rank": 1},
            {**good, "rank": 3, "arm": None}]
    folder = store.landing_zone / "impressions"
    folder.mkdir(parents=True)
    (folder / "served.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = store.ingest("impressions")
    assert report.rows_in == 5
    kept = store.read("impressions")
    assert len(kept) == 1 and kept["rank"].tolist() == [1]
    quarantined = store.quarantined_rows()  # impressions have their own quarantine folder
    folder_rows = list((store.lake / "quarantine" / "impressions").glob("*.parquet"))
    assert len(folder_rows) == 1 and len(quarantined) == 0
    import pandas as pd

    reasons = sorted(pd.read_parquet(folder_rows[0])["reason"])
    assert reasons == ["duplicate (request_id, rank)", "missing arm", "rank is not an integer >= 1",
                       "user_id is not a pseudonym (raw ids are never stored)"]
    assert "alice" not in "".join(p.read_bytes().decode("latin-1") for p in store.lake.rglob("*.parquet"))


def test_challenger_gets_a_stable_share_of_users(server):
    with server.registry.start_run("challenger") as run:
        from rec_models.serving import example_request

        info = server.registry.log_recommender(server.bundle.path, example_request(["u1"], []))
    version = server.registry.register(info.model_uri, run.info.run_id, tags={})
    server.registry.client.set_registered_model_alias(server.registry.model_name, "challenger", version.version)
    deadline = time.monotonic() + 30
    while (get(server.url, "/model").get("challenger") or {}).get("version") != str(version.version):
        assert time.monotonic() < deadline, server.log.read_text()[-2000:]
        time.sleep(0.3)
    users = [f"user-{i}" for i in range(60)]
    first = {u: post(server.url, records({"user_id": u, "k": 2}))[1]["predictions"][0]["request_id"] for u in users}
    second = {u: post(server.url, records({"user_id": u, "k": 2}))[1]["predictions"][0]["request_id"] for u in users}
    time.sleep(2.5)  # the periodic flush (every second)
    arm_of = {row["request_id"]: (row["arm"], row["model_version"]) for row in impression_rows(server.root)}
    arms = {u: arm_of[first[u]] for u in users}
    assert all(arm_of[second[u]] == arms[u] for u in users)  # stable per user
    challenger = [u for u in users if arms[u][0] == "challenger"]
    assert 15 <= len(challenger) <= 45  # about half of 60
    assert {arms[u][1] for u in challenger} == {str(version.version)}
    assert {arms[u][1] for u in users if u not in challenger} == {"1"}


def test_reload_serves_a_new_champion_at_once(server):
    before = get(server.url, "/model")["version"]
    with server.registry.start_run("next") as run:
        from rec_models.serving import example_request

        info = server.registry.log_recommender(server.bundle.path, example_request(["u1"], []))
    version = server.registry.register(info.model_uri, run.info.run_id, tags={})
    server.registry.apply_decision(version.version, decide_promotion({"ndcg@10": 0.0}, None))
    started = time.monotonic()
    import urllib.request

    with urllib.request.urlopen(urllib.request.Request(f"{server.url}/reload", method="POST"), timeout=30) as answer:
        described = json.loads(answer.read())
    assert described["version"] == str(version.version) != before
    assert time.monotonic() - started < 5


def test_interleaving_merges_both_lists_and_credits_each_item(tmp_path):
    from rec_models.serving import example_request

    with running_server(tmp_path, "--interleave", env={KEY_ENV: KEY}) as served:
        # A challenger trained differently (3 epochs, another seed) so the two lists differ.
        from test_serving import make_bundle

        other = make_bundle(tmp_path / "other", max_epochs=3, seed=5)
        with served.registry.start_run("challenger") as run:
            info = served.registry.log_recommender(other.path, example_request(["u1"], []))
        version = served.registry.register(info.model_uri, run.info.run_id, tags={})
        deadline = time.monotonic() + 30
        while (get(served.url, "/model").get("challenger") or {}).get("version") != str(version.version):
            assert time.monotonic() < deadline, served.log.read_text()[-2000:]
            time.sleep(0.3)
        users = served.bundle.sequences.user_ids[:20]
        answers = [post(served.url, records({"user_id": u, "k": 6}))[1]["predictions"] for u in users]
        os.killpg(served.process.pid, signal.SIGTERM)
        served.process.wait(timeout=30)
    rows = impression_rows(tmp_path)
    assert len(rows) == 20 * 6 and all(len({r["item_id"] for r in a}) == 6 for a in answers)
    by_request: dict = {}
    for row in rows:
        by_request.setdefault(row["request_id"], []).append(row)
    assert len(by_request) == 20
    for items in by_request.values():
        counts = {arm: sum(r["arm"] == arm for r in items) for arm in ("champion", "challenger")}
        assert abs(counts["champion"] - counts["challenger"]) <= 1  # team draft: balanced teams
        assert {r["model_version"] for r in items if r["arm"] == "challenger"} == {str(version.version)}
        assert {r["model_version"] for r in items if r["arm"] == "champion"} == {"1"}
