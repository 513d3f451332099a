"""Serving latency of the champion pyfunc over the ml-latest-small catalog (9.7k items).

    .venv/bin/python benchmarks/serving.py [--epochs 1] [--encode-text] [--requests 1000]
                          [--http-requests 10000] [--clients 20] [--http-time-cap 60] [--workers 1,2]

1. Builds a real bundle: ml-latest-small events and catalog (``rec_models.data.movielens``), a SASRec
   trained for ``--epochs`` epochs (latency does not depend on accuracy), and item text
   vectors: random unit vectors of the encoder's width (384) by default, or the real
   all-MiniLM-L6-v2 encoding of "title | genres | tags" with ``--encode-text`` (minutes on 2
   cores). Logs it with ``ModelRegistry.log_recommender`` into a temp MLflow store and makes it
   ``champion``.
2. In-process: single-request latency of ``mlflow.pyfunc.load_model(...).predict`` (MLflow's
   schema enforcement included) and of the bare ``Recommender.recommend``. Each request is a
   known user with 3 just-seen items and k=10, i.e. the real-time path with a full history.
3. HTTP: starts ``recsys serve --port PORT`` (the batching server) on a free loopback port and
   sends ``--http-requests`` of those requests from ``--clients`` concurrent keep-alive
   clients (closed loop), stopping early at ``--http-time-cap`` seconds; ``--workers 1,2``: once
   per count of server processes, one after the other (steps 4 and 5 use the first count).
4. Under attack: the same clients, but ``--hostile-share`` (default 10 %) of the requests are
   hostile (lone surrogates, 30,000-deep JSON, k = 10^400, non-string columns, oversized
   bodies, rows and answers, 100 KB ids), while ``--stalled`` more connections send half a
   request line and stop. Reports the good requests' error rate (target 0) and p99, what the
   hostile ones got (4xx only), and the server's peak resident memory (``VmHWM``).
5. The same HTTP load against ``recsys serve --engine mlflow`` (MLflow's scoring server, one
   request at a time through pandas) on the same model, for comparison (``--skip-mlflow``
   leaves it out).

Ends with one JSON line: inprocess_p50/p99_ms (pyfunc), recommender_p50/p99_ms (bare),
http_p50/p99_ms, http_rps (``recsys serve``), mean_batch_rows (request rows per forward pass
under that load), hostile_good_error_rate, hostile_good_p99_ms, hostile_statuses,
server_peak_rss_mb (all processes), mlflow_http_p50/p99_ms, mlflow_http_rps, and per worker
count throughput_rps_by_workers and http_p99_ms_by_workers (step 3's other keys: the first count).
Targets: in-process p99 <= 10 ms, HTTP p99 <= 50 ms. Clients and server share the machine;
with C closed-loop clients the median latency is about C / throughput (Little's law).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import mlflow

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rec_models.data import ItemVocab, leave_last_out  # noqa: E402
from rec_models.data.movielens import MOVIELENS_TEMPLATE, load_movielens  # noqa: E402
from rec_models.evaluation import protocol_sequences  # noqa: E402
from rec_models.models import RecommenderConfig, event_features, train_recommender  # noqa: E402
from rec_models.serving import example_request, write_bundle  # noqa: E402
from rec_pipelines.cli import stop_processes  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "ml-latest-small"
MODEL_NAME = "serving-bench"
TEXT_DIM = 384  # all-MiniLM-L6-v2's width


def percentiles(latencies_s: list[float]) -> tuple[float, float]:
    ms = np.asarray(latencies_s) * 1000
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def text_vectors(catalog: pd.DataFrame, vocab: ItemVocab, encode: bool) -> torch.Tensor:
    """[n_items + 1, dim] unit vectors in vocab order (row 0 = padding)."""
    if encode:
        from rec_models.text import TextEncoder, as_matrix, embed_catalog

        frame, stats = embed_catalog(catalog, TextEncoder(), template=MOVIELENS_TEMPLATE)
        print(f"encoded {stats['encoded']} item texts in {stats['seconds']:.0f}s", flush=True)
        by_id = dict(zip(frame["item_id"], as_matrix(frame)))
        matrix = np.zeros((len(vocab) + 1, stats["dim"]), dtype=np.float32)
        for row, item_id in enumerate(vocab.ids, start=1):
            if item_id in by_id:
                matrix[row] = by_id[item_id]
        return torch.from_numpy(matrix)
    vectors = torch.nn.functional.normalize(torch.randn(len(vocab) + 1, TEXT_DIM, generator=torch.Generator().manual_seed(0)), dim=1)
    vectors[0] = 0
    return vectors


def build_champion(root: Path, args: argparse.Namespace) -> tuple[list[pd.DataFrame], str]:
    """Train, bundle, log and promote a model; returns single-row requests and the tracking URI."""
    from rec_pipelines.registry import ModelRegistry, decide_promotion

    data = load_movielens(DATA)
    vocab = ItemVocab(data.catalog["item_id"])
    sequences = protocol_sequences(data.events, vocab, event_features)
    split = leave_last_out(sequences)
    text = text_vectors(data.catalog, vocab, args.encode_text)
    # The served model's default configuration; fewer epochs only (latency does not depend on them).
    config = RecommenderConfig(max_epochs=args.epochs, patience=args.epochs)
    started = time.perf_counter()
    model, _ = train_recommender(split, text, config)
    print(f"trained the recommender ({len(vocab)} items, {len(sequences)} users) in {time.perf_counter() - started:.0f}s",
          flush=True)
    histories = dict(zip(sequences.user_ids, zip(sequences.items, sequences.event_types)))
    bundle = write_bundle(root / "bundle", model, vocab, data.catalog.set_index("item_id")["title"], histories)

    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    registry = ModelRegistry(tracking_uri, root / "artifacts", MODEL_NAME)
    with registry.start_run("serving-benchmark") as run:
        info = registry.log_recommender(bundle, example_request(sequences.user_ids[:2], vocab.ids[:2]))
    version = registry.register(info.model_uri, run.info.run_id, tags={})
    registry.apply_decision(version.version, decide_promotion({"ndcg@10": 0.0}, None))

    rng = np.random.default_rng(0)
    requests = []
    for _ in range(max(args.requests, 200)):
        user = int(rng.integers(len(sequences)))
        recent = rng.choice(len(vocab), size=3, replace=False) + 1
        requests.append(pd.DataFrame({"user_id": [sequences.user_ids[user]],
                                      "recent_item_ids": [[vocab.ids[i - 1] for i in recent]], "k": [10]}))
    return requests, tracking_uri


def time_calls(functions: list, requests: list[pd.DataFrame], n: int) -> list[list[float]]:
    """Seconds per call of each function, one request at a time; the functions take turns on
    each request, so a burst of load from elsewhere hits them alike."""
    for request in requests[:20]:  # warm-up
        for fn in functions:
            fn(request)
    latencies: list[list[float]] = [[] for _ in functions]
    for request in requests[:n]:
        for fn, mine in zip(functions, latencies):
            started = time.perf_counter()
            fn(request)
            mine.append(time.perf_counter() - started)
    return latencies


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(root: Path, tracking_uri: str, port: int, engine: str, workers: int = 1) -> subprocess.Popen:
    """``recsys serve --port PORT --engine ENGINE --workers N`` for the benchmark's champion."""
    env = {**os.environ, "RECSYS_HOME": str(root), "MLFLOW_TRACKING_URI": tracking_uri, "RECSYS_MODEL_NAME": MODEL_NAME,
           "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "rec_pipelines.cli", "serve", "--port", str(port), "--engine", engine,
                             "--workers", str(workers)],
                            cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def wait_until_up(server: subprocess.Popen, port: int, timeout_s: float, workers: int = 1) -> float:
    """Seconds until the server answers (``workers`` > 1: until each worker answered GET /model)."""
    started, pids = time.monotonic(), set()
    while time.monotonic() - started < timeout_s:
        if server.poll() is not None:
            raise RuntimeError(f"server exited: {server.stderr.read().decode()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/{'model' if workers > 1 else 'ping'}", timeout=2) as r:
                pids.add(json.loads(r.read())["worker_pid"] if workers > 1 else 0)
            if len(pids) >= workers:
                return time.monotonic() - started
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"server not up after {timeout_s}s")


