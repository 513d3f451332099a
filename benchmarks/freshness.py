"""How fast fresh feedback changes recommendations.

1. Retrain path: with a real ``dagster-daemon`` running the landing-zone sensor, drop a
   feedback batch into the landing zone and measure the seconds until a new model version is
   loadable from ``models:/NAME@champion`` (median over several batches), and until the
   first HTTP answer of a running ``recsys serve`` comes from it (``retrain_to_served_s``):
   the promotion step tells the server (``RECSYS_SERVE_URLS``, ``POST /reload``), whose own
   poll is set to 60 s so that only the push can make it fast. A client asks every 0.1 s and
   reads the answer's ``x-recsys-model-version`` header.
2. In-request path: time from an event to a recommendation list that reflects it, when the
   user's recent items come with the request (no retrain).
3. Micro-batch vs full retrain on the same data: the training step's wall-time ratio, and the
   NDCG@10 of the last micro-batch champion candidate and of a full retrain on the same
   held-out users (ratio, and the paired per-user difference with its standard error: the
   ratio alone moves by several percent between runs, the paired difference says whether a
   gap is real).

Runs on the embedded simulator in a fresh temp home (nothing of yours is touched):

    .venv/bin/python benchmarks/freshness.py [--batches 3] [--sensor-interval 5]

Ends with one JSON line: {"retrain_to_champion_s_median", "retrain_to_served_s_median", "in_request_ms",
"microbatch_over_full_time", "microbatch_ndcg_ratio", ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--sensor-interval", type=int, default=5, help="seconds between sensor ticks")
    parser.add_argument("--timeout", type=float, default=180, help="give up on one batch after this many seconds")
    parser.add_argument("--keep", action="store_true", help="keep the temp home for inspection")
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="recsys-freshness-"))
    os.environ.update({"RECSYS_HOME": str(home), "RECSYS_SENSOR_INTERVAL_S": str(args.sensor_interval)})
    for name in ("DAGSTER_HOME", "MLFLOW_TRACKING_URI", "RECSYS_LANDING_ZONE", "RECSYS_LAKE", "RECSYS_MLFLOW_ARTIFACTS"):
        os.environ.pop(name, None)
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")

    import dagster as dg
    import numpy as np
    import pandas as pd

    import mlflow
    from rec_models.simulator import FeedbackSimulator
    from rec_pipelines.cli import stop_processes
    from rec_pipelines.definitions import defs as load_defs
    from rec_pipelines.registry import CHAMPION, ModelRegistry
    from rec_pipelines.settings import prepare_environment

    settings = prepare_environment()
    simulator = FeedbackSimulator()
    registry = ModelRegistry(settings.mlflow_tracking_uri, settings.mlflow_artifact_root, settings.model_name)
    defs = load_defs()
    quiet = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
    full_config = {**quiet, "ops": {"candidate_model": {"config": {"mode": "full"}}}}

    print(f"home: {home}")
    simulator.write_batch(settings.landing_zone, 0)
    with dg.DagsterInstance.get() as instance:
        started = time.perf_counter()
        defs.resolve_job_def("full_retrain_job").execute_in_process(instance=instance, run_config=full_config)
        print(f"initial full retrain: {time.perf_counter() - started:.1f}s, champion v{registry.version_by_alias(CHAMPION).version}")

    # -- 1. retrain path, through the real daemon, to a running server ----------------------
    import socket
    import threading
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "rec_pipelines.cli", "serve", "--port", str(port),
                               "--reload-interval", "60"], stdout=open(home / "serve.log", "w"),
                              stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    os.environ["RECSYS_SERVE_URLS"] = url  # the daemon's runs tell the server of a new champion
    answers: list[tuple[float, str]] = []  # (perf_counter, model version of the answer)
    stop_probe = threading.Event()
    probe_errors: list[str] = []
    probe_body = json.dumps({"dataframe_records": [{"user_id": "u00001", "k": 10}]}).encode()

    def probe() -> None:
        while not stop_probe.is_set():
            try:
                request = urllib.request.Request(f"{url}/invocations", data=probe_body,
                                                 headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=5) as answer:
                    answer.read()
                    answers.append((time.perf_counter(), answer.headers.get("x-recsys-model-version", "")))
            except Exception as error:  # noqa: BLE001 - keep probing whatever one request met
                probe_errors.append(f"{type(error).__name__}: {error}")
            time.sleep(0.1)

    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2):
                break
        except OSError:
            assert server.poll() is None and time.monotonic() < deadline, (home / "serve.log").read_text()[-2000:]
            time.sleep(0.5)
    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    served_latencies = []
    bin_dir = Path(sys.executable).parent
    daemon = subprocess.Popen(
        [str(bin_dir / "dagster-daemon"), "run", "-m", "rec_pipelines.definitions"],
        stdout=open(home / "daemon.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    latencies, outcomes = [], []
    try:
        time.sleep(8)  # let the daemon load the code location before the first drop
        for batch in range(1, args.batches + 1):
            versions_before = {v.version for v in registry.client.search_model_versions(f"name = '{settings.model_name}'")}
            dropped = time.perf_counter()
            simulator.write_batch(settings.landing_zone, batch)
            outcome = None
            while time.perf_counter() - dropped < args.timeout:
                new = [v for v in registry.client.search_model_versions(f"name = '{settings.model_name}'")
                       if v.version not in versions_before and "promotion.decision" in v.tags]
                # The gate tags its decision, then moves the alias: wait for both.
                if new and new[0].tags["promotion.decision"] == "rejected":
                    outcome = "rejected"
                    break
                if new and registry.version_by_alias(CHAMPION).version == new[0].version:
                    mlflow.pyfunc.load_model(f"models:/{settings.model_name}@champion")  # loadable
                    outcome = "promoted"
                    break
                time.sleep(0.5)
            elapsed = time.perf_counter() - dropped
            outcomes.append(outcome or "timeout")
            reason = new[0].tags.get("promotion.reason", "") if outcome else ""
            served = ""
            if outcome == "promoted":
                latencies.append(elapsed)
                while time.perf_counter() - dropped < args.timeout:  # the first answer from the new version
                    first = next((t for t, v in list(answers) if t > dropped and str(new[0].version) in v.split(",")), None)
                    if first is not None:
                        served_latencies.append(first - dropped)
                        served = f", served over HTTP after {first - dropped:.1f}s"
                        break
                    time.sleep(0.1)
            print(f"batch {batch}: {outcome or 'timeout'} after {elapsed:.1f}s{served} ({reason})")
            time.sleep(1)
    finally:
        stop_probe.set()
        stop_processes((daemon, server), grace_s=20)

    # -- 2. in-request path --------------------------------------------------------------
    import torch

    from rec_pipelines.lake import FeedbackStore

    torch.set_num_threads(1)  # as `recsys serve` runs the model
    model = mlflow.pyfunc.load_model(f"models:/{settings.model_name}@champion")
    events = FeedbackStore(settings.landing_zone, settings.lake).read("events")
    user = events["user_id"].iloc[-1]
    base = model.predict(pd.DataFrame({"user_id": [user], "k": [11]}))["item_id"].tolist()
    fresh_item = base[0]  # the user just consumed their top recommendation
    timings, changed = [], 0
    for _ in range(50):
        event_time = time.perf_counter()
        recs = model.predict(pd.DataFrame({"user_id": [user], "recent_item_ids": [[fresh_item]], "k": [10]}))
        timings.append((time.perf_counter() - event_time) * 1000)
        # Reflected: the consumed item is gone AND the rest is re-ranked, i.e. the list is not
        # just the old one with that item struck out (the model read the new event).
        changed += fresh_item not in set(recs["item_id"]) and recs["item_id"].tolist() != base[1:]
    in_request_ms = statistics.median(timings)
    print(f"in-request: median {in_request_ms:.1f} ms; the list reflected the event in {changed}/50 requests")

    # -- 3. micro-batch vs full retrain on the same data ------------------------------------
    def step_seconds(run_id: str, step: str, instance) -> float:
        stats = {s.step_key: s for s in instance.get_run_step_stats(run_id)}
        return stats[step].end_time - stats[step].start_time

    from rec_models.evaluation import paired_difference
    from rec_models.models import HybridRecommender
    from rec_pipelines.training import evaluate_model, text_matrix

    with dg.DagsterInstance.get() as instance:
        micro_record = next(r for r in instance.get_run_records(dg.RunsFilter(job_name="microbatch_retrain_job"))
                            if r.dagster_run.status == dg.DagsterRunStatus.SUCCESS)
        micro_id = micro_record.dagster_run.run_id
        micro_train = step_seconds(micro_id, "candidate_model", instance)
        micro_run = micro_record.end_time - micro_record.start_time
        micro_mlflow_run = registry.client.search_runs([registry.experiment_id()], f"tags.`dagster.run_id` = '{micro_id}'")[0]
        # The full retrain reads the same data the last micro-batch run trained on (nothing new landed).
        full = defs.resolve_job_def("full_retrain_job").execute_in_process(instance=instance, run_config=full_config)
        full_train = step_seconds(full.run_id, "candidate_model", instance)
        full_record = instance.get_run_record_by_id(full.run_id)
        full_run = full_record.end_time - full_record.start_time
        data = full.output_for_node("training_data").load()
        text = text_matrix(data.vocab, full.output_for_node("item_text_embeddings").load())
    # Both models on the same held-out users, paired per user.
    split = data.split
    histories, targets = split.test_histories(), split.test_targets
    cold = np.zeros(len(targets), dtype=bool)
    micro_model = HybridRecommender.load(settings.lake / "models" / micro_mlflow_run.info.run_id / "bundle")
    micro_model.grow(text)
    full_model = HybridRecommender.load(full.output_for_node("candidate_model").bundle_dir)
    micro_metrics = evaluate_model(micro_model, histories, targets, cold)
    full_metrics = evaluate_model(full_model, histories, targets, cold)
    micro_ndcg, full_ndcg = micro_metrics["ndcg@10"], full_metrics["ndcg@10"]
    paired = paired_difference(micro_metrics["per_user_ndcg@10"], full_metrics["per_user_ndcg@10"])
    print(f"micro-batch: train {micro_train:.1f}s (run {micro_run:.1f}s), NDCG@10 {micro_ndcg:.4f}")
    print(f"full:        train {full_train:.1f}s (run {full_run:.1f}s), NDCG@10 {full_ndcg:.4f}")
    print(f"micro - full, paired over {paired['users']} users: {paired['diff']:+.4f} ± {paired['se']:.4f} (s.e.)")

    result = {
        "retrain_to_champion_s_median": statistics.median(latencies) if latencies else None,
        "retrain_to_champion_s": [round(x, 1) for x in latencies],
        "retrain_to_served_s_median": statistics.median(served_latencies) if served_latencies else None,
        "retrain_to_served_s": [round(x, 1) for x in served_latencies],
        "probe_answers": len(answers), "probe_errors": len(probe_errors), "probe_error_examples": probe_errors[:3],
        "batch_outcomes": outcomes,
        "sensor_interval_s": args.sensor_interval,
        "in_request_ms": round(in_request_ms, 2),
        "in_request_reflected": changed / 50,
        "microbatch_over_full_time": round(micro_train / full_train, 3),
        "microbatch_over_full_run_time": round(micro_run / full_run, 3),
        "microbatch_ndcg_ratio": round(micro_ndcg / full_ndcg, 3),
        "microbatch_minus_full_ndcg": round(paired["diff"], 5),
        "microbatch_minus_full_ndcg_se": round(paired["se"], 5),
        "eval_users": paired["users"],
    }
    if not args.keep:
        shutil.rmtree(home, ignore_errors=True)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
