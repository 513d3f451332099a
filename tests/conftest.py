"""Shared fixtures: an isolated environment (temp DAGSTER_HOME, lake, MLflow store) per test."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

# A tiny training budget so pipeline tests train for real in seconds.
TINY_TRAIN = {"max_epochs": 3, "patience": 3, "finetune_max_epochs": 2, "d_model": 32, "max_len": 20,
              "replay_users": 20, "model": {"batch_size": 32, "n_negatives": 64, "ease_lambdas": [10.0, 100.0]}}
TINY_RUN_CONFIG = {"ops": {"candidate_model": {"config": TINY_TRAIN}}}


def full_run_config() -> dict:
    """``TINY_RUN_CONFIG`` for a full retrain (a fresh copy each call)."""
    return {"ops": {"candidate_model": {"config": {**TINY_TRAIN, "mode": "full"}}}}


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory) -> Path:
    from helpers import make_tiny_encoder_dir

    return make_tiny_encoder_dir(tmp_path_factory.mktemp("tiny-encoder"))


@pytest.fixture
def recsys_env(tmp_path, monkeypatch, tiny_encoder_dir):
    """Point every setting at a temp folder; returns the resulting Settings."""
    from rec_pipelines.settings import Settings, prepare_environment

    monkeypatch.chdir(tmp_path)
    for name in ("RECSYS_LANDING_ZONE", "RECSYS_LAKE", "RECSYS_MLFLOW_ARTIFACTS", "RECSYS_MODEL_NAME",
                 "RECSYS_PSEUDONYM_KEY_FILE", "RECSYS_PSEUDONYM_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("RECSYS_TEXT_MODEL", str(tiny_encoder_dir))
    shutil.copy(REPO_ROOT / "dagster.yaml", tmp_path / "dagster.yaml")
    settings = prepare_environment(Settings.from_env())
    yield settings
    import mlflow

    if mlflow.active_run():
        mlflow.end_run()


@pytest.fixture
def small_simulator():
    from rec_models.simulator import FeedbackSimulator, SimulatorConfig

    return FeedbackSimulator(SimulatorConfig(n_items=120, n_users=80, events_per_user=20, batch_users=20,
                                             batch_events_per_user=5, batch_new_items=5))


@pytest.fixture
def dagster_env(recsys_env):
    """(settings, definitions, a real Dagster instance) in the temp environment."""
    import dagster as dg

    from rec_pipelines.definitions import defs as load_defs

    with dg.DagsterInstance.get() as instance:
        yield recsys_env, load_defs(), instance


@pytest.fixture(scope="module")
def single_thread():
    """Tiny models train as fast on one thread, and two threads on the 2 shared cores of the CI
    machine collapse (>10x slower) as soon as another process is busy; restores the setting."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
