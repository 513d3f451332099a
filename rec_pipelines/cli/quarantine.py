"""``recsys quarantine``: what the lake quarantined, by reason, and (``--csv FILE``) the
quarantined rows as a spreadsheet-safe CSV (formula-like cells neutralised). Prints one JSON
line: {"rows", "by_reason", "files", "csv"}."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rec_pipelines.lake import FeedbackStore
from rec_pipelines.lake.export import write_csv
from rec_pipelines.settings import Settings


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="recsys quarantine", description=__doc__)
    parser.add_argument("--batch", default=None, help="one batch id (default: every batch)")
    parser.add_argument("--csv", type=Path, default=None, help="write the quarantined rows to this CSV file")
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    store = FeedbackStore.from_settings(settings)
    rows = store.quarantined_rows(args.batch)
    files = [{"file": e["file"], "reason": e["reason"]} for e in store.ledger() if e["status"] == "quarantined"]
    if args.csv:
        write_csv(rows, args.csv)
        print(f"wrote {len(rows)} quarantined rows to {args.csv}", file=sys.stderr)
    by_reason = {str(k): int(v) for k, v in rows["reason"].value_counts().items()} if len(rows) else {}
    print(json.dumps({"rows": len(rows), "by_reason": by_reason, "files": files,
                      "csv": str(args.csv) if args.csv else None}))
    return 0
