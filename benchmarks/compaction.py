"""What compaction buys the readers of a lake that micro-batches have cut into many small files.

    .venv/bin/python benchmarks/compaction.py [--batches N] [--events-per-batch N] [--repeats N]

Ingests and validates ``--batches`` landing files (one batch each, like a day of micro-batches),
then times, before and after ``FeedbackStore.compact`` (the default thresholds,
``validated_feedback``'s), what the pipeline reads from the validated events: everything
(``training_data``'s whole build, the columns it reads), the rows of 200 users (a micro-batch's
per-user table update), the review events (item texts) and the distinct users (shares of a
whole build). Each figure is the median of ``--repeats`` reads, before and after alternating.
Checks that every read returns the same rows, and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rec_pipelines.lake import FeedbackStore  # noqa: E402
from rec_pipelines.lake.tables import compacted_batches  # noqa: E402
from rec_pipelines.user_table import TRAINING_COLUMNS  # noqa: E402


def write_batches(landing: Path, batches: int, per_batch: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    folder = landing / "events"
    folder.mkdir(parents=True)
    for b in range(batches):
        rows = pd.DataFrame({"user_id": [f"u{u}" for u in rng.integers(0, 20_000, per_batch)],
                             "item_id": [f"i{i}" for i in rng.integers(0, 5_000, per_batch)],
                             "event_type": rng.choice(["view", "click", "rating", "review"], per_batch),
                             "value": rng.integers(1, 6, per_batch).astype(float),
                             "timestamp": 1_700_000_000 + b * per_batch + np.arange(per_batch),
                             "text": "a review"})
        (folder / f"batch-{b:06d}.jsonl").write_text(rows.to_json(orient="records", lines=True))


def reads(store: FeedbackStore, users: list[str]) -> dict:
    """name -> a function reading what that pipeline step reads."""
    events = store.validated_events
    return {
        "all_rows": lambda: events().read(TRAINING_COLUMNS),
        "users_200": lambda: events().read_users(users, TRAINING_COLUMNS),
        "reviews": lambda: events().read_matching("event_type", ["review"], ["item_id", "event_type", "timestamp", "text"]),
        "distinct_users": lambda: pd.DataFrame({"user_id": np.sort(events().distinct("user_id"))}),
    }


def timed(read) -> tuple[float, object]:
    started = time.perf_counter()
    result = read()
    return time.perf_counter() - started, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=2_000)
    parser.add_argument("--events-per-batch", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="recsys-compaction-") as tmp:
        root = Path(tmp)
        write_batches(root / "landing", args.batches, args.events_per_batch)
        store = FeedbackStore(root / "landing", root / "lake", pseudonym_key="benchmark-key-" + "0" * 18)
        started = time.perf_counter()
        store.ingest("events")
        store.validate_pending()
        ingest_s = time.perf_counter() - started
        users = sorted(store.validated_events().read(["user_id"])["user_id"].unique())[:200]
        before = {name: [] for name in reads(store, users)}
        expected = {name: read() for name, read in reads(store, users).items()}

        # A copy of the lake compacted, so the two layouts alternate.
        compact_root = root / "compacted"
        shutil.copytree(root / "lake", compact_root)
        compacted = FeedbackStore(root / "landing", compact_root, pseudonym_key="benchmark-key-" + "0" * 18)
        compact_s, report = timed(compacted.compact)
        after = {name: [] for name in before}
        for _ in range(args.repeats):
            for store_, times in ((store, before), (compacted, after)):
                for name, read in reads(store_, users).items():
                    seconds, result = timed(read)
                    pd.testing.assert_frame_equal(result.reset_index(drop=True), expected[name].reset_index(drop=True))
                    times[name].append(seconds)
        files = len(set(compacted_batches(compact_root).values()))
    medians = {layout: {name: round(statistics.median(t), 3) for name, t in times.items()}
               for layout, times in (("batch_files", before), ("compacted", after))}
    rows = args.batches * args.events_per_batch
    print(f"{args.batches:,} batches of {args.events_per_batch} events ({rows:,}): ingest+validate {ingest_s:.1f} s; "
          f"compaction into {files} files {compact_s:.2f} s")
    for name in before:
        print(f"  {name:15s} {medians['batch_files'][name]:7.3f} s -> {medians['compacted'][name]:7.3f} s "
              f"({medians['batch_files'][name] / max(medians['compacted'][name], 1e-9):.1f}x)")
    print(json.dumps({"batches": args.batches, "rows": rows, "compacted_files": files, "compact_s": round(compact_s, 2),
                      "compacted_batches": report["compacted_batches"], "read_s": medians, "repeats": args.repeats,
                      "ingest_validate_s": round(ingest_s, 1), "cpus": os.cpu_count()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
