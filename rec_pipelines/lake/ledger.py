"""The ledger: the lake's append-only record of every landing file it has seen (JSON Lines,
one entry per file: name, content hash, status, batch). Appended with an fsync on a local
lake; on object storage, where objects cannot be appended to, written whole under the lake's
lock (an upload replaces the object atomically)."""

from __future__ import annotations

import json
import os

from rec_models.files import is_remote, write_bytes_atomic


class Ledger:
    def __init__(self, path):
        self.path = path

    def entries(self) -> list[dict]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def append(self, *entries: dict) -> None:
        """Record ``entries`` durably; the caller holds the lake's lock."""
        if not entries:
            return
        lines = "".join(json.dumps(entry, sort_keys=True) + "\n" for entry in entries).encode("utf-8")
        if is_remote(self.path):
            try:
                earlier = self.path.read_bytes()
            except FileNotFoundError:
                earlier = b""
            write_bytes_atomic(self.path, earlier + lines)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab") as handle:
            handle.write(lines)
            handle.flush()
            os.fsync(handle.fileno())
