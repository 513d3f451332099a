"""Online metrics: feedback attributed to the served lists (by request_id, else by user and
item within the window), CTR@k / conversion / MRR with intervals, and the online gate run as a
real Dagster job against a real MLflow registry."""

import json

import numpy as np
import pandas as pd
import pytest

from rec_pipelines.online import attribute, challenger_not_worse, summarize, wilson

T0 = 1_700_000_000


def impressions(lists: dict[str, tuple[str, list[str], str, str, int]]) -> pd.DataFrame:
    """request_id -> (user, items, version, arm, served at)."""
    rows = [{"request_id": rid, "user_id": user, "item_id": item, "rank": rank, "model_version": version, "arm": arm,
             "timestamp": at} for rid, (user, items, version, arm, at) in lists.items()
            for rank, item in enumerate(items, start=1)]
    return pd.DataFrame(rows)


def events(*rows: tuple) -> pd.DataFrame:
    return pd.DataFrame([{"user_id": u, "item_id": i, "event_type": t, "timestamp": ts, "request_id": rid}
                         for u, i, t, ts, rid in rows])


def test_feedback_is_attributed_by_request_id_or_within_the_window():
    served = impressions({
        "r1": ("alice", ["a", "b", "c"], "1", "champion", T0),
        "r2": ("bob", ["a", "b", "c"], "1", "champion", T0),
        "r3": ("carol", ["x", "y", "z"], "2", "challenger", T0),
        "r4": ("alice", ["d", "e", "f"], "1", "champion", T0 + 100),
    })
    feedback = events(
        ("alice", "b", "click", T0 + 10, "r1"),  # named list, rank 2
        ("bob", "c", "purchase", T0 + 50, None),  # same user and item 50 s later: r2, rank 3
        ("carol", "z", "click", T0 + 7200, None),  # too late for the 1 h window
        ("carol", "q", "click", T0 + 10, None),  # an item the list did not show
        ("alice", "e", "view", T0 + 110, None),  # not a click type
    )
    lists = attribute(served, feedback, window_s=3600, click_types=("click", "purchase"))
    by_id = lists.set_index("request_id")
    assert by_id["clicked"].to_dict() == {"r1": True, "r2": True, "r3": False, "r4": False}
    assert by_id["converted"].to_dict() == {"r1": False, "r2": True, "r3": False, "r4": False}
    assert by_id["reciprocal_rank"].round(4).to_dict() == {"r1": 0.5, "r2": 0.3333, "r3": 0.0, "r4": 0.0}
    table = summarize(lists, None).set_index("model_version")
    assert table.loc["1", "lists"] == 3 and table.loc["1", "ctr"] == pytest.approx(2 / 3)
    assert table.loc["1", "mrr"] == pytest.approx((0.5 + 1 / 3) / 3)
    assert table.loc["2", "ctr"] == 0 and table.loc["2", "arm"] == "challenger"
    assert table.loc["1", "ctr_lo"] < 2 / 3 < table.loc["1", "ctr_hi"]


def test_wilson_intervals_cover_the_truth_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    n, p = 200, 0.07
    clicks = rng.binomial(n, p, size=4000)
    lo, hi = wilson(clicks, np.full(4000, n))
    coverage = np.mean((lo <= p) & (p <= hi))
    assert 0.93 < coverage < 0.97


def test_the_online_comparison_needs_enough_lists_and_flags_a_worse_challenger():
    rng = np.random.default_rng(1)
    lists = pd.DataFrame({"model_version": ["1"] * 3000 + ["2"] * 3000,
                          "clicked": np.r_[rng.random(3000) < 0.10, rng.random(3000) < 0.05]})
    assert challenger_not_worse(lists, "1", "2", min_lists=5000)[0] is None
    verdict, reason = challenger_not_worse(lists, "1", "2", min_lists=1000)
    assert verdict is False and "worse" in reason
    assert challenger_not_worse(lists, "2", "1", min_lists=1000)[0] is True


