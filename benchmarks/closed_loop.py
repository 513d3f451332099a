"""The measured payoff of the real-time loop: simulated users, four recommenders side by side.

    .venv/bin/python benchmarks/closed_loop.py [--seed 0] [--drift 1.0] [--rounds 6]
                                               [--users-per-round 200] [--plot FILE]

In a fresh temp home, the simulator's batch 0 (``--users`` users, ``--items`` items) is
ingested and the pipeline's full retrain makes champion v1. Then, each round (one simulated
day), the same active users, with the same organic browsing and the same random draws
(``rec_models.simulator.online``), are shown a list by each arm and react to it by their
hidden, drifting tastes:

* ``popularity``: the most popular items of batch 0 (minus what the user just saw);
* ``static``: champion v1, never updated, without the user's latest items;
* ``in_request``: champion v1 with the round's organic items sent as ``recent_item_ids``;
* ``loop``: the full loop: a real ``recsys serve`` answering over HTTP with the recent items,
  its impressions and the users' feedback (organic + reactions) landing in the landing zone,
  the real ``dagster-daemon`` sensor starting a micro-batch retrain, the gate promoting, and
  the server told of the new champion (push, with polling as fallback) before the next round.

Only the loop's reactions reach the landing zone (it is the deployed system); the other arms
are counterfactual lists shown to the same users in the same situation. CTR = share of lists
with at least one click. Prints CTR per arm per round with Wilson 95 % intervals, the loop's
lift over ``static`` with a paired standard error (same users, same draws), writes a plot, and
ends with one JSON line: {"ctr", "ctr_ci95", "lift_loop_over_static", "lift_se", "rounds",
"seed", "drift", ...}. The environment's settings (attention 0.8 per rank, P(click | looked) =
0.5 * liking^4, one day per round, drift rate 1/60 per day times ``--drift``) were fixed before
any result was seen. One rule was added after the first results, as a bug fix of the
environment, not a tuning: users do not click items they consumed before (docs/simulator.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
ARMS = ("popularity", "static", "in_request", "loop")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0, help="simulator and environment seed")
    parser.add_argument("--drift", type=float, default=1.0, help="multiplies the users' drift rate")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--users", type=int, default=400)
    parser.add_argument("--items", type=int, default=600)
    parser.add_argument("--users-per-round", type=int, default=200)
    parser.add_argument("--sensor-interval", type=int, default=2)
    parser.add_argument("--round-timeout", type=float, default=240, help="seconds to wait for a round's retrain")
    parser.add_argument("--plot", type=Path, default=None, help="PNG to write (default: var/benchmarks/...)")
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="recsys-closed-loop-"))
    for name in list(os.environ):
        if name.startswith(("RECSYS_", "DAGSTER_", "MLFLOW_")):
            del os.environ[name]
    os.environ.update({"RECSYS_HOME": str(home), "RECSYS_SENSOR_INTERVAL_S": str(args.sensor_interval)})
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    sys.path.insert(0, str(REPO))

    import dagster as dg
    import torch

    from rec_models.serving import Recommender, parse_rows
    from rec_models.simulator import FeedbackSimulator, SimulatorConfig
    from rec_models.simulator.online import OnlineConfig, OnlineEnvironment
    from rec_pipelines.cli import stop_processes
    from rec_pipelines.cli.simulate import http_recommender, write_round
    from rec_pipelines.definitions import defs as load_defs
    from rec_pipelines.lake import load_pseudonym_key
    from rec_pipelines.online import wilson
    from rec_pipelines.registry import CHAMPION, ModelRegistry
    from rec_pipelines.settings import prepare_environment

    torch.set_num_threads(1)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    os.environ["RECSYS_SERVE_URLS"] = url
    settings = prepare_environment()
    simulator = FeedbackSimulator(SimulatorConfig(n_items=args.items, n_users=args.users, seed=args.seed))
    env = OnlineEnvironment(simulator, OnlineConfig(users_per_round=args.users_per_round, drift=args.drift,
                                                    seed=args.seed))
    registry = ModelRegistry(settings.mlflow_tracking_uri, settings.mlflow_artifact_root, settings.model_name)
    simulator.write_batch(settings.landing_zone, 0)
    started = time.perf_counter()
    quiet = {"loggers": {"console": {"config": {"log_level": "WARNING"}}},
             "ops": {"candidate_model": {"config": {"mode": "full"}}}}
    with dg.DagsterInstance.get() as instance:
        load_defs().resolve_job_def("full_retrain_job").execute_in_process(instance=instance, run_config=quiet)
    print(f"home {home}; initial full retrain {time.perf_counter() - started:.0f}s, "
          f"champion v{registry.version_by_alias(CHAMPION).version}", flush=True)

    static = Recommender(registry.download_bundle(CHAMPION, home / "static-bundle"), load_pseudonym_key(settings.lake))
    popular = simulator.events(0)["item_id"].value_counts().index.tolist()

    def in_process(recent_too: bool):
        def recommend(users, recent, k):
            rows = [{"user_id": u, "k": k, **({"recent_item_ids": r} if recent_too else {})} for u, r in zip(users, recent)]
            columns, counts = static.answer(parse_rows(rows))
            lists, start = [], 0
            for n in counts:
                lists.append(columns["item_id"][start : start + n])
                start += n
            return lists, [None] * len(users)
        return recommend

    def popularity(users, recent, k):
        return [[i for i in popular if i not in set(r)][:k] for r in recent], [None] * len(users)

    recommenders = {"popularity": popularity, "static": in_process(False), "in_request": in_process(True),
                    "loop": http_recommender(url)}
    bin_dir = Path(sys.executable).parent
    server = subprocess.Popen([sys.executable, "-m", "rec_pipelines.cli", "serve", "--port", str(port),
                               "--reload-interval", "30"], stdout=open(home / "serve.log", "w"),
                              stderr=subprocess.STDOUT, start_new_session=True)
    daemon = subprocess.Popen([str(bin_dir / "dagster-daemon"), "run", "-m", "rec_pipelines.definitions"],
                              stdout=open(home / "daemon.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    clicked = {arm: [] for arm in ARMS}  # per round: bool per list
    promotions = []
    try:
        wait_until_up(url, server, home)
        for number in range(args.rounds):
            state = env.round(number)
            for arm in ARMS:
                reactions, hits = env.play(state, recommenders[arm], arm)
                clicked[arm].append(hits)
                if arm == "loop":  # the deployed system's users give their feedback to the loop
                    versions = {v.version for v in registry.client.search_model_versions(
                        f"name = '{settings.model_name}'")}
                    write_round(settings.landing_zone, f"online-r{number:04d}", state.organic, reactions)
            line = "  ".join(f"{arm} {np.mean(clicked[arm][-1]):.3f}" for arm in ARMS)
            outcome = wait_for_retrain(registry, settings.model_name, versions, url, args.round_timeout)
            promotions.append(outcome)
            print(f"round {number}: CTR {line}; retrain: {outcome}", flush=True)
    finally:
        stop_processes((daemon, server), grace_s=20)

    result = summarize(clicked, wilson)
    plot = args.plot or REPO / "var" / "benchmarks" / f"closed_loop-seed{args.seed}-drift{args.drift:g}.png"
    write_plot(clicked, wilson, plot)
    print(f"CTR over {args.rounds} rounds: " + ", ".join(
        f"{arm} {result['ctr'][arm]:.4f} [{result['ctr_ci95'][arm][0]:.4f}, {result['ctr_ci95'][arm][1]:.4f}]"
        for arm in ARMS))
    print(f"loop over static: {result['lift_loop_over_static']:+.1%} (paired difference "
          f"{result['diff_loop_minus_static']:+.4f} ± {result['diff_se']:.4f} s.e.); over in-request history: "
          f"{result['diff_loop_minus_in_request']:+.4f} ± {result['diff_in_request_se']:.4f}; plot {plot}")
    shutil.rmtree(home, ignore_errors=True)
    print(json.dumps({**result, "rounds": args.rounds, "seed": args.seed, "drift": args.drift,
                      "users_per_round": args.users_per_round, "users": args.users, "items": args.items,
                      "retrains": promotions, "plot": str(plot)}))
    return 0


def wait_until_up(url: str, server: subprocess.Popen, home: Path, timeout_s: float = 180) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2):
                return
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((home / "serve.log").read_text()[-3000:]) from None
            time.sleep(0.5)


def wait_for_retrain(registry, name: str, before: set, url: str, timeout_s: float) -> str:
    """Wait until the round's feedback made a new version and, when promoted, the server serves
    it; returns what happened."""
    import urllib.request

    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        new = [v for v in registry.client.search_model_versions(f"name = '{name}'")
               if v.version not in before and "promotion.decision" in v.tags]
        if new and new[0].tags["promotion.decision"] == "rejected":
            return f"v{new[0].version} rejected after {time.monotonic() - started:.0f}s"
        champion = registry.version_by_alias("champion")
        if new and champion is not None and champion.version == new[0].version:
            with urllib.request.urlopen(f"{url}/model", timeout=5) as answer:
                served = json.loads(answer.read())["version"]
            if served == str(new[0].version):
                return f"v{new[0].version} promoted and served after {time.monotonic() - started:.0f}s"
        time.sleep(0.5)
    return "timeout"


def summarize(clicked: dict[str, list[np.ndarray]], wilson) -> dict:
    ctr, ci = {}, {}
    for arm, rounds in clicked.items():
        hits = np.concatenate(rounds)
        lo, hi = wilson(np.array([hits.sum()]), np.array([len(hits)]))
        ctr[arm], ci[arm] = float(hits.mean()), [round(float(lo[0]), 4), round(float(hi[0]), 4)]
    loop, static = np.concatenate(clicked["loop"]).astype(float), np.concatenate(clicked["static"]).astype(float)
    diff = loop - static  # the same user, round and draws: paired
    over_request = loop - np.concatenate(clicked["in_request"]).astype(float)  # what retraining adds
    return {"ctr": {a: round(v, 4) for a, v in ctr.items()}, "ctr_ci95": ci,
            "ctr_per_round": {a: [round(float(np.mean(r)), 4) for r in rounds] for a, rounds in clicked.items()},
            "lift_loop_over_static": round(ctr["loop"] / ctr["static"] - 1, 4) if ctr["static"] else None,
            "lift_in_request_over_static": round(ctr["in_request"] / ctr["static"] - 1, 4) if ctr["static"] else None,
            "diff_loop_minus_static": round(float(diff.mean()), 5),
            "diff_se": round(float(diff.std(ddof=1) / np.sqrt(len(diff))), 5),
            "diff_loop_minus_in_request": round(float(over_request.mean()), 5),
            "diff_in_request_se": round(float(over_request.std(ddof=1) / np.sqrt(len(over_request))), 5),
            "lists_per_arm": int(len(diff))}


def write_plot(clicked: dict[str, list[np.ndarray]], wilson, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8))
    for offset, (arm, rounds) in enumerate(clicked.items()):
        hits = np.array([r.sum() for r in rounds])
        n = np.array([len(r) for r in rounds])
        lo, hi = wilson(hits, n)
        x = np.arange(len(rounds)) + (offset - 1.5) * 0.06
        ax.errorbar(x, hits / n, yerr=[hits / n - lo, hi - hits / n], marker="o", capsize=3, label=arm)
    ax.set_xlabel("round (simulated day)")
    ax.set_ylabel("CTR (lists with a click)")
    ax.set_title("Closed loop: CTR per arm, 95 % intervals")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)


if __name__ == "__main__":
    sys.exit(main())
