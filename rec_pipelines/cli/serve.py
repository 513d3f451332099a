"""``recsys serve``: the batching HTTP server (MLflow's scoring protocol, one forward pass for
the requests waiting together, hot reload of the ``champion`` alias, limits on what one client
may ask); ``--workers N`` runs N server processes behind the port; the server lives in
``rec_pipelines.server``, see docs/serving.md."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from rec_pipelines.server import ServerLimits, alias_version
from rec_pipelines.settings import Settings

DEFAULT_PORT = 5001  # 5000 is the MLflow UI of ``recsys ui``


def parse_args(argv: list[str], settings: Settings) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="recsys serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-uri", default=f"models:/{settings.model_name}@champion",
                        help="model to serve (default: %(default)s)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: %(default)s)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default: %(default)s; one batch is too small to split)")
    parser.add_argument("--reload-interval", type=float, default=30.0,
                        help="seconds between checks for a new version behind the alias; 0 never (default: %(default)s)")
    parser.add_argument("--max-batch-rows", type=int, default=256,
                        help="most request rows answered in one forward pass (default: %(default)s)")
    parser.add_argument("--engine", choices=("recsys", "mlflow"), default="recsys",
                        help="this server, or MLflow's scoring server (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=1,
                        help="server processes behind the port, each with its own copy of the model; a POST /reload "
                             "reaches them all within a second (default: %(default)s)")
    parser.add_argument("--timeout", type=int, default=60, help="--engine mlflow: seconds per request (default: %(default)s)")
    parser.add_argument("--challenger-share", type=float, default=0.0,
                        help="share of users (stable per user) answered by models:/NAME@challenger when that alias "
                             "exists (default: %(default)s)")
    parser.add_argument("--interleave", action="store_true",
                        help="answer every user with the champion's and the challenger's lists merged by team draft "
                             "(each item credited to its model in the impressions)")
    parser.add_argument("--impressions", action=argparse.BooleanOptionalAction, default=True,
                        help="write what was served into <landing>/impressions/ (default: on)")
    ServerLimits.add_arguments(parser)
    return parser.parse_args(argv)


# --- the command -------------------------------------------------------------------------------


def serve_command(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """``--engine mlflow``: the ``mlflow models serve`` command line and its environment."""
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)  # torch reads these at import
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", args.model_uri,
               "--env-manager", "local", "--host", args.host, "--port", str(args.port),
               "--workers", str(args.workers), "--timeout", str(args.timeout)]
    return command, env


def missing_model(model_uri: str, tracking_uri: str) -> str | None:
    """Why a ``models:/NAME@ALIAS`` URI cannot be served (None when it can, or when the URI is
    of another kind, which loading checks itself)."""
    from mlflow.exceptions import MlflowException

    try:
        alias_version(model_uri, tracking_uri)
    except MlflowException as error:
        return f"no model at {model_uri} in {tracking_uri} ({error.message}); train one first: recsys demo"
    return None


def main(argv: list[str]) -> int:
    settings = Settings.from_env()
    args = parse_args(argv, settings)
    if args.workers < 1:
        print(f"recsys serve: --workers must be at least 1, got {args.workers}", file=sys.stderr)
        return 2
    problem = missing_model(args.model_uri, settings.mlflow_tracking_uri)
    if problem:
        print(f"recsys serve: {problem}", file=sys.stderr)
        return 1
    if args.engine == "mlflow":
        command, env = serve_command(args)
        print(f"serving {args.model_uri} with MLflow's scoring server on http://{args.host}:{args.port}/invocations",
              flush=True)
        os.execve(command[0], command, env)  # the server replaces this process: Ctrl-C stops it

    import uvicorn

    from rec_pipelines.server import timed_protocol
    from rec_pipelines.server.workers import build_app, serve_workers

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    limits = ServerLimits.from_args(args)
    options = dict(log_level="info", access_log=False, loop="uvloop", limit_concurrency=limits.max_connections,
                   timeout_graceful_shutdown=5)  # limit_concurrency: per worker
    if args.workers > 1:  # uvicorn's supervisor; each worker builds its app (rec_pipelines.server.workers)
        return serve_workers(args, **options)
    app = build_app(args, settings)
    uvicorn.run(app, host=args.host, port=args.port, http=timed_protocol(limits.header_timeout_s), **options)
    return 0
