"""How often the promotion gate promotes candidates of known quality when held-out scoring stops
early, at a low NDCG@10 like the 10M-event world's (~0.006), where a few hundred users hold only
a handful of hits.

    .venv/bin/python benchmarks/gate_stopping.py [--trials 1500] [--hit-rate 0.012] [--seed 0]

Simulates per-user NDCG@10 of a champion (a hit for a share ``--hit-rate`` of 5,000 users, at a
uniform rank 1-10) and of candidates that keep each champion hit with some probability and hit
other users at some rate: ``equal`` (keeps 90 %, gains as many), ``better``, ``2/3``, ``half``
and ``third`` of the champion's NDCG. Each trial runs the real stop rule (``early_stop``, looks
every ``DEFAULT_STEP_USERS``) and the real gate (``decide_promotion`` with its defaults) on the
users scored, for each stopping policy: the pipeline's (SE target, clear decision, at least
``MIN_DISCORDANT_USERS`` users whose NDCG differs), the same without that minimum, the SE target
alone, and every user scored. Prints P(promoted) and the mean users scored per candidate and
policy, and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from unittest import mock

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import rec_pipelines.training as training  # noqa: E402
from rec_models.evaluation import paired_difference  # noqa: E402
from rec_pipelines.registry import NDCG_TOLERANCE, decide_promotion  # noqa: E402

USERS = 5_000
GAINS = 1.0 / np.log2(np.arange(1, 11) + 1.0)
CANDIDATES = {  # (share of the champion's hits kept, new hits as a share of the champion's rate)
    "equal": (0.9, 0.1), "better": (0.95, 0.3), "2/3": (0.67, 0.0), "half": (0.5, 0.0), "third": (0.33, 0.0)}
POLICIES = {  # (SE target, clear tolerance, minimum users that differ)
    "pipeline": (training.DEFAULT_TARGET_SE_RELATIVE, NDCG_TOLERANCE, training.MIN_DISCORDANT_USERS),
    "no minimum": (training.DEFAULT_TARGET_SE_RELATIVE, NDCG_TOLERANCE, 0),
    "SE target only": (training.DEFAULT_TARGET_SE_RELATIVE, None, training.MIN_DISCORDANT_USERS),
    "every user": (0.0, None, 0),
}


def users(rng: np.random.Generator, hit_rate: float, keep: float, gain: float) -> tuple[np.ndarray, np.ndarray]:
    champion = np.where(rng.random(USERS) < hit_rate, rng.choice(GAINS, USERS), 0.0)
    candidate = np.where((champion > 0) & (rng.random(USERS) < keep), champion, 0.0)
    fresh = (candidate == 0) & (rng.random(USERS) < gain * hit_rate)
    return np.where(fresh, rng.choice(GAINS, USERS), candidate), champion


def scored_users(candidate: np.ndarray, champion: np.ndarray, target: float, clear: float | None, minimum: int) -> int:
    """Users the gate scores before ``early_stop`` lets it stop (all when it never does)."""
    step = training.DEFAULT_STEP_USERS
    looks = max(1, math.ceil(USERS / step) - 1)
    if target <= 0:
        return USERS
    with mock.patch.object(training, "MIN_DISCORDANT_USERS", minimum):
        for n in range(step, USERS, step):
            if training.early_stop(candidate[:n], champion[:n], looks, target, clear) is not None:
                return n
    return USERS


def promoted(candidate: np.ndarray, champion: np.ndarray) -> bool:
    metrics = lambda ndcg: {"ndcg@10": float(ndcg.mean()), "coverage@10": 1.0, "cold_users": 0}  # noqa: E731
    return decide_promotion(metrics(candidate), metrics(champion), paired=paired_difference(candidate, champion)).promoted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=1500)
    parser.add_argument("--hit-rate", type=float, default=0.012)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    results = {policy: {} for policy in POLICIES}
    for name, (keep, gain) in CANDIDATES.items():
        counts = {policy: [0, 0] for policy in POLICIES}
        for _ in range(args.trials):
            candidate, champion = users(rng, args.hit_rate, keep, gain)
            for policy, (target, clear, minimum) in POLICIES.items():  # the same users under every policy
                n = scored_users(candidate, champion, target, clear, minimum)
                counts[policy][0] += promoted(candidate[:n], champion[:n])
                counts[policy][1] += n
        for policy, (wins, scored) in counts.items():
            results[policy][name] = {"promoted": round(wins / args.trials, 4), "mean_users": round(scored / args.trials)}
    for policy, row in results.items():
        print(f"{policy:15s}", "  ".join(f"{name}: P(promoted) {r['promoted']:.3f}, {r['mean_users']} users"
                                          for name, r in row.items()))
    print(json.dumps({"trials": args.trials, "hit_rate": args.hit_rate, "users": USERS,
                      "step_users": training.DEFAULT_STEP_USERS, "tolerance": NDCG_TOLERANCE, "results": results}))


if __name__ == "__main__":
    main()
