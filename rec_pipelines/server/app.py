"""The HTTP application of ``recsys serve``: MLflow's scoring protocol on ``/invocations``,
one forward pass for the requests waiting together (``RequestBatcher``), ``/ping``,
``/health`` and ``/model`` (which also says which worker process answered). Every client mistake is a 4xx with a message; a request that fails
in the model is answered alone, so it never fails the requests batched with it."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import uuid
from concurrent.futures import ThreadPoolExecutor

from rec_pipelines.server.impressions import ImpressionLog
from rec_pipelines.server.limits import RequestRefused, ServerLimits, parse_json, read_body
from rec_pipelines.server.models import Arms, ModelHolder, ReloadToken

RECORD_KEYS = ("dataframe_records", "dataframe_split", "inputs", "instances")

log = logging.getLogger("recsys.serve")


class RequestBatcher:
    """Answers the requests waiting at the same moment with one ``Recommender.answer`` call per
    arm (champion, challenger).

    One worker thread runs the models; while it works, new requests queue up and go together
    into the next call (at most ``max_rows`` request rows per call). A request that arrives
    while the model is idle runs at once, alone. When a shared call fails, each request of it
    is answered alone, so only the request that fails gets the error.
    """

    def __init__(self, arms: Arms | ModelHolder, max_rows: int = 256):
        self.arms = arms if isinstance(arms, Arms) else Arms(arms)
        self.max_rows = max_rows
        self.queue: asyncio.Queue = asyncio.Queue()
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="recommend")
        self.batches = 0
        self.rows = 0
        self.failures = 0

    async def answer(self, parsed: list, arms: list[str] | None = None) -> tuple[dict[str, list], list[int], list]:
        """(answer columns, with the ``arm`` and ``model_version`` of each item; items per
        request row; the model versions that answered). ``arms`` per request row: champion,
        challenger or interleave (both lists merged by team draft)."""
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((parsed, arms or ["champion"] * len(parsed), future))
        return await future

    async def run(self) -> None:
        while True:
            jobs = [await self.queue.get()]
            rows = len(jobs[0][0])
            while not self.queue.empty() and rows < self.max_rows:
                jobs.append(self.queue.get_nowait())
                rows += len(jobs[-1][0])
            models = {arm: holder.current for arm, holder in self.arms.holders.items()}  # one model per arm and batch
            try:
                await self._answer_together(models, jobs)
            except Exception:  # noqa: BLE001 - isolate the request that fails
                if len(jobs) > 1:
                    log.warning("a batch of %d requests failed; answering each alone", len(jobs))
                for job in jobs:
                    try:
                        await self._answer_together(models, [job])
                    except Exception as error:  # noqa: BLE001 - this request, and only it, hears of it
                        self.failures += 1
                        log.exception("recommendation failed for a request of %d rows", len(job[0]))
                        if not job[2].done():
                            job[2].set_exception(error)

    async def _answer_together(self, models: dict, jobs: list) -> None:
        loop = asyncio.get_running_loop()
        positions: dict[str, list[tuple[int, int]]] = {}
        for j, (parsed, arms, _) in enumerate(jobs):
            for r, arm in enumerate(arms):
                for one in (("champion", "challenger") if arm == INTERLEAVE else (arm,)):
                    positions.setdefault(one, []).append((j, r))
        slices = {}
        for arm, where in positions.items():
            model = models[arm]
            requests = [jobs[j][0][r] for j, r in where]
            columns, counts = await loop.run_in_executor(self.executor, model.recommender.answer, requests)
            start = 0
            for (j, r), n in zip(where, counts):
                part = {name: values[start : start + n] for name, values in columns.items()}
                part["arm"], part["model_version"] = [arm] * n, [getattr(model, "version", None)] * n
                slices[j, r, arm] = part
                start += n
        self.batches += 1
        self.rows += sum(len(job[0]) for job in jobs)
        for j, (parsed, arms, future) in enumerate(jobs):
            out: dict[str, list] = {}
            counts, versions = [], set()
            for r, arm in enumerate(arms):
                if arm == INTERLEAVE:
                    part = team_draft(slices[j, r, "champion"], slices[j, r, "challenger"], parsed[r].k)
                else:
                    part = slices[j, r, arm]
                for name, values in part.items():
                    out.setdefault(name, []).extend(values)
                counts.append(len(part["item_id"]))
                versions.update(part["model_version"])
            if not future.done():  # the client may have gone
                future.set_result((out, counts, sorted(str(v) for v in versions)))


INTERLEAVE = "interleave"


def team_draft(a: dict[str, list], b: dict[str, list], k: int, rng: random.Random | None = None) -> dict[str, list]:
    """Team-draft interleaving of two ranked answers (column dicts with an ``arm`` column):
    the team with fewer picks (a coin flip on ties) adds its best item not yet taken, so each
    item keeps the ``arm`` of the team that placed it; ranks are renumbered."""
    rng = rng or random.Random()
    merged: dict[str, list] = {name: [] for name in a}
    taken: set = set()
    picks, cursor = [0, 0], [0, 0]
    teams = (a, b)
    while len(merged["item_id"]) < k and (cursor[0] < len(a["item_id"]) or cursor[1] < len(b["item_id"])):
        team = 0 if picks[0] < picks[1] or (picks[0] == picks[1] and rng.random() < 0.5) else 1
        if cursor[team] >= len(teams[team]["item_id"]):
            team = 1 - team
        source = teams[team]
        while cursor[team] < len(source["item_id"]) and source["item_id"][cursor[team]] in taken:
            cursor[team] += 1
        if cursor[team] >= len(source["item_id"]):
            picks[team] = k  # this team has nothing new left
            continue
        i = cursor[team]
        for name in merged:
            merged[name].append(source[name][i])
        taken.add(source["item_id"][i])
        picks[team] += 1
    merged["rank"] = list(range(1, len(merged["item_id"]) + 1))
    return merged


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
        if not all(isinstance(name, str) for name in columns):
            raise InvalidRequest("dataframe_split columns must be field names (strings)")
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


def encode_predictions(columns: dict[str, list], output_columns: list[str], max_bytes: int) -> bytes:
    """``{"predictions": [...]}`` as JSON bytes, refused with 413 as soon as it would pass
    ``max_bytes`` (the answer is encoded record by record, never held whole beyond the limit)."""
    encode = json.JSONEncoder().encode
    parts, size = [b'{"predictions": ['], 17
    for i, values in enumerate(zip(*(columns[c] for c in output_columns))):
        part = (", " if i else "") + encode(dict(zip(output_columns, values)))
        size += len(part)  # ASCII (ensure_ascii): characters are bytes
        if size > max_bytes:
            raise RequestRefused(413, f"the answer would be over {max_bytes} bytes: ask for fewer rows or a smaller k")
        parts.append(part.encode("ascii"))
    parts.append(b"]}")
    return b"".join(parts)


def check_size(parsed: list, limits: ServerLimits) -> None:
    if len(parsed) > limits.max_rows:
        raise RequestRefused(413, f"{len(parsed)} request rows; at most {limits.max_rows} per request")
    results = sum(request.k for request in parsed)
    if results > limits.max_results:
        raise RequestRefused(413, f"the rows ask for {results} recommendations; at most {limits.max_results} "
                                  "per request (sum of k)")


def create_app(arms: Arms | ModelHolder, max_batch_rows: int = 256, reload_interval_s: float = 0.0,
               limits: ServerLimits | None = None, impressions: ImpressionLog | None = None,
               reload_token: ReloadToken | None = None, workers: int = 1):
    """The Starlette application: /invocations, /ping, /health, /model, and POST /reload
    (check the aliases now: what the promotion step calls, so a new champion is served within
    a second instead of at the next poll). ``impressions`` records what was served.

    One of ``workers`` processes (``recsys serve --workers N``): ``/model`` and the
    ``x-recsys-worker`` header say which pid answered; ``reload_token`` passes a POST /reload
    on to the other workers (see ``ReloadToken``)."""
    from contextlib import asynccontextmanager

    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    from rec_models.serving import OUTPUT_COLUMNS, InvalidRequest, parse_rows

    limits = limits or ServerLimits()
    request_limits = limits.request_limits()
    arms = arms if isinstance(arms, Arms) else Arms(arms)
    batcher = RequestBatcher(arms, max_batch_rows)
    reloader = ThreadPoolExecutor(1, thread_name_prefix="reload")
    codes = {400: "BAD_REQUEST", 408: "REQUEST_TIMEOUT", 413: "REQUEST_TOO_LARGE"}

    def error(status: int, code: str, message: str) -> Response:
        return JSONResponse({"error_code": code, "message": message}, status_code=status)

    async def invocations(request: Request) -> Response:
        content_type = request.headers.get("content-type", "application/json")
        if "json" not in content_type:
            return error(415, "BAD_REQUEST", f"content type {content_type[:100]!r} is not supported: "
                                             "send application/json")
        try:
            payload = parse_json(await read_body(request, limits), limits.max_json_depth)
            parsed = parse_rows(request_rows(payload), request_limits)
            check_size(parsed, limits)
        except RequestRefused as exc:
            return error(exc.status, codes.get(exc.status, "BAD_REQUEST"), str(exc))
        except InvalidRequest as exc:
            return error(400, "INVALID_PARAMETER_VALUE", f"invalid request: {exc}")
        if not parsed:
            return JSONResponse({"predictions": []})
        routed = [arms.arm_of(request.user_id) for request in parsed]
        try:
            columns, counts, versions = await batcher.answer(parsed, routed)
        except Exception:  # noqa: BLE001 - logged by the batcher; no stack trace to the client
            return error(500, "INTERNAL_ERROR", "internal error while recommending (see the server log)")
        request_ids = [uuid.uuid4().hex for _ in parsed]
        columns["request_id"] = [rid for rid, n in zip(request_ids, counts) for _ in range(n)]
        try:
            body = encode_predictions(columns, [*OUTPUT_COLUMNS, "request_id"], limits.max_response_bytes)
        except RequestRefused as exc:
            return error(exc.status, codes[exc.status], str(exc))
        if impressions is not None:
            pseudonym = arms.holders["champion"].current.recommender.pseudonym
            impressions.record(request_ids, [pseudonym(request.user_id) for request in parsed], columns, counts)
        version_header = ",".join(versions)  # which model versions answered
        return Response(body, media_type="application/json",
                        headers={"x-recsys-model-version": version_header, "x-recsys-worker": str(os.getpid())})

    async def ping(request: Request) -> Response:
        return Response("\n", media_type="text/plain")

    async def model(request: Request) -> Response:
        written = {"impressions_written": impressions.written, "impression_files": impressions.files} \
            if impressions is not None else {}
        return JSONResponse({**arms.describe(), "batches": batcher.batches, "rows": batcher.rows,
                             "failed_requests": batcher.failures, **written, "worker_pid": os.getpid(),
                             "workers": workers})

    last_error: list = [None]

    async def check_aliases() -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(reloader, arms.refresh)
            last_error[0] = None
        except Exception as exc:  # noqa: BLE001 - keep serving the current model; say so once
            if str(exc) != last_error[0]:
                log.exception("cannot check %s for a new version; still serving version %s",
                              arms.holders["champion"].model_uri, arms.holders["champion"].current.version)
            last_error[0] = str(exc)

    async def reload(request: Request) -> Response:
        if reload_token is not None:
            try:
                reload_token.announce()  # the other workers check their aliases within reload_token.poll_s
            except OSError:
                log.exception("cannot tell the other workers to reload; they find the new version at their next poll")
        await check_aliases()
        return JSONResponse(arms.describe())

    async def follow_alias() -> None:
        while True:
            await asyncio.sleep(reload_interval_s)
            await check_aliases()

    async def follow_token() -> None:  # a POST /reload that another worker received
        while True:
            await asyncio.sleep(reload_token.poll_s)
            if reload_token.changed():
                await check_aliases()

    @asynccontextmanager
    async def lifespan(app):
        tasks = [asyncio.create_task(batcher.run())]
        if reload_interval_s > 0:
            tasks.append(asyncio.create_task(follow_alias()))
        if reload_token is not None:
            tasks.append(asyncio.create_task(follow_token()))
        if impressions is not None:
            tasks.append(asyncio.create_task(impressions.run()))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            batcher.executor.shutdown(wait=False, cancel_futures=True)
            reloader.shutdown(wait=False, cancel_futures=True)
            if impressions is not None:
                impressions.close()  # nothing served goes unrecorded, SIGTERM included

    routes = [Route("/invocations", invocations, methods=["POST"]), Route("/ping", ping), Route("/health", ping),
              Route("/model", model), Route("/reload", reload, methods=["POST"])]
    return Starlette(routes=routes, lifespan=lifespan)
