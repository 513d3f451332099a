"""``recsys serve --workers 2`` for real: two worker processes answer on one port, one POST
/reload brings a newly promoted champion to both within seconds (registry polling off), and
SIGTERM on the parent stops both workers, each flushing its impressions."""

import json
import os
import signal
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from test_serving_http import get, records, running_server

from rec_pipelines.cli.serve import main as serve_main
from rec_pipelines.registry import decide_promotion
from rec_pipelines.server import ReloadToken

PUSH_RELOAD_S = 3.0  # one POST /reload: every worker serves the new champion within this
BOTH_UP_S = 60.0  # the second worker may still be loading the model when the first answers


def invoke(url: str, user: str) -> tuple[str, str, list[str]]:
    """(worker pid, model version, request ids) of one request on a fresh connection."""
    request = urllib.request.Request(f"{url}/invocations", data=json.dumps(records({"user_id": user, "k": 2})).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        body = json.loads(response.read())
        return (response.headers["x-recsys-worker"], response.headers["x-recsys-model-version"],
                sorted({row["request_id"] for row in body["predictions"]}))


def children(pid: int) -> set[int]:
    """The live processes whose parent is ``pid`` (from /proc)."""
    found = set()
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
        except OSError:
            continue
        if fields.get("PPid", "").strip() == str(pid) and not fields.get("State", "").startswith("Z"):
            found.add(int(status.parent.name))
    return found


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def alive(pid: int) -> bool:
    try:
        return not Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def test_a_reload_token_announced_by_one_worker_is_seen_once_by_each_other(tmp_path):
    path = tmp_path / "reload-token"
    sender, first, second = ReloadToken(path), ReloadToken(path), ReloadToken(path)
    assert not first.changed()  # no token yet
    sender.announce()
    assert not sender.changed()  # the sender reloads by itself
    assert first.changed() and not first.changed()
    assert second.changed()
    first.announce()
    assert sender.changed() and second.changed() and not first.changed()


def test_workers_must_be_positive(capsys):
    assert serve_main(["--workers", "0"]) == 2
    assert "--workers" in capsys.readouterr().err


@pytest.mark.timeout(90)  # 25-60 s on 2 busy cores, most of it building the bundle and loading the model twice
def test_two_workers_share_the_port_reload_together_and_stop_cleanly(tmp_path):
    with running_server(tmp_path, "--workers", "2", "--reload-interval", "0") as served:
        url, users = served.url, served.bundle.sequences.user_ids
        answered: dict[str, str] = {}  # request id -> worker pid
        pids: set[str] = set()
        deadline = time.monotonic() + BOTH_UP_S
        with ThreadPoolExecutor(8) as pool:
            while len(pids) < 2:
                assert time.monotonic() < deadline, f"only workers {pids} answered:\n{served.log.read_text()[-3000:]}"
                for pid, version, ids in pool.map(lambda i: invoke(url, users[i % len(users)]), range(16)):
                    assert version == "1"
                    pids.add(pid)
                    answered.update(dict.fromkeys(ids, pid))
        assert {int(pid) for pid in pids} <= children(served.process.pid)  # and multiprocessing's resource tracker
        model = get(url, "/model")
        assert model["workers"] == 2 and str(model["worker_pid"]) in pids

        version = served.registry.register(served.model_uri, served.run_id, tags={})
        served.registry.apply_decision(version.version, decide_promotion({"ndcg@10": 0.0}, None))
        new = str(version.version)
        pushed = time.monotonic()
        with urllib.request.urlopen(urllib.request.Request(f"{url}/reload", method="POST"), timeout=30) as response:
            assert json.loads(response.read())["version"] == new  # the worker that got it reloaded before answering
        latest: dict[str, str] = {}
        with ThreadPoolExecutor(8) as pool:
            while set(latest) != pids or set(latest.values()) != {new}:
                waited = time.monotonic() - pushed
                assert waited < PUSH_RELOAD_S, f"after {waited:.1f}s: {latest}\n{served.log.read_text()[-3000:]}"
                for pid, served_version, ids in pool.map(lambda i: invoke(url, users[i % len(users)]), range(8)):
                    latest[pid] = served_version
                    answered.update(dict.fromkeys(ids, pid))
                time.sleep(0.1)
        print(f"both workers served version {new} {time.monotonic() - pushed:.2f}s after one POST /reload")

        workers = children(served.process.pid)
        os.kill(served.process.pid, signal.SIGTERM)  # the parent only: it must stop its workers itself
        stopping = time.monotonic()
        served.process.wait(timeout=20)
        print(f"parent and workers stopped {time.monotonic() - stopping:.2f}s after SIGTERM")
        assert served.process.returncode == 0, served.log.read_text()[-3000:]
        # orphans (multiprocessing's resource tracker sees its pipe close) may take a moment more
        deadline = time.monotonic() + 10
        while [pid for pid in workers if alive(pid)] and time.monotonic() < deadline:
            time.sleep(0.2)
        left = {pid: command_line(pid) for pid in workers if alive(pid)}
        assert not left, left

    folder = tmp_path / "var" / "landing" / "impressions"
    files = sorted(folder.glob("*.jsonl"))
    writers = {path.name.split("-")[2] for path in files}  # impressions-<ns>-<pid>-<n>.jsonl
    assert writers == pids
    written = {json.loads(line)["request_id"]: path.name.split("-")[2]
               for path in files for line in path.read_text().splitlines()}
    assert written == answered  # every answered request, in the file of the worker that answered it
    assert not list(folder.glob(".*.tmp"))
