"""``recsys serve --workers N``: N server processes behind one port, with uvicorn's own
multi-process supervisor.

The parent (``serve_workers``) binds the port, creates a temp dir for the server, puts the
parsed options as JSON into ``RECSYS_SERVE_OPTIONS`` and hands uvicorn the import strings of
``worker_app`` (an app factory) and ``HeaderTimeoutProtocol``; uvicorn spawns the workers,
which inherit that environment. Each worker loads the model itself and has its own batcher,
hot reload and impression log (files named with its pid, so no two workers write the same
file). SIGTERM on the parent stops every worker gracefully: each answers what it holds and
flushes its impressions. A ``POST /reload`` reaches one worker, which passes it on to the
others through a token file in the temp dir (``ReloadToken``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

from rec_models.files import as_location

OPTIONS_ENV = "RECSYS_SERVE_OPTIONS"
TOKEN_FILE = "reload-token"
FAILED_FILE = "failed"  # a worker could not start: the parent's exit status says so

log = logging.getLogger("recsys.serve")


def build_app(args: argparse.Namespace, settings, workers: int = 1, reload_token=None):
    """The application for the parsed ``recsys serve`` options: loads the champion (and the
    challenger when asked for), opens the impression log; says what it serves on stdout."""
    import torch

    from rec_pipelines.server.app import create_app
    from rec_pipelines.server.impressions import ImpressionLog
    from rec_pipelines.server.limits import ServerLimits
    from rec_pipelines.server.models import Arms, ModelHolder

    torch.set_num_threads(args.threads)
    limits = ServerLimits.from_args(args)
    holder = ModelHolder(args.model_uri, settings.mlflow_tracking_uri)
    challenger = None
    if args.challenger_share > 0 or args.interleave:
        challenger = ModelHolder(args.model_uri.rsplit("@", 1)[0] + "@challenger", settings.mlflow_tracking_uri,
                                 required=False)
    impressions = None
    if args.impressions:  # into the landing zone itself, local or remote (not a remote zone's mirror)
        impressions = ImpressionLog(as_location(settings.landing_location) / "impressions")
    print((f"worker {os.getpid()}: " if workers > 1 else "")
          + f"serving {args.model_uri} (version {holder.current.version}, {holder.current.recommender.n_items} items) "
          f"on http://{args.host}:{args.port}/invocations"
          + (f"; impressions to {impressions.folder}" if impressions else ""), flush=True)
    arms = Arms(holder, challenger, args.challenger_share, interleave=args.interleave)
    return create_app(arms, args.max_batch_rows, args.reload_interval, limits, impressions, reload_token, workers)


def worker_app():
    """uvicorn's app factory in each worker process: the options from ``RECSYS_SERVE_OPTIONS``.
    A worker that cannot start exits with uvicorn's startup-failure code, so the parent stops
    rather than restarting it forever (and exits with status 1)."""
    from uvicorn.config import STARTUP_FAILURE  # "failed before serving": the parent stops, not restarts

    from rec_pipelines.server.models import ReloadToken
    from rec_pipelines.settings import Settings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = json.loads(os.environ[OPTIONS_ENV])
    state = Path(options.pop("state_dir"))
    try:
        return build_app(argparse.Namespace(**options), Settings.from_env(), options["workers"],
                         ReloadToken(state / TOKEN_FILE))
    except Exception:  # noqa: BLE001 - logged here; uvicorn would only see a crashed worker
        log.exception("worker %d could not start", os.getpid())
        (state / FAILED_FILE).touch()
        sys.exit(STARTUP_FAILURE)


def __getattr__(name: str):
    """``HeaderTimeoutProtocol``: ``timed_protocol`` with the workers' ``--header-timeout-s``,
    built on first use in each worker (uvicorn imports the protocol class by name there)."""
    if name != "HeaderTimeoutProtocol":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from rec_pipelines.server.limits import timed_protocol

    protocol = timed_protocol(json.loads(os.environ[OPTIONS_ENV])["header_timeout_s"])
    globals()[name] = protocol
    return protocol


def serve_workers(args: argparse.Namespace, **uvicorn_options) -> int:
    """Run ``args.workers`` worker processes on ``args.host:args.port`` until SIGTERM/SIGINT;
    the exit status (1 when a worker could not start)."""
    import uvicorn

    state = Path(tempfile.mkdtemp(prefix="recsys-serve-"))
    os.environ[OPTIONS_ENV] = json.dumps({**vars(args), "state_dir": str(state)})
    print(f"serving {args.model_uri} with {args.workers} worker processes on http://{args.host}:{args.port}"
          "/invocations", flush=True)
    try:
        uvicorn.run(f"{__name__}:worker_app", factory=True, workers=args.workers, host=args.host, port=args.port,
                    http=f"{__name__}:HeaderTimeoutProtocol", **uvicorn_options)
        return 1 if (state / FAILED_FILE).exists() else 0
    finally:
        os.environ.pop(OPTIONS_ENV, None)
        shutil.rmtree(state, ignore_errors=True)
