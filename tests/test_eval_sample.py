"""The promotion gate scores a bounded, seeded sample of held-out users stratified by activity,
and records how it measured with the decision."""

import contextlib
import json
import shutil
import time
from pathlib import Path

import dagster as dg
import numpy as np
import pytest
import torch
from conftest import full_run_config

from rec_models.evaluation import paired_difference, stratified_order, stratified_user_sample
from rec_pipelines.registry import ModelRegistry


def test_the_sample_has_exactly_the_asked_size_without_repeats():
    lengths = np.random.default_rng(0).integers(5, 400, 10_000)
    for size in (1, 7, 999, 5_000, 9_999):
        sample = stratified_user_sample(lengths, size, seed=3)
        assert len(sample) == size == len(np.unique(sample))
        assert np.all(np.diff(sample) > 0) and sample[0] >= 0 and sample[-1] < len(lengths)


def test_every_user_when_there_are_no_more_than_the_size():
    lengths = np.array([5, 9, 5, 30])
    assert stratified_user_sample(lengths, 4, seed=0).tolist() == [0, 1, 2, 3]
    assert stratified_user_sample(lengths, 5_000, seed=1).tolist() == [0, 1, 2, 3]
    assert stratified_user_sample(np.zeros(0, np.int64), 10, seed=0).tolist() == []
    with pytest.raises(ValueError):
        stratified_user_sample(lengths, 0, seed=0)


def test_each_activity_quintile_gets_its_share():
    lengths = np.random.default_rng(1).lognormal(3.0, 1.0, 20_003)  # distinct, skewed lengths
    size = 1_001
    sample = stratified_user_sample(lengths, size, seed=0)
    edges = np.quantile(lengths, [0.2, 0.4, 0.6, 0.8])
    population = np.bincount(np.searchsorted(edges, lengths, side="left"), minlength=5)
    drawn = np.bincount(np.searchsorted(edges, lengths[sample], side="left"), minlength=5)
    assert np.all(np.abs(drawn - population * size / len(lengths)) <= 1)


def test_tied_light_users_form_one_stratum_drawn_in_proportion():
    # 70 % of users at the minimum history length, like real data: they share one stratum
    lengths = np.concatenate([np.full(7_000, 5), np.arange(6, 3_006)])
    lengths = lengths[np.random.default_rng(2).permutation(len(lengths))]
    size = 999
    sample = stratified_user_sample(lengths, size, seed=4)
    assert len(sample) == size
    picked = lengths[sample]
    for low, high, share in ((5, 5, 0.7), (6, 1_005, 0.1), (1_006, 3_005, 0.2)):
        assert abs(np.sum((picked >= low) & (picked <= high)) - share * size) <= 1


def test_same_seed_same_users_other_seed_other_users():
    lengths = np.random.default_rng(5).integers(5, 100, 5_000)
    first = stratified_user_sample(lengths, 300, seed=7)
    assert np.array_equal(first, stratified_user_sample(lengths, 300, seed=7))
    assert not np.array_equal(first, stratified_user_sample(lengths, 300, seed=8))


def test_a_million_users_are_sampled_quickly():
    lengths = np.random.default_rng(6).integers(5, 2_000, 1_000_000)
    started = time.perf_counter()
    sample = stratified_user_sample(lengths, 5_000, seed=0)
    assert len(sample) == 5_000 == len(np.unique(sample))
    assert time.perf_counter() - started < 30  # generous: the CI machine is shared


def test_every_prefix_of_the_scoring_order_is_stratified():
    lengths = np.random.default_rng(7).lognormal(3.0, 1.0, 5_003)
    order = stratified_order(lengths, seed=2)
    assert np.array_equal(np.sort(order), np.arange(len(lengths)))  # a permutation
    assert np.array_equal(order, stratified_order(lengths, seed=2))
    assert not np.array_equal(order, stratified_order(lengths, seed=3))
    edges = np.quantile(lengths, [0.2, 0.4, 0.6, 0.8])
    bins = np.searchsorted(edges, lengths, side="left")
    share = np.bincount(bins, minlength=5) / len(lengths)
    for size in (1, 10, 999, 1_000, 2_500, 5_003):
        drawn = np.bincount(bins[order[:size]], minlength=5)
        assert np.all(np.abs(drawn - share * size) <= 2), size
    # within a bin the order is random, not by length
    heavy = order[bins[order] == 4][:200]
    assert not np.all(np.diff(lengths[heavy]) >= 0)
    assert stratified_order(np.zeros(0), seed=0).tolist() == []


