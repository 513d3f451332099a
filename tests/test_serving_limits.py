"""``recsys serve`` against hostile clients: every malformed or oversized request gets a 4xx
with a message (never a 500), a bad request never changes the answers of the requests batched
with it, stalled connections are cut, and a champion that cannot be loaded is reported by
``GET /model`` and logged once."""

import asyncio
import json
import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlparse

import pytest
from test_serving_http import get, post, records, running_server

from rec_models.serving import example_request
from rec_pipelines.registry import decide_promotion
from rec_pipelines.server import RequestBatcher

LIMITS = ["--max-body-bytes", "65536", "--max-rows", "20", "--max-results", "300", "--max-response-bytes", "30000",
          "--max-json-depth", "8", "--max-id-chars", "64", "--header-timeout-s", "1", "--body-timeout-s", "1"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("limits"), *LIMITS) as served:
        yield served


def deep(levels: int, inner: str = "1") -> str:
    return "[" * levels + inner + "]" * levels


@pytest.mark.parametrize("body, mentions", [
    (records({"user_id": "\ud800"}), "user_id is not valid Unicode"),
    (records({"user_id": "u1", "recent_item_ids": ["ok", "\udfff"]}), "not valid Unicode"),
    (records({"user_id": "u1", "context_text": "caf\udce9"}), "context_text is not valid Unicode"),
    (('{"dataframe_records": [{"user_id": "u1", "k": ' + "1" + "0" * 400 + "}]}").encode(), "k must be an integer"),
    (b'{"dataframe_records": [{"user_id": "u1", "k": 1e400}]}', "k must be an integer"),
    (b'{"dataframe_records": [{"user_id": "u1", "diversity": 1e400}]}', "diversity"),
    (('{"dataframe_records": [{"user_id": "u1", "diversity": ' + "9" * 400 + "}]}").encode(), "diversity"),
    (deep(30_000).encode(), "nests deeper than 8"),
    (('{"dataframe_records": [{"user_id": "u1", "k": ' + deep(30_000) + "}]}").encode(), "nests deeper than 8"),
    (('{"dataframe_records": [{"user_id": "u1", "recent_item_ids": ' + deep(9, '"a"') + "}]}").encode(),
     "nests deeper than 8"),
    ({"dataframe_split": {"columns": [1, None], "data": [["u1", 3]]}}, "columns must be field names"),
    ({"dataframe_split": {"columns": [["user_id"]], "data": [["u1"]]}}, "columns must be field names"),
    (records({"user_id": "u" * 65}), "user_id is longer than 64"),
    (records({"user_id": 10 ** 70}), "user_id is longer than 64"),
    (records({"user_id": "u1", "exclude": ["x" * 65]}), "longer than 64"),
    (b"\xff\xfe{}", "not valid JSON"),
])
def test_hostile_requests_get_400_with_a_message(server, body, mentions):
    status, answer = post(server.url, body)
    assert status == 400, answer
    assert mentions in answer["message"]


@pytest.mark.parametrize("body, mentions", [
    (records(*({"user_id": f"u{i}", "k": 1} for i in range(21))), "at most 20 per request"),
    (records(*({"user_id": f"u{i}", "k": 100} for i in range(4))), "at most 300 per request"),
    (records({"user_id": "u1", "k": 200}, {"user_id": "u" * 64, "k": 90}), "over 30000 bytes"),
    (records({"user_id": "u1", "context_text": "x" * 70_000}), "over the limit of 65536"),
])
def test_oversized_requests_and_answers_get_413(server, body, mentions):
    status, answer = post(server.url, body)
    assert status == 413, answer
    assert mentions in answer["message"]


def test_json_depth_is_checked_without_recursion():
    from rec_pipelines.server import RequestRefused
    from rec_pipelines.server.limits import parse_json

    for body in (deep(200_000), '{"a": ' * 100_000 + "1" + "}" * 100_000, deep(17)):
        with pytest.raises(RequestRefused, match="nests deeper than 16"):
            parse_json(body.encode(), 16)
    assert parse_json(deep(16).encode(), 16) == json.loads(deep(16))


def test_a_stalled_request_line_is_cut_after_the_header_timeout(server):
    host, port = urlparse(server.url).hostname, urlparse(server.url).port
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-")  # and then nothing
        started = time.monotonic()
        assert sock.recv(1024) == b""  # the server closed the connection
        assert 0.5 < time.monotonic() - started < 5


def test_a_stalled_body_gets_408_after_the_body_timeout(server):
    host, port = urlparse(server.url).hostname, urlparse(server.url).port
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"dataframe_records\"")
        started = time.monotonic()
        answer = sock.recv(4096)
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert 0.5 < time.monotonic() - started < 5


