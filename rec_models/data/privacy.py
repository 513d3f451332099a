"""Pseudonymous ids (keyed HMAC-SHA256, the key kept private and identified by a public id)
and scrubbing of e-mail addresses and phone numbers from free text (docs/data.md)."""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from rec_models.files import write_text_atomic
from rec_models.settings import ModelSettings

KEY_ENV = "RECSYS_PSEUDONYM_KEY"  # read through rec_models.settings.ModelSettings
USER_PREFIX = "p_"
SESSION_PREFIX = "s_"
PSEUDONYM_HEX = 16
PSEUDONYM_PATTERN = rf"^{USER_PREFIX}[0-9a-f]{{{PSEUDONYM_HEX}}}$"
"""What every user id in the lake looks like (a Great Expectations check holds the lake to it)."""

EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
# A phone-looking run: optional +, digits with spaces, dots, dashes or parentheses between.
PHONE_CANDIDATE = re.compile(r"(?<![\w+])\+?\(?\d[\d\s().\-]{5,22}\d(?!\w)")
ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
# Cheap vectorised pre-filter: only texts containing "@" or three digits in a row can change.
_MAY_NEED_SCRUB = r"@|\d[\s().\-]?\d[\s().\-]?\d"

log = logging.getLogger(__name__)


def _as_key(key: bytes | str) -> bytes:
    if isinstance(key, str):
        key = key.encode("utf-8")
    if len(key) < 16:
        raise ValueError("a pseudonym key needs at least 16 bytes")
    return key


def key_id(key: bytes | str) -> str:
    """A short, public fingerprint of ``key`` (reveals nothing about it)."""
    return hmac.digest(_as_key(key), b"recsys pseudonym key id", "sha256")[:4].hex()


def pseudonymize(ids: Iterable | pd.Series, key: bytes | str, prefix: str = USER_PREFIX):
    """Keyed pseudonyms of ``ids``: ``prefix`` + 16 hex digits of HMAC-SHA256(key, id).

    Missing ids stay missing. A pandas Series comes back as a ``string`` Series with the same
    index; anything else as a list of str (None where the input was missing). Ids are
    compared as text, so 42 and "42" get the same pseudonym.
    """
    key = _as_key(key)
    is_series = isinstance(ids, pd.Series)
    series = ids if is_series else pd.Series(list(ids), dtype=object)
    if series.dtype == object:
        series = series.map(lambda v: v if v is None or v is pd.NA or isinstance(v, str) or
                            (isinstance(v, float) and np.isnan(v)) else str(v))
    codes, uniques = pd.factorize(series.astype("string"))
    digests = [prefix + digest for digest in _hmac_sha256_hex(uniques.tolist(), key, PSEUDONYM_HEX)]
    taken = pa.array(digests, pa.string()).take(pa.array(codes, mask=codes < 0))
    out = pd.Series(pd.arrays.ArrowStringArray(taken), index=series.index)
    return out if is_series else [None if v is pd.NA else v for v in out.tolist()]


def _hmac_sha256_hex(values: list[str], key: bytes, chars: int) -> list[str]:
    """The first ``chars`` hex digits of HMAC-SHA256(key, value) for each value. The keyed
    state is built once and copied per value (``hmac`` objects copy their key schedule)."""
    keyed = hmac.new(key, digestmod=hashlib.sha256)
    out = []
    for value in values:
        mac = keyed.copy()
        mac.update(value.encode("utf-8"))
        out.append(mac.hexdigest()[:chars])
    return out


def _scrub_phone(match: re.Match) -> str:
    text = match.group(0)
    digits = sum(ch.isdigit() for ch in text)
    if not 7 <= digits <= 15 or ISO_DATE.fullmatch(text.strip()):
        return text
    return "[phone]"


def scrub_text(text: str | None) -> str | None:
    """``text`` with e-mail addresses as ``[email]`` and phone numbers as ``[phone]``."""
    if text is None or text is pd.NA or not isinstance(text, str):
        return text
    return PHONE_CANDIDATE.sub(_scrub_phone, EMAIL.sub("[email]", text))


def scrub_texts(texts: pd.Series) -> pd.Series:
    """``scrub_text`` over a Series; only rows that might contain contact data are touched."""
    texts = texts.astype("string")
    suspect = texts.str.contains(_MAY_NEED_SCRUB, regex=True).fillna(False).to_numpy(dtype=bool)
    if not suspect.any():
        return texts
    out = texts.copy()
    out[suspect] = [scrub_text(t) for t in texts[suspect].tolist()]
    return out


def load_or_create_key(path: Path | str) -> tuple[bytes, bool]:
    """The key kept in ``path`` (hex text), created with 0600 permissions if missing.
    Returns (key, created). Safe against two processes creating it at once."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:  # exclusive: fails if another process won the race, then its key is used
            write_text_atomic(path, secrets.token_hex(32) + "\n", exclusive=True, mode=0o600)
            created = True
        except FileExistsError:
            created = False
    else:
        created = False
    return _read_key_file(path), created


def _read_key_file(path: Path) -> bytes:
    return bytes.fromhex(Path(path).read_text().strip())


def existing_pseudonym_key(key_file: Path | str | None, env: dict[str, str] | None = None) -> bytes | None:
    """The key ``$RECSYS_PSEUDONYM_KEY`` or ``key_file`` holds, or None; never creates one
    (for readers such as servers, which must not invent a key the lake does not use)."""
    from_env = ModelSettings.from_env(env).key_secret()
    if from_env:
        return _as_key(from_env)
    if key_file and Path(key_file).is_file():
        return _read_key_file(Path(key_file))
    return None


def resolve_pseudonym_key(key_file: Path | str, configured: bytes | str | None = None,
                          env: dict[str, str] | None = None) -> tuple[bytes, str]:
    """(key, where it came from): ``configured``, else ``$RECSYS_PSEUDONYM_KEY``, else the key
    file (generated on first use, which is logged)."""
    from_env = ModelSettings.from_env(env).key_secret()
    if configured:
        return _as_key(configured), "config"
    if from_env:
        return _as_key(from_env), f"${KEY_ENV}"
    key, created = load_or_create_key(key_file)
    if created:
        log.warning("generated a new pseudonym key in %s (mode 0600); keep it, or set %s: "
                    "a different key gives every user a new pseudonym", key_file, KEY_ENV)
    return key, str(key_file)