def test_the_gate_stops_scoring_once_the_paired_error_is_small_enough(tmp_path, single_thread):
    """Users are scored ``step_users`` at a time; scoring stops at the first step whose paired SE
    is at most the target share of the champion's NDCG@10, and the metrics are those of the
    users scored."""
    from test_serving import make_bundle

    from rec_models.evaluation import evaluate_ranking
    from rec_models.models.recommender import RecommenderConfig, train_recommender
    from rec_pipelines.training import MIN_DISCORDANT_USERS, evaluate_in_steps

    small = make_bundle(tmp_path / "bundle", max_epochs=1, val_users=0)
    other, _ = train_recommender(small.split, small.text, RecommenderConfig.from_dict(
        {**small.model.config.to_dict(), "seed": 1, "max_epochs": 2}))
    histories, targets = small.split.test_histories(), small.split.test_targets
    cold = np.arange(len(targets)) % 7 == 0
    models = {"candidate": other, "champion": small.model}
    every, why = evaluate_in_steps(models, histories, targets, cold, 10, 0.0)
    assert why == "all"
    assert every["candidate"]["n_users"] == every["champion"]["n_users"] == len(targets)
    first, second = every["candidate"]["per_user_ndcg@10"], every["champion"]["per_user_ndcg@10"]

    def relative_se(n: int) -> float:
        if second[:n].mean() <= 0 or np.count_nonzero(first[:n] != second[:n]) < MIN_DISCORDANT_USERS:
            return np.inf  # no stop before enough users' NDCG differ
        return paired_difference(first[:n], second[:n])["se"] / second[:n].mean()

    steps = [*range(10, len(targets), 10), len(targets)]
    errors = [relative_se(n) for n in steps]
    target = min(errors[1:-1])  # reached after the first step, before the last
    assert np.isfinite(target)
    expected = steps[[e <= target for e in errors].index(True)]
    assert 10 < expected < len(targets)
    stopped, why = evaluate_in_steps(models, histories, targets, cold, 10, target)
    assert why == "se_target"
    assert stopped["candidate"]["n_users"] == stopped["champion"]["n_users"] == expected
    prefix = histories.subset(np.arange(expected))
    alone = evaluate_ranking(small.model.ranker(), prefix.items, targets[:expected], small.model.n_items,
                             event_types=prefix.event_types, per_user=True)
    for key in ("hr@10", "ndcg@10", "coverage@10"):
        assert stopped["champion"][key] == pytest.approx(alone[key]), key
    assert stopped["champion"]["cold_users"] == cold[:expected].sum()
    assert stopped["champion"]["cold_ndcg@10"] == pytest.approx(alone["per_user_ndcg@10"][cold[:expected]].mean())
    # Nor does it stop before enough cold-start users are scored (or all there are).
    for min_cold in (1 + int(cold[:expected].sum()), len(targets)):
        reached = np.flatnonzero(cold)[min(min_cold, cold.sum()) - 1] + 1  # users scored to see them
        guarded, _ = evaluate_in_steps(models, histories, targets, cold, 10, target, min_cold_users=min_cold)
        assert guarded["candidate"]["n_users"] == next(
            (n for n, e in zip(steps, errors) if n >= reached and e <= target), len(targets))
        assert guarded["candidate"]["n_users"] > expected
    assert np.array_equal(stopped["candidate"]["per_user_ndcg@10"], first[:expected])
    with pytest.raises(ValueError):
        evaluate_in_steps(models, histories, targets, cold, 0, target)


