"""The promotion gate and the registry aliases, on a real MLflow store in a temp dir."""

import gc
import json
import weakref
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException

import mlflow
from rec_pipelines.registry import BATCHES_ARTIFACT, CHALLENGER, CHAMPION, ModelRegistry, batch_tags, decide_promotion

GOOD = {"hr@10": 0.20, "ndcg@10": 0.10, "coverage@10": 0.30}


def test_first_model_is_promoted():
    decision = decide_promotion(GOOD, None)
    assert decision.promoted and decision.reason == "no champion yet"


@pytest.mark.parametrize(
    "candidate, promoted, why",
    [
        ({**GOOD, "ndcg@10": 0.1015}, True, "guard metrics passed"),
        ({**GOOD, "ndcg@10": 0.0990}, True, "guard metrics passed"),  # within tolerance 0.002
        ({**GOOD, "ndcg@10": 0.0900}, False, "worse than champion"),  # a degraded model
        ({**GOOD, "coverage@10": 0.10}, False, "coverage@10"),  # guard metric regressed
    ],
)
def test_gate_compares_with_the_champion(candidate, promoted, why):
    decision = decide_promotion(candidate, GOOD, tolerance=0.002)
    assert decision.promoted is promoted and why in decision.reason
    assert decision.tags()["promotion.decision"] == ("promoted" if promoted else "rejected")
    assert decision.tags()["champion.ndcg_at_10"] == "0.1"


@pytest.mark.parametrize(
    "paired, ndcg, promoted, why",
    [
        ({"diff": -0.005, "se": 0.004, "users": 2000}, 0.095, True, "not significant"),  # noise
        ({"diff": -0.005, "se": 0.002, "users": 2000}, 0.095, False, "paired difference -0.0050"),  # truly worse
        ({"diff": -0.02, "se": 0.05, "users": 60}, 0.08, False, "worse than champion"),  # 20 % worse: never excused
        (None, 0.095, False, "worse than champion"),  # no paired numbers: the plain tolerance rule
    ],
)
def test_a_shortfall_beyond_tolerance_rejects_only_when_significant(paired, ndcg, promoted, why):
    decision = decide_promotion({**GOOD, "ndcg@10": ndcg}, GOOD, tolerance=0.002, paired=paired)
    assert decision.promoted is promoted and why in decision.reason
    if paired:
        assert decision.tags()["paired.ndcg_se"] == f"{paired['se']:.6g}"
    assert not decide_promotion({**GOOD, "ndcg@10": ndcg}, GOOD, paired=paired, significance_z=0).promoted


