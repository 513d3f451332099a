"""``recsys serve`` for real: the champion registered in a temp MLflow store, served in its own
process on a free loopback port, queried over HTTP: good and bad requests, concurrent requests
answered together, and a newly promoted version picked up without a restart."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_serving import make_bundle

from rec_models.serving import EXPLANATION_PREFIX, OUTPUT_COLUMNS, example_request
from rec_pipelines.cli.serve import missing_model, parse_args, serve_command
from rec_pipelines.registry import ModelRegistry, decide_promotion
from rec_pipelines.settings import Settings

MODEL_NAME = "serving-test"
STARTUP_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_server(root: Path, *extra_args: str, env: dict | None = None):
    """A champion registered in a fresh MLflow store under ``root``, served by ``recsys serve``
    (plus ``extra_args``) in its own process group, which is always killed at the end. Yields
    url, bundle, log (server output), tracking_uri, registry, model_uri and run_id."""
    bundle = make_bundle(root / "bundle", max_epochs=0)  # weights need not be trained to test the contract
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    registry = ModelRegistry(tracking_uri, root / "artifacts", MODEL_NAME)
    with registry.start_run("serve-test") as run:
        info = registry.log_recommender(bundle.path, example_request(bundle.sequences.user_ids[:2], bundle.vocab.ids[:2]))
    version = registry.register(info.model_uri, run.info.run_id, tags={})
    registry.apply_decision(version.version, decide_promotion({"ndcg@10": 0.0}, None))

    port = free_port()
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("RECSYS_", "DAGSTER_", "MLFLOW_"))}
    env = {**inherited, "RECSYS_HOME": str(root), "MLFLOW_TRACKING_URI": tracking_uri, "RECSYS_MODEL_NAME": MODEL_NAME,
           **(env or {})}
    log = root / "server.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "rec_pipelines.cli", "serve", "--port", str(port),
                                    "--reload-interval", "1", *extra_args],
                                   cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            assert process.poll() is None, f"server exited:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"server not up after {STARTUP_TIMEOUT_S}s:\n{log.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=2):
                    break
            except OSError:
                time.sleep(0.5)
        yield SimpleNamespace(url=url, port=port, bundle=bundle, log=log, tracking_uri=tracking_uri, registry=registry,
                              model_uri=info.model_uri, run_id=run.info.run_id, process=process, root=root)
    finally:  # the whole group: `recsys serve` execs `mlflow models serve`, which starts uvicorn
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("serve")) as served:
        yield served


def get(url: str, path: str) -> dict:
    with urllib.request.urlopen(f"{url}{path}", timeout=10) as response:
        return json.loads(response.read())


def post(url: str, body: bytes | dict) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"{url}/invocations", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def records(*rows: dict) -> dict:
    return {"dataframe_records": list(rows)}


def test_cli_defaults_serve_the_champion_on_loopback(monkeypatch):
    monkeypatch.setenv("RECSYS_MODEL_NAME", "my-model")
    args = parse_args([], Settings.from_env())
    assert (args.model_uri, args.host, args.engine) == ("models:/my-model@champion", "127.0.0.1", "recsys")
    command, env = serve_command(parse_args(["--port", "6123", "--engine", "mlflow"], Settings.from_env()))
    assert command[1:5] == ["-m", "mlflow", "models", "serve"]
    assert ["--env-manager", "local"] == command[command.index("--env-manager"):][:2]
    assert command[command.index("--port") + 1] == "6123"
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)


def test_missing_models_are_reported_before_starting(server):
    assert missing_model(f"models:/{MODEL_NAME}@champion", server.tracking_uri) is None
    problem = missing_model("models:/no-such-model@champion", server.tracking_uri)
    assert "no-such-model" in problem and "recsys demo" in problem


def test_known_user_with_fresh_history(server):
    url, bundle, log = server.url, server.bundle, server.log
    user = bundle.sequences.user_ids[0]
    recent = [bundle.vocab.ids[i - 1] for i in bundle.sequences.items[5][-2:]]
    status, body = post(url, records({"user_id": user, "recent_item_ids": recent, "k": 4, "exclude": [bundle.vocab.ids[0]]}))
    assert status == 200
    rows = body["predictions"]
    assert [row["rank"] for row in rows] == [1, 2, 3, 4]
    assert set(rows[0]) == {*OUTPUT_COLUMNS, "request_id"} and len({row["request_id"] for row in rows}) == 1
    titles = bundle.catalog.set_index("item_id")["title"]
    assert all(row["title"] == titles[row["item_id"]] for row in rows)
    assert not {row["item_id"] for row in rows} & set(recent + [bundle.vocab.ids[0]])
    assert all(row["explanation"].startswith(EXPLANATION_PREFIX) and row["warnings"] == [] for row in rows)
    assert f"Uvicorn running on http://127.0.0.1:{url.rsplit(':', 1)[1]}" in log.read_text()


def test_unknown_items_are_ignored_with_a_warning_and_strangers_get_popular_items(server):
    url = server.url
    status, body = post(url, records({"user_id": "stranger", "recent_item_ids": ["nope-1", "nope-2"], "k": 3},
                                     {"user_id": "stranger-2"}))  # k left out in one row: default 10
    assert status == 200
    rows = body["predictions"]
    first = [row for row in rows if row["user_id"] == "stranger"]
    assert len(first) == 3 and len(rows) == 13
    assert "nope-1" in first[0]["warnings"][0] and "nope-2" in first[0]["warnings"][0]
    assert [row["item_id"] for row in first] == [row["item_id"] for row in rows[3:6]]  # both: most popular


@pytest.mark.parametrize("body, mentions", [
    (b'{"dataframe_records": [{"user_id": "u1"', "valid JSON"),
    (records({"k": 3}), "user_id"),
    (records({"user_id": None}), "user_id"),
    (records({"user_id": "u1", "k": "five"}), "k must be an integer"),
    (records({"user_id": "u1", "k": 2.5}), "k must be an integer"),
    (records({"user_id": "u1", "k": -3}), "k must be an integer"),
    (records({"user_id": "u1", "recent_item_ids": "i00001"}), "recent_item_ids must be a list"),
    (records({"user_id": "u1", "recent_item_ids": ["i00001", None]}), "recent_item_ids must hold item ids"),
    ({"rows": [{"user_id": "u1"}]}, "dataframe_records"),
    ({"dataframe_split": {"columns": ["user_id", "k"], "data": [["u1"]]}}, "dataframe_split row 0"),
    ({"dataframe_records": [{"user_id": "u1"}, "u2"]}, "row 1"),
])
def test_malformed_requests_get_400_with_a_message(server, body, mentions):
    status, answer = post(server.url, body)
    assert status == 400
    assert mentions in answer["message"]
    assert "stack_trace" not in answer and "Traceback" not in answer["message"]


def test_dataframe_split_and_inputs_give_the_same_answer_as_records(server):
    user = server.bundle.sequences.user_ids[3]
    _, by_records = post(server.url, records({"user_id": user, "k": 3}))
    _, by_split = post(server.url, {"dataframe_split": {"columns": ["user_id", "k"], "data": [[user, 3]]}})
    _, by_inputs = post(server.url, {"inputs": {"user_id": [user], "k": [3]}})
    answers = [[{k: v for k, v in row.items() if k != "request_id"} for row in body["predictions"]]
               for body in (by_records, by_split, by_inputs)]
    assert answers[0] == answers[1] == answers[2] and len(answers[0]) == 3


def test_concurrent_requests_are_answered_together_and_each_gets_its_own_answer(server):
    from concurrent.futures import ThreadPoolExecutor

    users = server.bundle.sequences.user_ids[:20]
    alone = {user: post(server.url, records({"user_id": user, "k": 5}))[1]["predictions"] for user in users}
    before = get(server.url, "/model")
    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda u: post(server.url, records({"user_id": u, "k": 5})), users * 5))
    after = get(server.url, "/model")
    for user, (status, body) in zip(users * 5, answers):
        assert status == 200
        assert [r["item_id"] for r in body["predictions"]] == [r["item_id"] for r in alone[user]]
        assert {r["user_id"] for r in body["predictions"]} == {user}
    assert after["rows"] - before["rows"] == 100
    assert after["batches"] - before["batches"] < 100  # some requests shared a forward pass


def test_a_newly_promoted_champion_is_served_without_a_restart(server):
    assert get(server.url, "/model")["version"] == "1"
    version = server.registry.register(server.model_uri, server.run_id, tags={})
    server.registry.apply_decision(version.version, decide_promotion({"ndcg@10": 0.0}, None))
    deadline = time.monotonic() + 60
    while get(server.url, "/model")["version"] != str(version.version):
        assert time.monotonic() < deadline, f"still serving the old version:\n{server.log.read_text()[-2000:]}"
        time.sleep(0.5)
    assert post(server.url, records({"user_id": "anyone", "k": 2}))[0] == 200
    assert f"now serving models:/{MODEL_NAME}@champion (version {version.version}" in server.log.read_text()