def test_candidate_and_champion_with_one_content_model_compute_it_once_per_batch(tmp_path, single_thread, monkeypatch):
    """The gate's candidate and champion blend in the same content model (same window, decay and
    text table): each user batch's content scores are computed once and read by both, with the
    very metrics of scoring them apart; a champion whose text differs keeps its own."""
    from test_serving import make_bundle

    from rec_models.models import share_content_scores
    from rec_models.models.baselines import ContentRecommender
    from rec_models.models.recommender import HybridRecommender, RecommenderConfig, train_recommender
    from rec_pipelines.training import evaluate_in_steps

    small = make_bundle(tmp_path / "bundle", max_epochs=1, val_users=0)
    other, _ = train_recommender(small.split, small.text, RecommenderConfig.from_dict(
        {**small.model.config.to_dict(), "seed": 1, "max_epochs": 2}))
    other.content_window = small.model.content_window  # whatever validation chose for it
    other._content = None
    assert other.content() is not small.model.content() and other.same_content(small.model)
    histories, targets = small.split.test_histories(), small.split.test_targets
    cold = np.zeros(len(targets), dtype=bool)

    calls = []
    score = ContentRecommender.score
    monkeypatch.setattr(ContentRecommender, "score", lambda self, *a, **k: calls.append(self) or score(self, *a, **k))
    models = {"candidate": other, "champion": small.model}
    shared, _ = evaluate_in_steps(models, histories, targets, cold, 25, 0.0)
    steps = len(range(0, len(targets), 25))  # one batch per step at 100 items
    assert len(calls) == steps
    calls.clear()
    with monkeypatch.context() as patch:  # the same scoring, each model on its own
        patch.setattr("rec_pipelines.training.share_content_scores", lambda models: contextlib.nullcontext())
        apart, _ = evaluate_in_steps(models, histories, targets, cold, 25, 0.0)
    assert len(calls) == 2 * steps
    for name in models:
        assert np.array_equal(shared[name]["per_user_ndcg@10"], apart[name]["per_user_ndcg@10"])
        assert shared[name]["coverage@10"] == apart[name]["coverage@10"]
    with share_content_scores([other, small.model]):
        assert torch.equal(other.score(histories.items[:7], histories.event_types[:7]),
                           HybridRecommender.score(other, histories.items[:7], histories.event_types[:7]))
        assert small.model._shared_content is other._shared_content is not None
    assert small.model._shared_content is None is other._shared_content

    changed = small.text.clone()
    changed[1] = changed[2]
    stale = HybridRecommender.load(small.path)
    stale.grow(changed)
    assert not stale.same_content(other)
    with share_content_scores([other, stale]):
        assert stale._shared_content is not other._shared_content
    other.content_window += 1
    other._content = None
    assert not other.same_content(small.model)


def test_no_early_stop_before_enough_users_differ():
    """The stop rule alone: an SE from one or two users whose NDCG differs is not trusted."""
    from rec_pipelines.training import MIN_DISCORDANT_USERS, early_stop

    champion = np.zeros(500)
    champion[:6] = 1.0  # six hits
    candidate = champion.copy()
    candidate[0] = 0.9  # one user differs: the SE (0.0002) is 1.7 % of the NDCG, below the 5 % target
    assert paired_difference(candidate, champion)["se"] <= 0.05 * champion.mean()
    assert early_stop(candidate, champion, looks=9, target_se_relative=0.05, clear_tolerance=0.002) is None
    candidate[6:6 + MIN_DISCORDANT_USERS - 1] = 0.1  # now enough users differ, and the SE is still small
    assert np.count_nonzero(candidate != champion) == MIN_DISCORDANT_USERS
    assert early_stop(candidate, champion, looks=9, target_se_relative=0.05, clear_tolerance=0.002) == "se_target"
    assert early_stop(candidate, champion, looks=9, target_se_relative=1e-9, clear_tolerance=0.002) == "clear"
    assert early_stop(candidate, champion, looks=9, target_se_relative=1e-9, clear_tolerance=None) is None
    assert early_stop(candidate, np.zeros(500), looks=9, target_se_relative=0.05, clear_tolerance=0.002) is None