def test_online_job_logs_metrics_and_promotes_a_better_challenger(dagster_env, tmp_path):
    import dagster as dg
    from test_serving import make_bundle

    from rec_models.serving import example_request
    from rec_pipelines.lake import FeedbackStore
    from rec_pipelines.registry import ModelRegistry, decide_promotion

    settings, defs, instance = dagster_env
    registry = ModelRegistry(settings.mlflow_tracking_uri, settings.mlflow_artifact_root, settings.model_name)
    bundle = make_bundle(tmp_path / "bundle", max_epochs=0)
    versions = []
    for name in ("champion", "challenger"):
        with registry.start_run(name) as run:
            info = registry.log_recommender(bundle.path, example_request(["u1"], []))
        versions.append(registry.register(info.model_uri, run.info.run_id, tags={}).version)
    registry.apply_decision(versions[0], decide_promotion({"ndcg@10": 0.0}, None))
    assert registry.version_by_alias("challenger").version == versions[1]

    store = FeedbackStore(settings.landing_location, settings.lake, key_file=settings.pseudonym_key_file)
    users = [f"user-{i}" for i in range(400)]
    pseudonyms = store.pseudonymizer()(users)
    rng = np.random.default_rng(0)
    served, feedback = [], []
    for i, (user, pseudonym) in enumerate(zip(users, pseudonyms)):
        version, arm, p = (versions[1], "challenger", 0.5) if i % 2 else (versions[0], "champion", 0.2)
        rid = f"req-{i}"
        items = [f"i{(i + r) % 50}" for r in range(5)]
        served += [{"request_id": rid, "user_id": pseudonym, "item_id": item, "rank": r, "model_version": version,
                    "arm": arm, "timestamp": T0 + i} for r, item in enumerate(items, 1)]
        if rng.random() < p:
            feedback.append({"user_id": user, "item_id": items[1], "event_type": "click", "timestamp": T0 + i + 30,
                             "request_id": rid})
        feedback.append({"user_id": user, "item_id": "i99", "event_type": "view", "timestamp": T0 + i + 5})
    (settings.landing_zone / "impressions").mkdir(parents=True)
    (settings.landing_zone / "impressions" / "served.jsonl").write_text("".join(json.dumps(r) + "\n" for r in served))
    (settings.landing_zone / "events").mkdir(parents=True, exist_ok=True)
    (settings.landing_zone / "events" / "feedback.jsonl").write_text("".join(json.dumps(r) + "\n" for r in feedback))

    from rec_pipelines.defs.ingestion.assets import INGESTION_ASSETS

    job = defs.resolve_job_def("microbatch_retrain_job")
    ingest = job.execute_in_process(instance=instance, asset_selection=[dg.AssetKey(a) for a in INGESTION_ASSETS],
                                    raise_on_error=False)
    assert ingest.output_for_node("validated_feedback") is not None
    online = defs.resolve_job_def("online_metrics_job").execute_in_process(instance=instance, run_config={
        "ops": {"online_promotion": {"config": {"require_online": True, "min_lists": 150}}}})
    assert online.success
    lists = online.output_for_node("online_metrics")
    assert len(lists) == 400 and set(lists["arm"]) == {"champion", "challenger"}
    decision = online.output_for_node("online_promotion")
    assert decision["promoted"] is True and "not worse" in decision["reason"]
    assert registry.version_by_alias("champion").version == versions[1]
    tags = registry.client.get_model_version(registry.model_name, versions[1]).tags
    assert tags["promotion.reason"].startswith("online gate:")
    assert 0.35 < float(tags["online_ctr"]) < 0.65
    run = registry.client.get_run(registry.client.get_model_version(registry.model_name, versions[0]).run_id)
    assert 0.1 < run.data.metrics["online_ctr"] < 0.3 and run.data.metrics["online_lists"] == 200
    metadata = online.asset_materializations_for_node("online_metrics")[0].metadata
    assert "data:image/png;base64" in metadata["ctr_plot"].value


def test_team_draft_keeps_each_item_with_the_team_that_placed_it():
    import random

    from rec_pipelines.server.app import team_draft

    def answer(items, arm):
        return {"item_id": items, "rank": list(range(1, len(items) + 1)), "score": [0.0] * len(items),
                "arm": [arm] * len(items), "model_version": ["1" if arm == "champion" else "2"] * len(items)}

    champion, challenger = answer(list("abcdefgh"), "champion"), answer(list("bxaycz"), "challenger")
    for seed in range(20):
        merged = team_draft(champion, challenger, 6, random.Random(seed))
        assert len(merged["item_id"]) == 6 == len(set(merged["item_id"]))
        assert merged["rank"] == [1, 2, 3, 4, 5, 6]
        counts = {arm: merged["arm"].count(arm) for arm in ("champion", "challenger")}
        assert abs(counts["champion"] - counts["challenger"]) <= 1
        for item, arm in zip(merged["item_id"], merged["arm"]):
            assert item in (champion if arm == "champion" else challenger)["item_id"]
        # each team's picks keep its own order
        for arm, source in (("champion", champion), ("challenger", challenger)):
            mine = [i for i, a in zip(merged["item_id"], merged["arm"]) if a == arm]
            assert mine == sorted(mine, key=source["item_id"].index)


def test_interleaving_credits_clicks_to_the_arm_that_placed_the_item():
    from rec_pipelines.online import interleaving_wins

    rows = []
    for i in range(100):
        for rank, (item, arm) in enumerate([(f"a{i}", "champion"), (f"b{i}", "challenger"), (f"c{i}", "champion"),
                                            (f"d{i}", "challenger")], start=1):
            rows.append({"request_id": f"r{i}", "user_id": f"u{i}", "item_id": item, "rank": rank,
                         "model_version": "1" if arm == "champion" else "2", "arm": arm, "timestamp": T0})
    served = pd.DataFrame(rows)
    clicks = events(*[(f"u{i}", f"b{i}" if i % 4 else f"a{i}", "click", T0 + 5, None) for i in range(100)])
    result = interleaving_wins(served, clicks, 3600, ("click",))
    assert result["lists"] == 100 and result["wins"] == 75 and result["losses"] == 25 and result["ties"] == 0
    assert result["preference"] == pytest.approx(0.5) and result["z"] == pytest.approx(50 / 10)
