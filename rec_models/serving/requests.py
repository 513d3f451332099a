"""Request rows: their fields, limits (``RequestLimits``) and validation; a malformed row
raises ``InvalidRequest`` naming the row and the field."""

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
MAX_ID_CHARS = 256  # the lake refuses longer item ids too
MAX_IDS = 1000  # item ids in one row's recent_item_ids or exclude
EXPLANATION_PREFIX = "because you liked "
MAX_LISTED_IDS = 10  # unknown ids quoted in one warning
KEY_FILE_ENV = "RECSYS_PSEUDONYM_KEY_FILE"  # read through rec_models.settings.ModelSettings


class InvalidRequest(ValueError):
    """A request the recommender cannot answer; the message says which row and what to fix."""


@dataclass(frozen=True)
class RequestLimits:
    """What one request row may hold (``recsys serve`` sets them from its command line)."""

    max_k: int = MAX_K
    max_id_chars: int = MAX_ID_CHARS
    max_ids: int = MAX_IDS
    max_context_chars: int = MAX_CONTEXT_CHARS


DEFAULT_LIMITS = RequestLimits()


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


def _text(value: str, row: int, field: str, max_chars: int) -> str:
    """``value`` when it is at most ``max_chars`` long and encodable as UTF-8 (no lone surrogate)."""
    if len(value) > max_chars:
        raise InvalidRequest(f"row {row}: {field} is longer than {max_chars} characters ({len(value)})")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequest(f"row {row}: {field} is not valid Unicode ({exc.reason} at position {exc.start})") from None
    return value


def _parse_k(value: object, row: int, max_k: int) -> int:
    if _is_missing(value):
        return DEFAULT_K
    wrong = InvalidRequest(f"row {row}: k must be an integer between 1 and {max_k}, got {value!r:.40}")
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise wrong
    if not isinstance(value, numbers.Integral):  # 3.0 is fine; 2.5, inf and nan are not
        if not math.isfinite(value) or not float(value).is_integer():
            raise wrong
    if not 1 <= value <= max_k:  # compared before int(): k = 10**400 stays an error, not an overflow
        raise wrong
    return int(value)


def _parse_diversity(value: object, row: int) -> float | None:
    if _is_missing(value):
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) or not 0 <= value <= 1:
        raise InvalidRequest(f"row {row}: diversity must be a number between 0 (off) and 1, got {value!r:.80}")
    return float(value)


def _parse_context(value: object, row: int, limits: RequestLimits) -> str:
    if _is_missing(value):
        return ""
    if not isinstance(value, str):
        raise InvalidRequest(f"row {row}: context_text must be a string, got {type(value).__name__}")
    return _text(value, row, "context_text", limits.max_context_chars).strip()


def _parse_id(value: object, row: int, field: str, limits: RequestLimits) -> str:
    if isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)):
        value = str(value)
    if not isinstance(value, str):
        raise InvalidRequest(f"row {row}: {field} must be a string, got {type(value).__name__} {value!r:.80}")
    return _text(value, row, field, limits.max_id_chars)


def _parse_ids(value: object, row: int, field: str, limits: RequestLimits) -> list[str]:
    if _is_missing(value):
        return []
    if not isinstance(value, (list, tuple, np.ndarray)) or (isinstance(value, np.ndarray) and value.ndim != 1):
        raise InvalidRequest(f"row {row}: {field} must be a list of item ids, got {type(value).__name__} {value!r:.80}")
    if len(value) > limits.max_ids:
        raise InvalidRequest(f"row {row}: {field} holds {len(value)} ids; at most {limits.max_ids} are read")
    ids = []
    for item in value:
        if isinstance(item, (str, numbers.Integral)) and not isinstance(item, (bool, np.bool_)):
            ids.append(_parse_id(item, row, f"an id in {field}", limits))
        else:
            raise InvalidRequest(f"row {row}: {field} must hold item ids (strings), got {item!r:.80}")
    return ids


def parse_requests(frame: pd.DataFrame, limits: RequestLimits = DEFAULT_LIMITS) -> list[ParsedRequest]:
    """Validate request rows (columns of ``INPUT_COLUMNS``; all but ``user_id`` optional)."""
    if not isinstance(frame, pd.DataFrame):
        raise InvalidRequest(f"expected a table of requests with columns {INPUT_COLUMNS}, got {type(frame).__name__}")
    if "user_id" not in frame.columns:
        raise InvalidRequest(f"missing required column 'user_id' (columns are {INPUT_COLUMNS})")
    columns = {name: frame[name].tolist() for name in INPUT_COLUMNS if name in frame.columns}
    return parse_rows([{name: values[row] for name, values in columns.items()} for row in range(len(frame))], limits)


def parse_rows(rows: Sequence[Mapping], limits: RequestLimits = DEFAULT_LIMITS) -> list[ParsedRequest]:
    """Validate request rows given as mappings (a missing key is a missing value)."""
    parsed = []
    for row, fields in enumerate(rows):
        if not isinstance(fields, Mapping):
            raise InvalidRequest(f"row {row}: expected an object with fields {INPUT_COLUMNS}, got {fields!r:.80}")
        user_id = fields.get("user_id")
        if _is_missing(user_id) or user_id == "":
            raise InvalidRequest(f"row {row}: user_id is required")
        parsed.append(ParsedRequest(
            user_id=_parse_id(user_id, row, "user_id", limits),
            k=_parse_k(fields.get("k"), row, limits.max_k),
            recent_item_ids=_parse_ids(fields.get("recent_item_ids"), row, "recent_item_ids", limits),
            exclude=_parse_ids(fields.get("exclude"), row, "exclude", limits),
            diversity=_parse_diversity(fields.get("diversity"), row),
            context_text=_parse_context(fields.get("context_text"), row, limits),
        ))
    return parsed
