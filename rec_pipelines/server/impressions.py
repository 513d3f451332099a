"""What ``recsys serve`` served, written back into the landing zone as impression files, so
online metrics can join it with the feedback that follows (``online_metrics``).

One row per recommended item: ``request_id`` (one per answered request row, also in the
answer, so clients can send it back with their feedback), ``user_id`` (the pseudonym; a raw id
is never written), ``item_id``, ``rank``, ``model_version``, ``arm`` and ``timestamp``. Rows
are buffered (at most ``max_rows``, then written at once) and written every
``flush_interval_s`` as an atomic JSON Lines file in ``<landing>/impressions/`` (a folder or
object storage); ``close`` writes what is left (the server calls it on shutdown, SIGTERM
included). A failed write keeps the rows for the next try and never stops serving.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import time
from pathlib import Path

from rec_models.files import as_location, write_text_atomic

log = logging.getLogger("recsys.serve")


class ImpressionLog:
    def __init__(self, folder: Path | str, flush_interval_s: float = 1.0, max_rows: int = 10_000):
        self.folder = as_location(folder)
        self.flush_interval_s = flush_interval_s
        self.max_rows = max_rows
        self.rows: list[str] = []
        self.written = 0
        self.files = 0
        self._sequence = itertools.count()

    def record(self, request_ids: list[str], users: list[str | None], columns: dict[str, list],
               counts: list[int]) -> None:
        """Buffer the answer of request rows: ``columns`` hold ``item_id``, ``rank``, ``arm`` and
        ``model_version`` per item, ``counts`` the items of each request row."""
        now = int(time.time())
        start = 0
        for request_id, user, count in zip(request_ids, users, counts):
            for i in range(start, start + count):
                self.rows.append(json.dumps({
                    "request_id": request_id, "user_id": user, "item_id": columns["item_id"][i],
                    "rank": columns["rank"][i], "model_version": columns["model_version"][i],
                    "arm": columns["arm"][i], "timestamp": now}))
            start += count
        if len(self.rows) >= self.max_rows:
            self.flush()

    def flush(self) -> Path | None:
        """Write the buffered rows as one file; returns its path (None when nothing was buffered)."""
        if not self.rows:
            return None
        rows = list(self.rows)
        name = f"impressions-{time.time_ns()}-{os.getpid()}-{next(self._sequence)}.jsonl"
        path = write_text_atomic(self.folder / name, "\n".join(rows) + "\n")
        del self.rows[: len(rows)]  # only once written: a failed write keeps them for the next try
        self.written += len(rows)
        self.files += 1
        return path

    async def run(self) -> None:
        """Flush every ``flush_interval_s`` until cancelled (then flush once more)."""
        try:
            while True:
                await asyncio.sleep(self.flush_interval_s)
                try:
                    self.flush()
                except Exception:  # a full disk or an unreachable bucket must not stop serving; rows stay buffered
                    log.exception("could not write impressions to %s", self.folder)
        finally:
            self.close()

    def close(self) -> None:
        try:
            self.flush()
        except Exception:
            log.exception("could not write the last %d impressions to %s", len(self.rows), self.folder)
