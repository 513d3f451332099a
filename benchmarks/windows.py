"""Training windows in memory vs streamed from Parquet by loader worker processes.

    .venv/bin/python benchmarks/windows.py [--users 250000] [--events-per-user 40] [--items 100000]
                                           [--workers 0,1,2] [--max-time-s 60] [--seed 0]

Builds sequences shaped like the scaling benchmark's 10M-event history (``--users`` users with
geometric lengths of mean ``--events-per-user``, Zipf-popular items out of ``--items``) and
trains the recommender's SASRec network (``RecommenderConfig`` defaults, ``loader_workers`` set
per run) for at most ``--max-time-s`` seconds, validating on a stratified sample of 500 users
(as ``train_recommender`` does), one fresh process per setting, settings alternating over
``--repeats``. Per run it prints windows trained per second and the peak RSS
of the training process and of its loader workers (0 workers: the windows are built in the
training process from an in-memory index, ``TrainingWindows``; N > 0: ``StreamedWindows``).
Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(args: argparse.Namespace, workers: int) -> dict:
    """One training run in this process (the child): its figures."""
    import numpy as np

    from rec_models.data import UserSequences, leave_last_out
    from rec_models.evaluation.sampling import stratified_user_sample
    from rec_models.models.recommender import RecommenderConfig
    from rec_models.models.training import train_sasrec

    rng = np.random.default_rng(args.seed)
    lengths = rng.geometric(1 / args.events_per_user, args.users) + 4
    popularity = 1.0 / np.arange(1, args.items + 1) ** 0.9
    flat = rng.choice(np.arange(1, args.items + 1), size=int(lengths.sum()), p=popularity / popularity.sum())
    bounds = np.r_[0, np.cumsum(lengths)]
    items = [flat[s:e] for s, e in zip(bounds[:-1], bounds[1:])]
    types = [np.ones(len(a), dtype=np.int64) for a in items]
    split = leave_last_out(UserSequences([f"u{i}" for i in range(args.users)], items, types))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    config = RecommenderConfig(max_epochs=1_000, patience=1_000, loader_workers=workers,
                               seed=args.seed).sasrec(args.items, 0)
    started = time.perf_counter()
    lengths_train = np.array([len(a) for a in split.train.items])
    val_split = split.subset(stratified_user_sample(lengths_train, 500, args.seed))  # as train_recommender validates
    _, history = train_sasrec(split, config, max_time_s=args.max_time_s, val_split=val_split)
    return {"workers": workers, "events": int(lengths.sum()), "windows_per_epoch": history["n_windows"],
            "windows_trained": int(sum(history["sequences_per_rank"])), "train_s": round(history["train_s"], 1),
            "windows_per_s": round(history["sequences_per_s"], 1), "wall_s": round(time.perf_counter() - started, 1),
            "rss_before_training_mb": rss_before,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
            "peak_rss_workers_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=250_000)
    parser.add_argument("--events-per-user", type=int, default=40)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--max-time-s", type=float, default=60.0)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args, args.child)))
        return
    runs = []
    for _ in range(args.repeats):
        for workers in (int(w) for w in args.workers.split(",")):
            command = [sys.executable, __file__, "--child", str(workers)] + [
                f"--{name.replace('_', '-')}={value}" for name, value in vars(args).items()
                if name not in ("child", "workers", "repeats")]
            out = subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT).stdout
            run = json.loads(out.strip().splitlines()[-1])
            runs.append(run)
            print(f"workers={workers}: {run['windows_per_s']:.0f} windows/s ({run['windows_trained']} windows in "
                  f"{run['train_s']} s of {run['windows_per_epoch']}/epoch), peak RSS {run['peak_rss_mb']} MB "
                  f"(before training {run['rss_before_training_mb']}), workers {run['peak_rss_workers_mb']} MB", flush=True)
    by = {}
    for run in runs:
        by.setdefault(str(run["workers"]), []).append(run)
    summary = {w: {"windows_per_s": [r["windows_per_s"] for r in rs], "peak_rss_mb": [r["peak_rss_mb"] for r in rs],
                   "peak_rss_workers_mb": [r["peak_rss_workers_mb"] for r in rs]} for w, rs in by.items()}
    print(json.dumps({"benchmark": "windows", "users": args.users, "items": args.items,
                      "events": runs[0]["events"], "windows_per_epoch": runs[0]["windows_per_epoch"],
                      "max_time_s": args.max_time_s, "by_workers": summary}))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
