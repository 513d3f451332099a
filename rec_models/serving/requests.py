"""Request rows: their fields, limits and validation; a malformed row raises
``InvalidRequest`` naming the row and the field."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

INPUT_COLUMNS = ["user_id", "recent_item_ids", "k", "exclude", "diversity", "context_text"]
OUTPUT_COLUMNS = ["user_id", "rank", "item_id", "score", "title", "explanation", "warnings"]
DEFAULT_K = 10
MAX_K = 1000
MAX_CONTEXT_CHARS = 2000
EXPLANATION_PREFIX = "because you liked "
MAX_LISTED_IDS = 10  # unknown ids quoted in one warning
KEY_FILE_ENV = "RECSYS_PSEUDONYM_KEY_FILE"  # read through rec_models.settings.ModelSettings


class InvalidRequest(ValueError):
    """A request the recommender cannot answer; the message says which row and what to fix."""


@dataclass(frozen=True)
class ParsedRequest:
    """One validated request row."""

    user_id: str
    k: int
    recent_item_ids: list[str]
    exclude: list[str]
    diversity: float | None = None  # None: the model's default
    context_text: str = ""


def _is_missing(value: object) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def _parse_k(value: object, row: int) -> int:
    if _is_missing(value):
        return DEFAULT_K
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) or not float(value).is_integer():
        raise InvalidRequest(f"row {row}: k must be an integer between 1 and {MAX_K}, got {value!r}")
    k = int(value)
    if not 1 <= k <= MAX_K:
        raise InvalidRequest(f"row {row}: k must be an integer between 1 and {MAX_K}, got {k}")
    return k


def _parse_diversity(value: object, row: int) -> float | None:
    if _is_missing(value):
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) <= 1.0:
        raise InvalidRequest(f"row {row}: diversity must be a number between 0 (off) and 1, got {value!r:.80}")
    return float(value)


def _parse_context(value: object, row: int) -> str:
    if _is_missing(value):
        return ""
    if not isinstance(value, str):
        raise InvalidRequest(f"row {row}: context_text must be a string, got {type(value).__name__}")
    if len(value) > MAX_CONTEXT_CHARS:
        raise InvalidRequest(f"row {row}: context_text is longer than {MAX_CONTEXT_CHARS} characters")
    return value.strip()


def _parse_ids(value: object, row: int, field: str) -> list[str]:
    if _is_missing(value):
        return []
    if not isinstance(value, (list, tuple, np.ndarray)) or (isinstance(value, np.ndarray) and value.ndim != 1):
        raise InvalidRequest(f"row {row}: {field} must be a list of item ids, got {type(value).__name__} {value!r:.80}")
    ids = []
    for item in value:
        if isinstance(item, (str, numbers.Integral)) and not isinstance(item, (bool, np.bool_)):
            ids.append(str(item))
        else:
            raise InvalidRequest(f"row {row}: {field} must hold item ids (strings), got {item!r:.80}")
    return ids


def parse_requests(frame: pd.DataFrame) -> list[ParsedRequest]:
    """Validate request rows (columns of ``INPUT_COLUMNS``; all but ``user_id`` optional)."""
    if not isinstance(frame, pd.DataFrame):
        raise InvalidRequest(f"expected a table of requests with columns {INPUT_COLUMNS}, got {type(frame).__name__}")
    if "user_id" not in frame.columns:
        raise InvalidRequest(f"missing required column 'user_id' (columns are {INPUT_COLUMNS})")
    columns = {name: frame[name].tolist() for name in INPUT_COLUMNS if name in frame.columns}
    return parse_rows([{name: values[row] for name, values in columns.items()} for row in range(len(frame))])


def parse_rows(rows: Sequence[Mapping]) -> list[ParsedRequest]:
    """Validate request rows given as mappings (a missing key is a missing value)."""
    parsed = []
    for row, fields in enumerate(rows):
        if not isinstance(fields, Mapping):
            raise InvalidRequest(f"row {row}: expected an object with fields {INPUT_COLUMNS}, got {fields!r:.80}")
        user_id = fields.get("user_id")
        if _is_missing(user_id) or user_id == "":
            raise InvalidRequest(f"row {row}: user_id is required")
        if not isinstance(user_id, (str, numbers.Integral)) or isinstance(user_id, (bool, np.bool_)):
            raise InvalidRequest(f"row {row}: user_id must be a string, got {type(user_id).__name__} {user_id!r:.80}")
        parsed.append(ParsedRequest(
            user_id=str(user_id),
            k=_parse_k(fields.get("k"), row),
            recent_item_ids=_parse_ids(fields.get("recent_item_ids"), row, "recent_item_ids"),
            exclude=_parse_ids(fields.get("exclude"), row, "exclude"),
            diversity=_parse_diversity(fields.get("diversity"), row),
            context_text=_parse_context(fields.get("context_text"), row),
        ))
    return parsed
