"""``recsys serve``: the batching HTTP server (MLflow's scoring protocol, one forward pass for
the requests waiting together, hot reload of the ``champion`` alias); see docs/serving.md."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from rec_pipelines.settings import Settings

DEFAULT_PORT = 5001  # 5000 is the MLflow UI of ``recsys ui``
RECORD_KEYS = ("dataframe_records", "dataframe_split", "inputs", "instances")

log = logging.getLogger("recsys.serve")


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
    parser.add_argument("--workers", type=int, default=1, help="--engine mlflow: uvicorn workers (default: %(default)s)")
    parser.add_argument("--timeout", type=int, default=60, help="--engine mlflow: seconds per request (default: %(default)s)")
    return parser.parse_args(argv)


# --- the served model ------------------------------------------------------------------------


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


def _alias_version(model_uri: str, tracking_uri: str):
    """The registry version behind ``models:/NAME@ALIAS`` (None for other URIs)."""
    if not model_uri.startswith("models:/") or "@" not in model_uri:
        return None
    from mlflow import MlflowClient

    name, alias = model_uri.removeprefix("models:/").rsplit("@", 1)
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri).get_model_version_by_alias(name, alias)


def load_model(model_uri: str, tracking_uri: str) -> LoadedModel:
    """Load the pyfunc behind ``model_uri`` (an alias is pinned to its current version first,
    so the version reported is the version loaded)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    version = _alias_version(model_uri, tracking_uri)
    resolved = f"models:/{version.name}/{version.version}" if version is not None else model_uri
    pyfunc = mlflow.pyfunc.load_model(resolved)
    return LoadedModel(pyfunc.unwrap_python_model().recommender, model_uri, resolved,
                       str(version.version) if version is not None else None,
                       version.run_id if version is not None else None, time.time())


class ModelHolder:
    """The model being served; ``refresh`` swaps in a new version behind the alias. Requests
    read ``current`` once per batch, so a swap never splits a batch between two models."""

    def __init__(self, model_uri: str, tracking_uri: str):
        self.model_uri = model_uri
        self.tracking_uri = tracking_uri
        self.current = load_model(model_uri, tracking_uri)

    def refresh(self) -> bool:
        """Load the alias' version if it moved; True when a new model is now served."""
        version = _alias_version(self.model_uri, self.tracking_uri)
        if version is None or str(version.version) == self.current.version:
            return False
        previous = self.current.version
        self.current = load_model(self.model_uri, self.tracking_uri)
        log.info("now serving %s (version %s, was %s)", self.model_uri, self.current.version, previous)
        return True


# --- batching ----------------------------------------------------------------------------------


class RequestBatcher:
    """Answers the requests waiting at the same moment with one ``Recommender.answer`` call.

    One worker thread runs the model; while it works, new requests queue up and go together
    into the next call (at most ``max_rows`` request rows per call). A request that arrives
    while the model is idle runs at once, alone.
    """

    def __init__(self, holder: ModelHolder, max_rows: int = 256):
        self.holder = holder
        self.max_rows = max_rows
        self.queue: asyncio.Queue = asyncio.Queue()
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="recommend")
        self.batches = 0
        self.rows = 0

    async def answer(self, parsed: list) -> dict[str, list]:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((parsed, future))
        return await future

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self.queue.get()]
            rows = len(jobs[0][0])
            while not self.queue.empty() and rows < self.max_rows:
                jobs.append(self.queue.get_nowait())
                rows += len(jobs[-1][0])
            parsed = [request for job, _ in jobs for request in job]
            recommender = self.holder.current.recommender
            try:
                columns, counts = await loop.run_in_executor(self.executor, recommender.answer, parsed)
            except Exception as error:  # noqa: BLE001 - every waiting request must hear of it
                log.exception("recommendation failed")
                for _, future in jobs:
                    if not future.done():
                        future.set_exception(error)
                continue
            self.batches += 1
            self.rows += len(parsed)
            start, row = 0, 0
            for job, future in jobs:
                n = sum(counts[row : row + len(job)])
                row += len(job)
                if not future.done():  # the client may have gone
                    future.set_result({name: values[start : start + n] for name, values in columns.items()})
                start += n


# --- HTTP --------------------------------------------------------------------------------------