def http_load(port: int, bodies: list[bytes], clients: int, n: int, time_cap_s: float,
              good: list[bool] | None = None) -> tuple[list[float], int, float, dict]:
    """Closed loop: ``clients`` threads with keep-alive connections send ``n`` requests in
    total (or stop at ``time_cap_s``). Returns the latencies and the error count (non-200 or
    no answer) of the good requests (all, unless ``good`` marks some bodies hostile), wall
    seconds, and the statuses the hostile ones got."""
    good = good or [True] * len(bodies)
    counter = iter(range(n))
    lock = threading.Lock()
    latencies: list[float] = []
    errors = [0]
    hostile: dict[str, int] = {}
    deadline = time.monotonic() + time_cap_s

    def client() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        mine, bad, statuses = [], 0, []
        while time.monotonic() < deadline:
            with lock:
                i = next(counter, None)
            if i is None:
                break
            body, is_good = bodies[i % len(bodies)], good[i % len(bodies)]
            started = time.perf_counter()
            try:
                connection.request("POST", "/invocations", body, {"Content-Type": "application/json"})
                response = connection.getresponse()
                response.read()
                status = response.status
                if response.getheader("connection", "").lower() == "close":
                    connection.close()  # reconnects on the next request
            except (OSError, http.client.HTTPException) as error:
                status = type(error).__name__
                connection.close()
            if is_good:
                mine.append(time.perf_counter() - started)
                bad += status != 200
            else:
                statuses.append(str(status))
        connection.close()
        with lock:
            latencies.extend(mine)
            errors[0] += bad
            for status in statuses:
                hostile[status] = hostile.get(status, 0) + 1

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, errors[0], time.perf_counter() - started, hostile