def test_the_gate_stops_once_its_decision_is_clear(tmp_path, single_thread):
    """With a tolerance, scoring also stops at the first look where the candidate is within it
    beyond doubt (Bonferroni-corrected over the looks) and the SE is at most 15 % of the
    champion's NDCG; a candidate that is clearly worse never stops early that way."""
    from statistics import NormalDist

    from test_serving import make_bundle

    from rec_models.evaluation import PopularityRecommender
    from rec_models.models.recommender import RecommenderConfig, train_recommender
    from rec_pipelines.training import CLEAR_ALPHA, CLEAR_SE_RELATIVE, MIN_DISCORDANT_USERS, evaluate_in_steps

    small = make_bundle(tmp_path / "bundle", max_epochs=1, val_users=0)
    other, _ = train_recommender(small.split, small.text, RecommenderConfig.from_dict(
        {**small.model.config.to_dict(), "seed": 1, "max_epochs": 2}))
    histories, targets = small.split.test_histories(), small.split.test_targets
    cold = np.zeros(len(targets), bool)
    models = {"candidate": other, "champion": small.model}
    every, _ = evaluate_in_steps(models, histories, targets, cold, 10, 0.0)
    first, second = every["candidate"]["per_user_ndcg@10"], every["champion"]["per_user_ndcg@10"]
    steps = [*range(10, len(targets), 10)]  # the looks: none at the last step, which scores everyone
    z = NormalDist().inv_cdf(1 - CLEAR_ALPHA / len(steps))

    def clear_at(tolerance: float) -> int | None:
        for n in steps:
            paired, base = paired_difference(first[:n], second[:n]), second[:n].mean()
            if (base > 0 and np.count_nonzero(first[:n] != second[:n]) >= MIN_DISCORDANT_USERS
                    and paired["se"] <= CLEAR_SE_RELATIVE * base and paired["diff"] - z * paired["se"] >= -tolerance):
                return n
        return None

    tolerance = next((t for t in (0.01, 0.03, 0.1, 0.3, 1.0) if clear_at(t) is not None), None)
    assert tolerance is not None, "no tolerance gives a clear stop on this data"
    expected = clear_at(tolerance)
    stopped, why = evaluate_in_steps(models, histories, targets, cold, 10, 1e-9, clear_tolerance=tolerance)
    assert why == "clear" and stopped["candidate"]["n_users"] == expected
    assert np.array_equal(stopped["candidate"]["per_user_ndcg@10"], first[:expected])
    # without a tolerance (or with none to spare) the same target scores everyone
    assert evaluate_in_steps(models, histories, targets, cold, 10, 1e-9)[1] == "all"
    assert evaluate_in_steps(models, histories, targets, cold, 10, 1e-9, clear_tolerance=-1.0)[1] == "all"

    # popularity against the model: clearly worse, so never a clear stop at the gate's tolerance
    popularity = PopularityRecommender().fit(small.split.train, small.model.n_items)

    class Worse:
        n_items = small.model.n_items

        def ranker(self):
            return lambda items, event_types=None: torch.as_tensor(popularity.score(items), dtype=torch.float32)

        def item_tables_frozen(self):
            return contextlib.nullcontext()

    worse, why = evaluate_in_steps({"candidate": Worse(), "champion": small.model}, histories, targets, cold, 10, 1e-9,
                                   clear_tolerance=0.002)
    assert why == "all" and worse["candidate"]["ndcg@10"] < worse["champion"]["ndcg@10"] - 0.002

def evaluation_config(users: int, seed: int = 0) -> dict:
    config = full_run_config()
    config["ops"]["model_evaluation"] = {"config": {"eval_users": users, "eval_seed": seed}}
    return config


