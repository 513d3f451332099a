"""Many small landing files through ``recsys ingest`` (default: 10,000 files of 5 events).

    .venv/bin/python benchmarks/many_files.py [--files N] [--events-per-file N]

Writes the files into a source folder, then times the command a user runs,
``recsys ingest FOLDER`` in a fresh ``RECSYS_HOME``: landing every file atomically, the
pipeline's ingestion assets (ingest, per-batch validation, the Great Expectations check,
features) in one Dagster run. Checks the accounting (every file one batch, every row valid or
quarantined) and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_files(folder: Path, files: int, per_file: int) -> int:
    folder.mkdir(parents=True)
    for i in range(files):
        rows = [{"user_id": f"u{i % 500}", "item_id": f"i{(i * 7 + j) % 3000}", "event_type": "view", "value": 1.0,
                 "timestamp": 1_700_000_000 + i * per_file + j} for j in range(per_file)]
        (folder / f"part-{i:06d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return files * per_file


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--events-per-file", type=int, default=5)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="recsys-many-files-") as tmp:
        root = Path(tmp)
        rows = write_files(root / "source", args.files, args.events_per_file)
        env = {**{k: v for k, v in os.environ.items() if not k.startswith(("RECSYS_", "DAGSTER_", "MLFLOW_"))},
               "RECSYS_HOME": str(root / "home")}
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "rec_pipelines.cli", "ingest", str(root / "source")],
                              env=env, cwd=ROOT, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            return 1
        summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(summary["batches"]) == args.files, len(summary["batches"])
    assert summary["rows_in"] == rows == summary["rows_valid"] + summary["rows_quarantined"]
    print(f"recsys ingest of {args.files:,} files ({rows:,} events): {seconds:.1f} s "
          f"({args.files / seconds:,.0f} files/s); {summary['rows_valid']:,} valid, checks {summary['checks']}")
    print(json.dumps({"files": args.files, "rows": rows, "seconds": round(seconds, 1),
                      "files_per_s": round(args.files / seconds, 1), "rows_valid": summary["rows_valid"],
                      "checks_passed": all(summary["checks"].values()), "covers": "recsys ingest FOLDER, end to end",
                      "cpus": os.cpu_count()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