class Echo(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return model_input


def test_aliases_move_only_on_promotion(tmp_path):
    registry = ModelRegistry(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "artifacts", "demo-model")

    def register_one():
        with registry.start_run("r") as run:
            info = mlflow.pyfunc.log_model(name="model", python_model=Echo(), pip_requirements=["mlflow"])
        return registry.register(info.model_uri, run.info.run_id, tags={"batches": "[]"})

    assert registry.version_by_alias(CHAMPION) is None
    v1 = register_one()
    registry.apply_decision(v1.version, decide_promotion(GOOD, None))
    v2 = register_one()
    registry.apply_decision(v2.version, decide_promotion({**GOOD, "ndcg@10": 0.05}, GOOD))
    assert registry.version_by_alias(CHAMPION).version == v1.version
    assert registry.version_by_alias(CHALLENGER).version == v2.version
    rejected = registry.client.get_model_version("demo-model", v2.version)
    assert rejected.tags["promotion.decision"] == "rejected" and "worse" in rejected.tags["promotion.reason"]
    v3 = register_one()
    registry.apply_decision(v3.version, decide_promotion({**GOOD, "ndcg@10": 0.12}, GOOD))
    promoted = registry.client.get_model_version("demo-model", v3.version)
    assert registry.version_by_alias(CHAMPION).version == v3.version
    assert promoted.tags["previous_champion"] == str(v1.version)
    experiment = registry.client.get_experiment_by_name("demo-model")
    assert experiment.artifact_location.startswith((tmp_path / "artifacts").as_uri())


def test_logging_the_recommender_checks_its_example_and_keeps_no_loaded_copy(tmp_path, monkeypatch):
    """MLflow loads the logged model once to serve the input example; nothing keeps that copy
    afterwards (at 10M events it is 0.7 GB the training run would carry to its end)."""
    from test_serving import make_bundle

    from rec_models.serving import Recommender, example_request

    bundle = make_bundle(tmp_path / "bundle", max_epochs=0)
    registry = ModelRegistry(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "artifacts", "demo-model")
    loaded, original = [], Recommender.__init__

    def tracked(self, *args, **kwargs):
        original(self, *args, **kwargs)
        loaded.append(weakref.ref(self))

    monkeypatch.setattr(Recommender, "__init__", tracked)
    with registry.start_run("r"):
        registry.log_recommender(bundle.path, example_request(bundle.sequences.user_ids[:2], bundle.vocab.ids[:2]))
    gc.collect()
    assert len(loaded) == 1 and loaded[0]() is None


def test_a_local_store_is_read_in_place_and_a_remote_one_downloaded(tmp_path, monkeypatch):
    """The champion is loaded from the artifact folder itself when the store is local (a
    ~200 MB bundle at 10M events is not copied for each load); otherwise from a download."""
    import numpy as np
    from test_serving import make_bundle

    import rec_pipelines.registry.mlflow_registry as registry_module
    from rec_models.models import HybridRecommender
    from rec_models.serving import example_request

    bundle = make_bundle(tmp_path / "bundle", max_epochs=0)
    registry = ModelRegistry(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "artifacts", "demo-model")
    with registry.start_run("r") as run:
        info = registry.log_recommender(bundle.path, example_request(bundle.sequences.user_ids[:2], bundle.vocab.ids[:2]))
    version = registry.register(info.model_uri, run.info.run_id, tags={})
    registry.apply_decision(version.version, decide_promotion(GOOD, None))
    histories = bundle.split.test_histories()
    expected = HybridRecommender.load(bundle.path).score(histories.items, histories.event_types)

    local = registry_module.local_artifacts(f"models:/demo-model/{version.version}")
    assert local is not None and local.is_relative_to(tmp_path / "artifacts")

    def refuse(*args, **kwargs):
        raise AssertionError("a local store was downloaded from")

    with monkeypatch.context() as patched:
        patched.setattr(mlflow.artifacts, "download_artifacts", refuse)
        in_place = registry.load_recommender(CHAMPION)
    assert np.array_equal(in_place.score(histories.items, histories.event_types), expected)

    downloads = []
    original = mlflow.artifacts.download_artifacts
    monkeypatch.setattr(registry_module, "local_artifacts", lambda uri: None)  # as for a remote store
    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", lambda **kw: downloads.append(kw) or original(**kw))
    downloaded = registry.load_recommender(model_uri=info.model_uri)
    assert len(downloads) == 1 and not Path(downloads[0]["dst_path"]).exists()  # removed after
    assert np.array_equal(downloaded.score(histories.items, histories.event_types), expected)
    with pytest.raises(KeyError):
        registry.load_recommender("no-such-alias")

def test_the_batches_a_version_was_trained_on_outgrow_any_tag(tmp_path):
    """Months of micro-batches are more batch ids than a version tag holds (100,000 characters):
    the run's batches.json keeps the list, the tags a summary; versions registered when the
    list was a tag still answer from it."""
    registry = ModelRegistry(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "artifacts", "demo-model")
    batches = [f"events-{i:05d}-part0000-0123abcd" for i in range(5_000)]  # ~170,000 characters as JSON
    assert len(json.dumps(batches)) > 100_000
    with registry.start_run("r") as run:
        info = mlflow.pyfunc.log_model(name="model", python_model=Echo(), pip_requirements=["mlflow"])
        mlflow.log_dict({"batches": batches, "new_batches": batches[-1:]}, BATCHES_ARTIFACT)
    version = registry.register(info.model_uri, run.info.run_id, tags=batch_tags(batches, batches[-1:]))
    assert registry.trained_batches(version) == batches
    assert version.tags["batches.count"] == "5000" and version.tags["new_batches.last"] == batches[-1]
    with pytest.raises(MlflowException, match="100000|exceed"):  # what the tag would have done
        registry.client.set_model_version_tag("demo-model", version.version, "batches", json.dumps(batches))
    old = registry.register(info.model_uri, run.info.run_id, tags={"batches": json.dumps(batches[:3])})
    assert registry.trained_batches(old) == batches[:3]