def hostile_bodies(good: list[bytes]) -> list[bytes]:
    """Requests an adversary sends: each must get a 4xx and leave the good ones alone."""
    deep = "[" * 30_000 + "]" * 30_000
    return [
        json.dumps({"dataframe_records": [{"user_id": "\ud800", "k": 10}]}).encode(),
        deep.encode(),
        ('{"dataframe_records": [{"user_id": "u1", "recent_item_ids": ' + deep + "}]}").encode(),
        ('{"dataframe_records": [{"user_id": "u1", "k": 1' + "0" * 400 + "}]}").encode(),
        json.dumps({"dataframe_split": {"columns": [1, None], "data": [["u1", 3]]}}).encode(),
        json.dumps({"dataframe_records": [{"user_id": f"u{i}", "k": 1000} for i in range(1000)]}).encode(),
        json.dumps({"dataframe_records": [{"user_id": "x" * 100_000, "k": 1000}]}).encode(),
        b'{"dataframe_records": [' + b'{"user_id": "u1"},' * 20_000 + b'{"user_id": "u1"}]}',
        good[0][:-5],  # truncated JSON
    ]


def stall(port: int, until: float, opened: list) -> None:
    """A slow-loris client: half a request line, then silence; reconnect when cut off."""
    while time.monotonic() < until:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
                sock.sendall(b"POST /invocations HTTP/1.1\r\nContent-")
                opened.append(1)
                sock.settimeout(max(0.1, until - time.monotonic()))
                sock.recv(1)  # returns when the server closes the connection
        except OSError:
            time.sleep(0.1)


