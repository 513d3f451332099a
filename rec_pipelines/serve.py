"""``recsys serve``: the champion over HTTP with MLflow's scoring server.

    recsys serve [--model-uri URI] [--host 127.0.0.1] [--port 5001] [--workers 1] [--timeout 60]
                 [--threads 1]

Runs ``mlflow models serve -m models:/<RECSYS_MODEL_NAME>@champion --env-manager local`` in the
current environment (the venv's ``bin`` is put first on PATH: the scoring server starts
``uvicorn`` by name). It binds to 127.0.0.1 unless ``--host`` says otherwise. The model is
self-contained, so the server needs the registry only to download it at start-up.

Query it with ``POST /invocations`` (``Content-Type: application/json``)::

    {"dataframe_records": [{"user_id": "u1", "recent_item_ids": ["i7", "i9"], "k": 5,
                            "exclude": ["i3"]}]}

The answer is ``{"predictions": [{"user_id", "rank", "item_id", "score", "title",
"explanation", "warnings"}, ...]}``; malformed requests get HTTP 400 with a message.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rec_pipelines.settings import Settings

DEFAULT_PORT = 5001  # 5000 is the MLflow UI of ``recsys ui``


def parse_args(argv: list[str], settings: Settings) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="recsys serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-uri", default=f"models:/{settings.model_name}@champion",
                        help="model to serve (default: %(default)s)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: %(default)s)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes (default: %(default)s)")
    parser.add_argument("--timeout", type=int, default=60, help="seconds a request may take (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per worker (default: %(default)s; one request is too small to split, "
                             "and spare threads spin against the other requests)")
    return parser.parse_args(argv)


def serve_command(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """The ``mlflow models serve`` command line and its environment."""
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
    of another kind, which the server checks itself)."""
    if not model_uri.startswith("models:/") or "@" not in model_uri:
        return None
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    name, alias = model_uri.removeprefix("models:/").rsplit("@", 1)
    try:
        MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri).get_model_version_by_alias(name, alias)
    except MlflowException as error:
        return f"no model at {model_uri} in {tracking_uri} ({error.message}); train one first: recsys demo"
    return None


def main(argv: list[str]) -> int:
    settings = Settings.from_env()
    args = parse_args(argv, settings)
    problem = missing_model(args.model_uri, settings.mlflow_tracking_uri)
    if problem:
        print(f"recsys serve: {problem}", file=sys.stderr)
        return 1
    command, env = serve_command(args)
    print(f"serving {args.model_uri} on http://{args.host}:{args.port}/invocations", flush=True)
    os.execve(command[0], command, env)  # the server replaces this process: Ctrl-C stops it
