"""Ingest + validation throughput on synthetic feedback (default: 1,000,000 events).

    .venv/bin/python benchmarks/ingest.py [--rows N] [--format jsonl|csv|parquet] [--gzip]
                                          [--ge-rows N] [--profile]

Writes one landing file of synthetic events (about 1% of them bad in assorted ways, 3% with a
review text, some with e-mail addresses), then times what the pipeline does with it, through
the same ``FeedbackStore`` methods the Dagster assets call:

* ``ingest``   parse (Arrow readers), convert to the schema, pseudonymise user and session
               ids (HMAC-SHA256), scrub and truncate texts, write the batch to the lake;
* ``validate`` the vectorised row rules over every row (duplicates within the batch and
               against earlier ones included), write valid rows, quarantined rows and the
               batch's accounting;
* ``ge``       what the blocking check does: read the batch's validated rows back and run
               the Great Expectations suite over a seeded sample of ``--ge-rows`` rows (the
               check's default, 100,000), or over all of them if there are no more.

Dagster's own overhead (run storage, event log, the IO manager's pickles) is not included.
The last line is JSON: ``rows_per_s`` covers ingest + validate + ge; the other fields say
exactly what was measured and on what.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rec_models.data.schema import EVENT_TYPES  # noqa: E402
from rec_pipelines.lake import FeedbackStore  # noqa: E402
from rec_pipelines.lake.validation import GE_MAX_ROWS, run_expectations  # noqa: E402

START = 1_700_000_000


def synthetic_events(n: int, seed: int = 0) -> pd.DataFrame:
    """n events from 50k users (about 7 events per session) on 20k items over 30 days; ~1% bad
    rows of several kinds."""
    rng = np.random.default_rng(seed)
    users = rng.integers(0, 50_000, n)
    event_type = rng.choice(EVENT_TYPES, n, p=[0.45, 0.22, 0.08, 0.08, 0.05, 0.03, 0.06, 0.03])
    value = np.where(event_type == "rating", rng.integers(1, 11, n) / 2.0, np.round(rng.exponential(30.0, n), 1))
    frame = pd.DataFrame({
        "user_id": pd.Series(users).map("u{:06d}".format),
        "item_id": pd.Series(rng.zipf(1.3, n) % 20_000).map("i{:05d}".format),
        "event_type": event_type,
        "value": value,
        "timestamp": START + np.sort(rng.integers(0, 30 * 86_400, n)),
        # about 7 events per session, like the simulator: three sessions per user and month
        "session_id": pd.Series(users).map("u{:06d}".format) + "-s" + pd.Series(rng.integers(0, 3, n)).astype(str),
        "text": None,
    })
    reviews = rng.random(n) < 0.03
    frame.loc[reviews, "text"] = [f"loved it, {'write me at fan{0}@example.com'.format(i) if i % 10 == 0 else 'would buy again'}"
                                  for i in range(int(reviews.sum()))]
    bad = rng.choice(n, size=n // 100, replace=False)
    kinds = np.arange(len(bad)) % 5
    frame.loc[bad[kinds == 0], "event_type"] = "teleport"
    frame.loc[bad[kinds == 1], "timestamp"] = START * 1000  # milliseconds
    frame.loc[bad[kinds == 2], "user_id"] = None
    ratings = bad[kinds == 3]
    frame.loc[ratings, ["event_type", "value"]] = ["rating", 9.0]
    dupes = bad[kinds == 4]
    frame.loc[dupes, frame.columns] = frame.loc[(dupes + 1) % n, frame.columns].to_numpy()
    return frame


def write(frame: pd.DataFrame, folder: Path, fmt: str, gz: bool) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    name = {"jsonl": "events.jsonl", "csv": "events.csv", "parquet": "events.parquet"}[fmt] + (".gz" if gz else "")
    tmp, path = folder / f".{name}.tmp", folder / name
    compression = "gzip" if gz else None
    if fmt == "jsonl":
        frame.to_json(tmp, orient="records", lines=True, compression=compression)
    elif fmt == "csv":
        frame.to_csv(tmp, index=False, compression=compression)
    else:
        frame.to_parquet(tmp, index=False)
    os.replace(tmp, path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--format", choices=["jsonl", "csv", "parquet"], default="jsonl")
    parser.add_argument("--gzip", action="store_true", help="gzip the landing file (not for parquet)")
    parser.add_argument("--ge-rows", type=int, default=GE_MAX_ROWS, help="rows the GE suite checks (a seeded sample)")
    parser.add_argument("--profile", action="store_true", help="print the top functions of ingest + validate")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="recsys-ingest-bench-") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        frame = synthetic_events(args.rows)
        path = write(frame, root / "landing" / "events", args.format, args.gzip and args.format != "parquet")
        size_mb = path.stat().st_size / 1e6
        print(f"wrote {args.rows:,} events ({size_mb:.0f} MB {path.name}) in {time.perf_counter() - started:.1f}s")
        del frame

        store = FeedbackStore(root / "landing", root / "lake", pseudonym_key="benchmark-key-" + "0" * 18)
        run_expectations(store.read_validated().head(0))  # import and warm GE outside the timings
        profiler = cProfile.Profile() if args.profile else None
        if profiler:
            profiler.enable()
        t0, c0 = time.perf_counter(), time.process_time()
        report = store.ingest("events")
        t1, c1 = time.perf_counter(), time.process_time()
        [account] = store.validate_pending()
        t2, c2 = time.perf_counter(), time.process_time()
        suite = run_expectations(store.read_validated([account["batch_id"]]), max_rows=args.ge_rows)
        t3, c3 = time.perf_counter(), time.process_time()
        if profiler:
            profiler.disable()
        if profiler:
            pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)

    assert report.rows_in == account["rows_in"] == args.rows
    assert account["rows_in"] == account["rows_valid"] + account["rows_quarantined"]
    ingest_s, validate_s, ge_s = t1 - t0, t2 - t1, t3 - t2
    total = ingest_s + validate_s + ge_s
    cpu = {"ingest": c1 - c0, "validate": c2 - c1, "ge": c3 - c2}
    print(f"ingest    {ingest_s:6.2f}s (cpu {cpu['ingest']:5.2f}s)  {args.rows / ingest_s:>10,.0f} rows/s  "
          "(parse, schema, pseudonyms, text, write)")
    print(f"validate  {validate_s:6.2f}s (cpu {cpu['validate']:5.2f}s)  {args.rows / validate_s:>10,.0f} rows/s  "
          "(row rules, duplicates, write)")
    print(f"GE check  {ge_s:6.2f}s (cpu {cpu['ge']:5.2f}s)  read back, suite on {suite.rows_checked:,} of "
          f"{suite.rows_total:,} valid rows ({'seeded sample' if suite.sampled else 'all rows'}), success={suite.success}")
    print(f"total     {total:6.2f}s (cpu {sum(cpu.values()):5.2f}s)  {args.rows / total:>10,.0f} rows/s; "
          f"{account['rows_valid']:,} valid, {account['rows_quarantined']:,} quarantined: {account['reasons']}")
    print(json.dumps({
        "rows_per_s": round(args.rows / total),
        "rows_per_s_ingest_validate": round(args.rows / (ingest_s + validate_s)),
        "rows": args.rows, "format": args.format + (".gz" if args.gzip and args.format != "parquet" else ""),
        "file_mb": round(size_mb, 1), "ingest_s": round(ingest_s, 3), "validate_s": round(validate_s, 3),
        "ge_s": round(ge_s, 3), "cpu_s": round(sum(cpu.values()), 3), "ge_rows_checked": suite.rows_checked, "ge_sampled": suite.sampled,
        "rows_valid": account["rows_valid"], "rows_quarantined": account["rows_quarantined"],
        "covers": "FeedbackStore.ingest + validate_pending on every row, GE suite on ge_rows_checked rows; "
                  "no Dagster run overhead",
        "cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
