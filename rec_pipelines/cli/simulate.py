"""``recsys simulate``: drop the next simulated feedback batch into the landing zone, or, with
``--online``, let the simulated users ask a running ``recsys serve`` for recommendations round
after round, react to what it served by their hidden tastes, browse beside it, and write their
feedback into the landing zone (where the sensor retrains on it). Prints one JSON line per
round: {"round", "lists", "ctr", "clicks", "file"}."""

from __future__ import annotations

import argparse
import json
import sys
import urllib.request
from pathlib import Path

import pandas as pd

from rec_models.files import write_text_atomic
from rec_pipelines.settings import Settings


def http_recommender(url: str, rows_per_request: int = 50):
    """``Recommend`` over HTTP: the users' lists and request ids from ``recsys serve`` at ``url``."""
    def recommend(user_ids: list[str], recent: list[list[str]], k: int):
        lists, request_ids = [], []
        for start in range(0, len(user_ids), rows_per_request):
            rows = [{"user_id": u, "recent_item_ids": r, "k": k}
                    for u, r in zip(user_ids[start : start + rows_per_request], recent[start : start + rows_per_request])]
            request = urllib.request.Request(f"{url.rstrip('/')}/invocations", headers={"Content-Type": "application/json"},
                                             data=json.dumps({"dataframe_records": rows}).encode())
            with urllib.request.urlopen(request, timeout=60) as answer:
                predictions = pd.DataFrame(json.loads(answer.read())["predictions"])
            by_user = {u: part for u, part in predictions.groupby("user_id", sort=False)}
            for row in rows:
                part = by_user.get(row["user_id"])
                lists.append([] if part is None else part.sort_values("rank")["item_id"].tolist())
                request_ids.append(None if part is None else part["request_id"].iloc[0])
        return lists, request_ids
    return recommend


def write_round(landing_zone: Path, name: str, *frames: pd.DataFrame) -> Path:
    """The round's feedback as one events file, landed atomically."""
    events = pd.concat([f for f in frames if len(f)], ignore_index=True).sort_values("timestamp", kind="stable")
    text = events.to_json(orient="records", lines=True)
    return write_text_atomic(Path(landing_zone) / "events" / f"{name}.jsonl", text)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="recsys simulate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=None, help="batch number (default: the next one)")
    parser.add_argument("--online", action="store_true", help="simulated users ask a running server, round by round")
    parser.add_argument("--server", default="http://127.0.0.1:5001", help="--online: the server (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=5, help="--online: rounds (simulated days)")
    parser.add_argument("--first-round", type=int, default=0,
                        help="--online: continue from this round (the earlier rounds' browsing counts as consumed; "
                             "their clicks are not known)")
    parser.add_argument("--users-per-round", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0, help="--online: the environment's seed")
    parser.add_argument("--drift", type=float, default=1.0, help="--online: multiplies the users' drift rate")
    args = parser.parse_args(argv)

    from rec_models.simulator import FeedbackSimulator, next_batch_index

    settings = Settings.from_env()
    landing = settings.local_landing_zone("simulate")
    simulator = FeedbackSimulator()
    if not args.online:
        batch = args.batch if args.batch is not None else next_batch_index(landing)
        for path in simulator.write_batch(landing, batch):
            print(path)
        return 0

    from rec_models.simulator.online import OnlineConfig, OnlineEnvironment

    env = OnlineEnvironment(simulator, OnlineConfig(users_per_round=args.users_per_round, drift=args.drift,
                                                    seed=args.seed))
    recommend = http_recommender(args.server)
    for number in range(args.first_round):  # what the users browsed before: consumed
        env.round(number)
    for number in range(args.first_round, args.first_round + args.rounds):
        state = env.round(number)
        reactions, clicked = env.play(state, recommend, arm="server")
        path = write_round(landing, f"online-s{args.seed}-r{number:04d}", state.organic, reactions)
        print(json.dumps({"round": number, "lists": len(clicked), "ctr": round(float(clicked.mean()), 4),
                          "clicks": int((reactions["event_type"] == "click").sum()), "file": str(path)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