def test_the_gate_evaluates_a_seeded_sample_and_tags_how(dagster_env, small_simulator, single_thread):
    settings, defs, instance = dagster_env
    small_simulator.write_batch(settings.landing_zone, 0)
    registry = ModelRegistry(settings.mlflow_tracking_uri, settings.mlflow_artifact_root, settings.model_name)
    job = defs.resolve_job_def("full_retrain_job")
    first = job.execute_in_process(instance=instance, run_config=evaluation_config(30))
    assert first.success
    evaluation = first.output_for_node("model_evaluation")
    population = len(first.output_for_node("training_data").load().split.train)
    assert population > 30
    assert evaluation["eval_users"] == evaluation["candidate"]["n_users"] == len(evaluation["eval_user_ids"]) == 30
    assert (evaluation["eval_population"], evaluation["eval_seed"]) == (population, 0)
    assert evaluation["popularity"]["n_users"] == 30
    run = registry.client.get_run(first.output_for_node("candidate_model").run_id)
    assert run.data.metrics["eval_users"] == 30 and run.data.metrics["eval_population"] == population
    decision = first.output_for_node("champion_model")
    assert decision["reason"] == f"no champion yet (evaluated on 30 of {population} held-out users, seed 0)"
    tags = registry.client.get_model_version(settings.model_name, decision["version"]).tags
    assert (tags["eval.users"], tags["eval.sample"], tags["eval.population"], tags["eval.seed"]) == (
        "30", "30", str(population), "0")
    assert "eval.paired_se" not in tags  # nothing to pair with yet

    # evaluation again, same seed: the same users and metrics; now against a champion (itself).
    # The candidate's local bundle is gone (as in another pod): it is read back from MLflow.
    bundle = Path(first.output_for_node("candidate_model").bundle_dir)
    shutil.rmtree(bundle)
    again = job.execute_in_process(instance=instance, run_config=evaluation_config(30),
                                   asset_selection=[dg.AssetKey("model_evaluation"), dg.AssetKey("champion_model")])
    repeated = again.output_for_node("model_evaluation")
    assert repeated["eval_user_ids"] == evaluation["eval_user_ids"]
    assert not bundle.exists()  # (the fallback downloaded elsewhere)
    # (NaN-aware: cold_ndcg@10 is NaN when the sample holds no cold-start user)
    assert json.dumps(repeated["candidate"], sort_keys=True) == json.dumps(evaluation["candidate"], sort_keys=True)
    assert repeated["paired"]["users"] == 30 and repeated["paired_se_relative"] is not None
    second = again.output_for_node("champion_model")
    tags = registry.client.get_model_version(settings.model_name, second["version"]).tags
    assert tags["eval.users"] == "30" and float(tags["eval.paired_se"]) == pytest.approx(repeated["paired"]["se"])
    assert tags["eval.stopped_by"] == repeated["eval_stopped_by"] == "all"  # 30 users: one look, all of them
    assert float(tags["eval.paired_se_relative"]) == pytest.approx(repeated["paired_se_relative"], abs=1e-6)
    metadata = instance.get_latest_materialization_event(dg.AssetKey("champion_model")).asset_materialization.metadata
    assert metadata["evaluation"].value["eval.users"] == "30"
    assert (instance.get_latest_materialization_event(dg.AssetKey("model_evaluation"))
            .asset_materialization.metadata["eval_users"].value) == 30

    # Scored in steps: the same model on both sides has a paired SE of 0, yet no user's NDCG
    # differs, so no SE is trusted and every user is scored.
    config = evaluation_config(30)
    config["ops"]["model_evaluation"]["config"].update(step_users=10, target_se_relative=1.0, min_cold_users=0)
    stepped = job.execute_in_process(instance=instance, run_config=config,
                                     asset_selection=[dg.AssetKey("model_evaluation")]).output_for_node("model_evaluation")
    assert stepped["eval_users"] == stepped["paired"]["users"] == 30 and stepped["eval_stopped_by"] == "all"
    assert stepped["paired"]["se"] == 0.0 and stepped["eval_user_ids"] == repeated["eval_user_ids"]

    # another seed scores other users
    other = job.execute_in_process(instance=instance, run_config=evaluation_config(30, seed=1),
                                   asset_selection=[dg.AssetKey("model_evaluation")])
    assert other.output_for_node("model_evaluation")["eval_user_ids"] != evaluation["eval_user_ids"]

    # new feedback reaches training_data but no new candidate is trained: the gate refuses the
    # older candidate (it would score items it never had) and says what to do
    small_simulator.write_batch(settings.landing_zone, 1)
    upstream = ["raw_feedback", "validated_feedback", "training_data"]
    assert job.execute_in_process(instance=instance, run_config=config,
                                  asset_selection=[dg.AssetKey(a) for a in upstream]).success
    stale = job.execute_in_process(instance=instance, run_config=config, raise_on_error=False,
                                   asset_selection=[dg.AssetKey("model_evaluation")])
    assert not stale.success
    failure = next(e for e in stale.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE)
    assert "materialise candidate_model again" in failure.step_failure_data.error.message


def test_training_validates_on_a_bounded_sample_of_users(tmp_path, single_thread):
    """``val_users`` bounds the users validation scores (epochs, blend weights): the sample is a
    stratified subset of the split, the model still trains, and 0 means every user."""
    from test_serving import make_bundle

    from rec_models.models.recommender import user_sample

    small = make_bundle(tmp_path / "all", max_epochs=1, val_users=0)
    users = len(small.split.train)
    part = user_sample(small.split, 25, seed=0)
    assert len(part.train) == 25 < users
    positions = [small.split.train.user_ids.index(u) for u in part.train.user_ids]
    assert np.array_equal(part.val_targets, small.split.val_targets[positions])
    assert user_sample(small.split, 0, seed=0) is small.split
    assert user_sample(small.split, users, seed=0) is small.split

    from rec_models.models.recommender import RecommenderConfig, train_recommender

    config = RecommenderConfig.from_dict({**small.model.config.to_dict(), "val_users": 25})
    model, history = train_recommender(small.split, small.text, config)
    assert history["val_users"] == 25 and len(history["epochs"]) == 1 and model.n_items == small.model.n_items

    # A fine-tune validates on its own, smaller sample (0: val_users).
    for finetune_val_users, expected in ((10, 10), (0, 25)):
        tuned = RecommenderConfig.from_dict({**config.to_dict(), "finetune_val_users": finetune_val_users})
        _, history = train_recommender(small.split, small.text, tuned, init=model, users_subset=np.arange(5))
        assert history["val_users"] == expected