def same_answer(rows: list[dict], expected: list[dict]) -> bool:
    """The same items, titles and explanations in the same order; scores equal up to float
    rounding (a batched forward pass sums in another order)."""
    strip = [{k: v for k, v in row.items() if k not in ("score", "request_id")} for row in rows]
    return strip == [{k: v for k, v in row.items() if k not in ("score", "request_id")} for row in expected] and all(
        row["score"] == pytest.approx(other["score"], rel=1e-4, abs=1e-5) for row, other in zip(rows, expected))


def test_hostile_requests_never_touch_the_answers_of_good_ones_sent_with_them(server):
    users = server.bundle.sequences.user_ids[:20]
    alone = {user: post(server.url, records({"user_id": user, "k": 5}))[1]["predictions"] for user in users}
    hostile = [records({"user_id": "\ud800"}), ("[" * 50_000).encode(), records({"user_id": "u", "k": 10 ** 400})]
    bodies = [records({"user_id": u, "k": 5}) for u in users] + hostile * 4
    for trial in range(3):
        with ThreadPoolExecutor(32) as pool:
            answers = list(pool.map(lambda body: post(server.url, body), bodies))
        for user, (status, body) in zip(users, answers):
            assert status == 200
            assert same_answer(body["predictions"], alone[user])
        assert {status for status, _ in answers[len(users):]} == {400}
    assert get(server.url, "/model")["failed_requests"] == 0


class FailingFor:
    """A real recommender that raises on one user, as a bug in the model code would."""

    def __init__(self, recommender, bad_user: str):
        self.recommender, self.bad_user = recommender, bad_user

    def answer(self, parsed):
        if any(request.user_id == self.bad_user for request in parsed):
            raise RuntimeError("boom")
        return self.recommender.answer(parsed)


def test_a_request_that_fails_in_the_model_fails_alone(server):
    from rec_models.serving import Recommender, parse_rows

    recommender = Recommender(server.bundle.path)
    holder = SimpleNamespace(current=SimpleNamespace(recommender=FailingFor(recommender, "bad")))
    users = server.bundle.sequences.user_ids[:8]

    async def scenario():
        batcher = RequestBatcher(holder)
        runner = asyncio.create_task(batcher.run())
        requests = [parse_rows([{"user_id": u, "k": 4}]) for u in users] + [parse_rows([{"user_id": "bad"}])]
        answers = await asyncio.gather(*(batcher.answer(r) for r in requests), return_exceptions=True)
        runner.cancel()
        return batcher, answers

    batcher, answers = asyncio.run(scenario())
    assert isinstance(answers[-1], RuntimeError) and batcher.failures == 1
    for user, (columns, counts, _) in zip(users, answers):
        expected, _ = recommender.answer(parse_rows([{"user_id": user, "k": 4}]))
        assert columns["item_id"] == expected["item_id"] and counts == [4]


def _break_artifacts(server, version: str) -> Path:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=server.tracking_uri)
    source = client.get_model_version(server.registry.model_name, version).source
    location = Path(client.get_logged_model(source.removeprefix("models:/")).artifact_location.removeprefix("file://"))
    shutil.rmtree(location)
    return location


def test_a_champion_that_cannot_be_loaded_is_reported_and_logged_once(server):
    with server.registry.start_run("broken") as run:
        info = server.registry.log_recommender(server.bundle.path, example_request(["u1"], []))
    version = server.registry.register(info.model_uri, run.info.run_id, tags={})
    _break_artifacts(server, version.version)
    live = get(server.url, "/model")["version"]
    server.registry.apply_decision(version.version, decide_promotion({"ndcg@10": 1.0}, None))
    deadline = time.monotonic() + 60
    while (get(server.url, "/model").get("failed_version") or {}).get("version") != str(version.version):
        assert time.monotonic() < deadline, server.log.read_text()[-2000:]
        time.sleep(0.5)
    time.sleep(3.5)  # several more reload attempts (every second)
    model = get(server.url, "/model")
    assert model["version"] == live
    assert model["failed_version"]["attempts"] >= 3
    assert model["failed_version"]["reason"]
    assert post(server.url, records({"user_id": "anyone", "k": 2}))[0] == 200
    log = server.log.read_text()
    assert log.count(f"cannot load version {version.version} ") == 1
    assert log.count("Traceback") == 1


def test_limits_hold_for_a_burst_of_oversized_answers(server):
    body = json.dumps(records(*({"user_id": "u" * 64, "k": 15} for _ in range(20)))).encode()
    with ThreadPoolExecutor(16) as pool:
        statuses = [status for status, _ in pool.map(lambda _: post(server.url, body), range(32))]
    assert set(statuses) == {413}
