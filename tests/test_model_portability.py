"""The registered model carries its code and complete requirements: it loads and recommends in
a fresh virtualenv built from the logged requirements alone, with this project not installed."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
from conftest import full_run_config

import mlflow
from rec_pipelines.definitions import defs as load_defs

TORCH_WHEELS = Path("/opt/wheels")

LOAD_AND_PREDICT = """
import importlib.util, json, sys
import mlflow, pandas as pd
assert importlib.util.find_spec("rec_models") is None, "the project must not be importable here"
model = mlflow.pyfunc.load_model(sys.argv[1])
answer = model.predict(pd.DataFrame({"user_id": json.loads(sys.argv[2]), "k": 5}))
print(json.dumps(answer[["user_id", "item_id", "title"]].to_dict("records")))
"""


def uv() -> list[str]:
    found = shutil.which("uv")
    return [found] if found else ["python3", "-m", "uv"]


@pytest.mark.timeout(900)
def test_champion_loads_in_a_clean_virtualenv_from_its_logged_requirements(recsys_env, small_simulator, tmp_path):
    settings = recsys_env
    small_simulator.write_batch(settings.landing_zone, 0)
    with dg.DagsterInstance.get() as instance:
        assert load_defs().resolve_job_def("full_retrain_job").execute_in_process(
            instance=instance, run_config=full_run_config()).success

    uri = f"models:/{settings.model_name}@champion"
    requirements = Path(mlflow.artifacts.download_artifacts(f"{uri}/requirements.txt", dst_path=str(tmp_path)))
    pins = requirements.read_text().split()
    assert {pin.split("==")[0] for pin in pins} >= {"mlflow", "torch", "lightning", "pandas", "numpy", "pyarrow"}
    assert all("==" in pin for pin in pins)

    venv = tmp_path / "clean-venv"
    subprocess.run([*uv(), "venv", "-q", "--python", f"{sys.version_info.major}.{sys.version_info.minor}", str(venv)],
                   check=True)
    install = [*uv(), "pip", "install", "-q", "--python", str(venv / "bin" / "python"), "-r", str(requirements)]
    cpu_torch = sorted(TORCH_WHEELS.glob("torch-*+cpu-*.whl"))
    if cpu_torch:  # the CPU build of the pinned torch, as the Makefile installs it
        overrides = tmp_path / "overrides.txt"
        overrides.write_text(next(p for p in pins if p.startswith("torch==")) + "+cpu\n")
        install += ["--find-links", str(TORCH_WHEELS), "--override", str(overrides)]
    subprocess.run(install, check=True, timeout=600)

    users = small_simulator.events(0)["user_id"].drop_duplicates().head(2).tolist()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "MLFLOW_TRACKING_URI": settings.mlflow_tracking_uri,
           "RECSYS_PSEUDONYM_KEY_FILE": str(settings.pseudonym_key_file), "GIT_PYTHON_REFRESH": "quiet"}
    done = subprocess.run([str(venv / "bin" / "python"), "-c", LOAD_AND_PREDICT, uri, json.dumps(users)],
                          cwd=outside, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert [row["user_id"] for row in answer] == [users[0]] * 5 + [users[1]] * 5
    assert {row["title"] for row in answer} <= set(small_simulator.catalog()["title"])
