"""The model ``recsys serve`` answers from, and hot reload of the version behind its alias: a
newer champion that cannot be loaded leaves the live one serving, is reported by ``GET
/model`` and logged once per failing version. With several worker processes, ``ReloadToken``
carries a ``POST /reload`` from the worker that got it to all the others."""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("recsys.serve")


@dataclass(frozen=True)
class LoadedModel:
    recommender: object  # rec_models.serving.Recommender
    model_uri: str  # what was asked for, e.g. models:/name@champion
    resolved_uri: str  # what was loaded, e.g. models:/name/7
    version: str | None
    run_id: str | None
    loaded_at: float

    def describe(self) -> dict:
        return {"model_uri": self.model_uri, "resolved_uri": self.resolved_uri, "version": self.version,
                "run_id": self.run_id, "loaded_at": self.loaded_at, "items": self.recommender.n_items,
                "users": len(self.recommender.histories)}


def alias_version(model_uri: str, tracking_uri: str):
    """The registry version behind ``models:/NAME@ALIAS`` (None for other URIs)."""
    if not model_uri.startswith("models:/") or "@" not in model_uri:
        return None
    from mlflow import MlflowClient

    name, alias = model_uri.removeprefix("models:/").rsplit("@", 1)
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri).get_model_version_by_alias(name, alias)


def load_model(model_uri: str, tracking_uri: str, version=None) -> LoadedModel:
    """Load the pyfunc behind ``model_uri`` (an alias is pinned to its current version first,
    or to ``version`` when given, so the version reported is the version loaded)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    version = version if version is not None else alias_version(model_uri, tracking_uri)
    resolved = f"models:/{version.name}/{version.version}" if version is not None else model_uri
    pyfunc = mlflow.pyfunc.load_model(resolved)
    return LoadedModel(pyfunc.unwrap_python_model().recommender, model_uri, resolved,
                       str(version.version) if version is not None else None,
                       version.run_id if version is not None else None, time.time())


class ModelHolder:
    """The model being served; ``refresh`` swaps in a new version behind the alias. Requests
    read ``current`` once per batch, so a swap never splits a batch between two models.

    ``failed`` describes the newest version behind the alias that could not be loaded (None
    when the alias' version is the one serving); each failing version is logged once with its
    traceback, later retries of it only at debug level.
    """

    def __init__(self, model_uri: str, tracking_uri: str, required: bool = True):
        self.model_uri = model_uri
        self.tracking_uri = tracking_uri
        self.failed: dict | None = None
        self.current: LoadedModel | None = None
        self.required = required
        if required:
            self.current = load_model(model_uri, tracking_uri)
        else:  # e.g. the challenger: served once the alias exists
            self.refresh_if_present()

    def refresh_if_present(self) -> bool:
        """``refresh``, where an alias that does not exist (yet) is not an error."""
        from mlflow.exceptions import MlflowException

        try:
            return self.refresh()
        except MlflowException:  # no such alias (yet)
            return False

    def refresh(self) -> bool:
        """Load the alias' version if it moved; True when a new model is now served."""
        version = alias_version(self.model_uri, self.tracking_uri)
        live = self.current.version if self.current is not None else None
        if version is None or str(version.version) == live:
            self.failed = None  # the alias went back to the live version (a rollback)
            return False
        try:
            loaded = load_model(self.model_uri, self.tracking_uri, version)
        except Exception as error:  # noqa: BLE001 - a broken champion must not stop serving
            again = self.failed is not None and self.failed["version"] == str(version.version)
            reason = f"{type(error).__name__}: {error}"[:500]
            self.failed = {"version": str(version.version), "run_id": version.run_id, "reason": reason,
                           "first_failed_at": self.failed["first_failed_at"] if again else time.time(),
                           "attempts": self.failed["attempts"] + 1 if again else 1}
            if again:
                log.debug("version %s still cannot be loaded: %s", version.version, reason)
            else:
                log.error("cannot load version %s of %s; still serving version %s", version.version,
                          self.model_uri, live, exc_info=True)
            return False
        previous, self.current, self.failed = live, loaded, None
        log.info("now serving %s (version %s, was %s)", self.model_uri, loaded.version, previous)
        return True

    def describe(self) -> dict:
        """What ``GET /model`` says: the live model and, when one exists, the newer champion
        that could not be loaded, with why."""
        live = self.current.describe() if self.current is not None else {"model_uri": self.model_uri, "version": None}
        return {**live, "failed_version": self.failed}


class Arms:
    """Which model answers which user: the champion, and a ``challenger`` for a stable share of
    users (a salted hash of the user id, so a user stays in one arm across requests and
    restarts). Without a loaded challenger every user gets the champion."""

    def __init__(self, champion: ModelHolder, challenger: ModelHolder | None = None, challenger_share: float = 0.0,
                 salt: str = "recsys-arms", interleave: bool = False):
        if not 0.0 <= challenger_share <= 1.0:
            raise ValueError(f"challenger_share must be within [0, 1], got {challenger_share}")
        self.holders = {"champion": champion, **({"challenger": challenger} if challenger is not None else {})}
        self.challenger_share = challenger_share
        self.salt = salt
        self.interleave = interleave

    def arm_of(self, user_id: str) -> str:
        """champion, challenger, or interleave (every user gets both lists merged, when
        ``interleave`` and a challenger is loaded)."""
        challenger = self.holders.get("challenger")
        if challenger is None or challenger.current is None:
            return "champion"
        if self.interleave:
            return "interleave"
        if self.challenger_share <= 0:
            return "champion"
        digest = hashlib.sha256(f"{self.salt}:{user_id}".encode("utf-8", "surrogatepass")).digest()
        return "challenger" if int.from_bytes(digest[:8], "big") / 2**64 < self.challenger_share else "champion"

    def refresh(self) -> None:
        for holder in self.holders.values():
            if holder.required:
                holder.refresh()
            else:  # a challenger alias that does not exist yet is normal, a missing champion is not
                holder.refresh_if_present()

    def describe(self) -> dict:
        champion = self.holders["champion"].describe()
        if "challenger" in self.holders:
            champion["challenger"] = {**self.holders["challenger"].describe(), "share": self.challenger_share,
                                      "interleave": self.interleave}
        return champion


class ReloadToken:
    """Push reload across the worker processes of ``recsys serve --workers N``: ``POST /reload``
    reaches one worker, which ``announce``s it by writing a new random token into a small file
    of the server's temp dir; every worker reads that file every ``poll_s`` seconds and, when the
    token ``changed``, checks its aliases at once (polling the registry stays as the fallback)."""

    poll_s = 0.5

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.seen = self.read()

    def read(self) -> str | None:
        try:
            return self.path.read_text()
        except OSError:
            return None

    def announce(self) -> None:
        from rec_models.files import write_text_atomic

        token = secrets.token_hex(8)
        write_text_atomic(self.path, token, durable=False)  # a reader sees the old token or the new one
        self.seen = token  # this worker checks its aliases itself

    def changed(self) -> bool:
        token = self.read()
        if token is None or token == self.seen:
            return False
        self.seen = token
        return True
