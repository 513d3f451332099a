"""``recsys rollback``: point ``champion`` back at the version it replaced.

The same action runs in Dagster as ``rollback_champion_job`` (rec_pipelines/defs/registry/jobs.py).
Prints one JSON line: {"model", "from_version", "to_version", "reason"}.
"""

import argparse
import json
import sys

from rec_pipelines.registry import ModelRegistry, RollbackError
from rec_pipelines.settings import Settings


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="recsys rollback", description=__doc__)
    parser.add_argument("--reason", default="manual rollback", help="recorded as a tag on the rolled-back version")
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    registry = ModelRegistry(settings.mlflow_tracking_uri, settings.mlflow_artifact_root, settings.model_name)
    try:
        old, new = registry.rollback(args.reason)
    except RollbackError as exc:
        print(f"recsys rollback: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"model": settings.model_name, "from_version": old, "to_version": new, "reason": args.reason}))
    return 0