def peak_rss_mb(pid: int) -> float:
    """Peak resident memory of ``pid`` plus its child processes' (the workers of --workers N)."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    pids = [pid, *map(int, children.read_text().split() if children.exists() else [])]
    status = "".join(Path(f"/proc/{one}/status").read_text() for one in pids if Path(f"/proc/{one}").exists())
    return sum(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")) / 1024


def serve_and_attack(root: Path, tracking_uri: str, bodies: list[bytes], args: argparse.Namespace) -> dict:
    """``recsys serve`` under a mix of good and hostile requests plus stalled connections."""
    port = free_port()
    server = start_server(root, tracking_uri, port, "recsys", args.worker_counts[0])
    try:
        wait_until_up(server, port, 180, args.worker_counts[0])
        http_load(port, bodies, args.clients, 100, 30)  # warm-up
        rss_before = peak_rss_mb(server.pid)
        attacks = hostile_bodies(bodies)
        every = max(1, round((1 - args.hostile_share) / args.hostile_share))  # good requests per hostile one
        mixed, good, a = [], [], 0
        for i, body in enumerate(bodies):
            mixed.append(body)
            good.append(True)
            if i % every == every - 1:
                mixed.append(attacks[a % len(attacks)])
                good.append(False)
                a += 1
        opened: list = []
        until = time.monotonic() + args.http_time_cap + 30
        stalled = [threading.Thread(target=stall, args=(port, until, opened), daemon=True) for _ in range(args.stalled)]
        for thread in stalled:
            thread.start()
        latencies, errors, wall, hostile = http_load(port, mixed, args.clients, args.http_requests, args.http_time_cap,
                                                     good)
        peak = peak_rss_mb(server.pid)
        alive = server.poll() is None
    finally:
        stop_processes([server])
    p50, p99 = percentiles(latencies)
    result = {"hostile_share": round(sum(hostile.values()) / (sum(hostile.values()) + len(latencies)), 3),
              "hostile_good_requests": len(latencies), "hostile_good_errors": errors,
              "hostile_good_error_rate": errors / max(1, len(latencies)), "hostile_good_p50_ms": round(p50, 2),
              "hostile_good_p99_ms": round(p99, 2), "hostile_statuses": hostile, "stalled_connections": len(opened),
              "server_rss_mb_before": round(rss_before), "server_peak_rss_mb": round(peak), "server_alive": alive}
    print(f"  under attack ({result['hostile_share']:.0%} hostile, {len(opened)} stalled connections): good requests "
          f"p50 {p50:.1f} ms  p99 {p99:.1f} ms, {errors} of {len(latencies)} failed; hostile got {hostile}; "
          f"server peak RSS {peak:.0f} MB (was {rss_before:.0f} MB)", flush=True)
    return result


def serve_and_load(root: Path, tracking_uri: str, engine: str, bodies: list[bytes], args: argparse.Namespace,
                   workers: int = 1) -> tuple[float, float, float, int, float | None]:
    """Serve the champion with ``engine`` (``workers`` processes), run the HTTP load against it,
    stop it: (p50 ms, p99 ms, requests/s, requests sent, mean request rows per forward pass or
    None; only known for one worker, as ``GET /model`` counts one worker's batches)."""
    port = free_port()
    server = start_server(root, tracking_uri, port, engine, workers)
    stats = engine == "recsys" and workers == 1  # GET /model: batches and rows answered so far (of one worker)
    try:
        up = wait_until_up(server, port, 180, workers if engine == "recsys" else 1)
        print(f"recsys serve --engine {engine} --workers {workers}: up in {up:.0f}s", flush=True)
        http_load(port, bodies, args.clients, 100 * workers, 30)  # warm-up
        before = model_stats(port) if stats else None
        latencies, errors, wall, _ = http_load(port, bodies, args.clients, args.http_requests, args.http_time_cap)
        after = model_stats(port) if stats else None
    finally:
        stop_processes([server])
    p50, p99 = percentiles(latencies)
    rps = len(latencies) / wall
    batch_rows = None
    if before and after and after["batches"] > before["batches"]:
        batch_rows = (after["rows"] - before["rows"]) / (after["batches"] - before["batches"])
    print(f"  HTTP ({args.clients} clients)  p50 {p50:.1f} ms  p99 {p99:.1f} ms  {rps:.0f} req/s  "
          f"({len(latencies)} requests in {wall:.1f}s, {errors} non-200"
          + (f", {batch_rows:.1f} rows per forward pass" if batch_rows else "") + ")", flush=True)
    if errors:
        raise RuntimeError(f"{errors} requests failed")
    return p50, p99, rps, len(latencies), batch_rows


def model_stats(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/model", timeout=5) as response:
        return json.loads(response.read())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--encode-text", action="store_true", help="real text embeddings instead of random vectors")
    parser.add_argument("--requests", type=int, default=1000, help="in-process requests timed")
    parser.add_argument("--http-requests", type=int, default=10000)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--http-time-cap", type=float, default=60.0, help="seconds")
    parser.add_argument("--skip-mlflow", action="store_true", help="do not measure MLflow's scoring server")
    parser.add_argument("--hostile-share", type=float, default=0.1, help="share of hostile requests in step 4; 0 skips it")
    parser.add_argument("--stalled", type=int, default=20, help="slow-loris connections during step 4")
    parser.add_argument("--workers", default="1", help="server processes, or several counts to compare: 1,2")
    args = parser.parse_args()
    args.worker_counts = [int(n) for n in args.workers.split(",")]
    if not DATA.exists():
        print(f"skipped: {DATA} not found")
        return 0
    torch.set_num_threads(1)  # as `recsys serve` runs the server (--threads 1)
    with tempfile.TemporaryDirectory(prefix="serving-bench-") as tmp:
        root = Path(tmp)
        requests, tracking_uri = build_champion(root, args)

        mlflow.set_tracking_uri(tracking_uri)
        model = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@champion")
        recommender = model.unwrap_python_model().recommender
        pyfunc_latencies, bare_latencies = time_calls([model.predict, recommender.recommend], requests, args.requests)
        pyfunc_p50, pyfunc_p99 = percentiles(pyfunc_latencies)
        bare_p50, bare_p99 = percentiles(bare_latencies)
        print(f"in-process pyfunc.predict  p50 {pyfunc_p50:.2f} ms  p99 {pyfunc_p99:.2f} ms  ({args.requests} single requests)")
        print(f"in-process Recommender     p50 {bare_p50:.2f} ms  p99 {bare_p99:.2f} ms")

        bodies = [json.dumps({"dataframe_records": r.to_dict("records")}).encode() for r in requests]
        by_workers = {n: serve_and_load(root, tracking_uri, "recsys", bodies, args, n) for n in args.worker_counts}
        http_p50, http_p99, rps, sent, batch_rows = by_workers[args.worker_counts[0]]
        attack = serve_and_attack(root, tracking_uri, bodies, args) if args.hostile_share > 0 else {}
        mlflow_figures = {}
        if not args.skip_mlflow:
            m_p50, m_p99, m_rps, _, _ = serve_and_load(root, tracking_uri, "mlflow", bodies, args, args.worker_counts[0])
            mlflow_figures = {"mlflow_http_p50_ms": round(m_p50, 2), "mlflow_http_p99_ms": round(m_p99, 2),
                              "mlflow_http_rps": round(m_rps, 1)}
    print(json.dumps({
        "inprocess_p50_ms": round(pyfunc_p50, 3), "inprocess_p99_ms": round(pyfunc_p99, 3),
        "recommender_p50_ms": round(bare_p50, 3), "recommender_p99_ms": round(bare_p99, 3),
        "http_p50_ms": round(http_p50, 2), "http_p99_ms": round(http_p99, 2), "http_rps": round(rps, 1),
        "mean_batch_rows": round(batch_rows, 2) if batch_rows else None, **attack, **mlflow_figures,
        "throughput_rps_by_workers": {str(n): round(r[2], 1) for n, r in by_workers.items()},
        "http_p99_ms_by_workers": {str(n): round(r[1], 2) for n, r in by_workers.items()},
        "clients": args.clients, "http_requests": sent, "workers": args.worker_counts,
        "text_vectors": "all-MiniLM-L6-v2" if args.encode_text else "random", "epochs": args.epochs,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