def request_rows(payload: object) -> list:
    """The request rows of a scoring-protocol payload (MLflow's JSON formats)."""
    from rec_models.serving import InvalidRequest

    if not isinstance(payload, dict) or not any(key in payload for key in RECORD_KEYS):
        raise InvalidRequest(f"expected a JSON object with one of {', '.join(RECORD_KEYS)}, e.g. "
                             '{"dataframe_records": [{"user_id": "u1", "k": 10}]}')
    key = next(key for key in RECORD_KEYS if key in payload)
    value = payload[key]
    if key == "dataframe_split":
        if not isinstance(value, dict) or not isinstance(value.get("columns"), list) \
                or not isinstance(value.get("data"), list):
            raise InvalidRequest('dataframe_split must be {"columns": [...], "data": [[...], ...]}')
        columns = value["columns"]
        rows = []
        for row, data in enumerate(value["data"]):
            if not isinstance(data, list) or len(data) != len(columns):
                raise InvalidRequest(f"dataframe_split row {row} must be a list of {len(columns)} values")
            rows.append(dict(zip(columns, data)))
        return rows
    if isinstance(value, dict):  # columns -> lists, as MLflow's "inputs" allows
        lengths = {len(v) for v in value.values() if isinstance(v, list)}
        if len(lengths) != 1 or not all(isinstance(v, list) for v in value.values()):
            raise InvalidRequest(f"{key} as an object must map each field to a list of equal length")
        n = lengths.pop()
        return [{name: values[row] for name, values in value.items()} for row in range(n)]
    if not isinstance(value, list):
        raise InvalidRequest(f"{key} must be a list of request objects")
    return value


def create_app(holder: ModelHolder, max_batch_rows: int = 256, reload_interval_s: float = 0.0):
    """The Starlette application: /invocations, /ping, /health, /model."""
    from contextlib import asynccontextmanager

    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    from rec_models.serving import OUTPUT_COLUMNS, InvalidRequest, parse_rows

    batcher = RequestBatcher(holder, max_batch_rows)

    def error(status: int, code: str, message: str) -> Response:
        return JSONResponse({"error_code": code, "message": message}, status_code=status)

    async def invocations(request: Request) -> Response:
        content_type = request.headers.get("content-type", "application/json")
        if "json" not in content_type:
            return error(415, "BAD_REQUEST", f"content type {content_type!r} is not supported: send application/json")
        body = await request.body()
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            return error(400, "BAD_REQUEST", f"the request body is not valid JSON: {exc}")
        try:
            parsed = parse_rows(request_rows(payload))
        except InvalidRequest as exc:
            return error(400, "INVALID_PARAMETER_VALUE", f"invalid request: {exc}")
        if not parsed:
            return JSONResponse({"predictions": []})
        try:
            columns = await batcher.answer(parsed)
        except Exception:  # noqa: BLE001 - logged by the batcher; no stack trace to the client
            return error(500, "INTERNAL_ERROR", "internal error while recommending (see the server log)")
        records = [dict(zip(OUTPUT_COLUMNS, values)) for values in zip(*(columns[c] for c in OUTPUT_COLUMNS))]
        return Response(json.dumps({"predictions": records}), media_type="application/json")

    async def ping(request: Request) -> Response:
        return Response("\n", media_type="text/plain")

    async def model(request: Request) -> Response:
        return JSONResponse({**holder.current.describe(), "batches": batcher.batches, "rows": batcher.rows})

    async def follow_alias() -> None:
        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(1, thread_name_prefix="reload") as reloader:
            while True:
                await asyncio.sleep(reload_interval_s)
                try:
                    await loop.run_in_executor(reloader, holder.refresh)
                except Exception:  # noqa: BLE001 - keep serving the current model
                    log.exception("could not reload %s; still serving version %s", holder.model_uri,
                                  holder.current.version)

    @asynccontextmanager
    async def lifespan(app):
        tasks = [asyncio.create_task(batcher.run())]
        if reload_interval_s > 0:
            tasks.append(asyncio.create_task(follow_alias()))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            batcher.executor.shutdown(wait=False, cancel_futures=True)

    routes = [Route("/invocations", invocations, methods=["POST"]), Route("/ping", ping), Route("/health", ping),
              Route("/model", model)]
    return Starlette(routes=routes, lifespan=lifespan)


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
        _alias_version(model_uri, tracking_uri)
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
    if args.engine == "mlflow":
        command, env = serve_command(args)
        print(f"serving {args.model_uri} with MLflow's scoring server on http://{args.host}:{args.port}/invocations",
              flush=True)
        os.execve(command[0], command, env)  # the server replaces this process: Ctrl-C stops it

    import torch
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    holder = ModelHolder(args.model_uri, settings.mlflow_tracking_uri)
    print(f"serving {args.model_uri} (version {holder.current.version}, {holder.current.recommender.n_items} items) "
          f"on http://{args.host}:{args.port}/invocations", flush=True)
    app = create_app(holder, args.max_batch_rows, args.reload_interval)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", access_log=False,
                loop="uvloop", http="httptools", timeout_graceful_shutdown=5)
    return 0
