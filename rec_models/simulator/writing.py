"""Batch files in a landing zone: numbering, JSON Lines, atomic writes only when changed."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from rec_models.files import write_bytes_atomic
from rec_models.simulator.parameters import _EVENTS_FILE

# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def next_batch_index(landing_zone: Path | str) -> int:
    """One past the highest batch number under ``<landing_zone>/events/`` (0 if none)."""
    folder = Path(landing_zone) / "events"
    if not folder.is_dir():
        return 0
    numbers = [int(m.group(1)) for p in folder.iterdir() if (m := _EVENTS_FILE.fullmatch(p.name))]
    return max(numbers, default=-1) + 1


def _to_jsonl(frame: pd.DataFrame) -> str:
    """JSON Lines, one object per row; missing values become null."""
    return frame.to_json(orient="records", lines=True, force_ascii=False)


def _write_if_changed(path: Path, content: str) -> Path:
    """Write ``content`` to ``path`` atomically (hidden temp file in the same folder, then
    ``os.replace``), unless the file already holds exactly this content."""
    data = content.encode("utf-8")
    if path.is_file() and path.read_bytes() == data:
        return path
    return write_bytes_atomic(path, data)
