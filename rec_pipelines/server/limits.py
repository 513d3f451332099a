"""What one client may ask of ``recsys serve``: size, depth and time limits with safe defaults,
each a command-line flag, and the pieces that enforce them before a request reaches the model
(the body reader, the JSON depth check, the header timeout on the HTTP protocol)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
from dataclasses import dataclass, field

from rec_models.serving.requests import MAX_CONTEXT_CHARS, MAX_ID_CHARS, MAX_IDS, MAX_K, RequestLimits


class RequestRefused(Exception):
    """A request refused before the model sees it: ``status`` is the HTTP answer."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ServerLimits:
    """Every limit of ``recsys serve`` (flags ``--max-body-bytes`` etc.).

    Memory: at most ``max_connections`` requests are in the server at once (more get 503), each
    holding at most ``max_body_bytes`` of body, its parsed JSON and ``max_response_bytes`` of
    answer, so the server's memory above the loaded model is bounded by roughly
    ``max_connections * (10 * max_body_bytes + 2 * max_response_bytes)`` (about 700 MB with the
    defaults; step 4 of ``benchmarks/serving.py`` measures it under a barrage).
    """

    max_body_bytes: int = field(default=256 * 1024, metadata={"help": "request body size (413 beyond)"})
    max_json_depth: int = field(default=16, metadata={"help": "nesting of arrays/objects in the body (400 beyond)"})
    max_rows: int = field(default=100, metadata={"help": "request rows in one request (413 beyond)"})
    max_results: int = field(default=10_000, metadata={"help": "sum of k over a request's rows (413 beyond)"})
    max_response_bytes: int = field(default=4 * 1024 * 1024, metadata={"help": "answer size (413 beyond)"})
    max_k: int = field(default=MAX_K, metadata={"help": "recommendations per row (400 beyond)"})
    max_id_chars: int = field(default=MAX_ID_CHARS, metadata={"help": "length of a user or item id (400 beyond)"})
    max_ids: int = field(default=MAX_IDS, metadata={"help": "ids in recent_item_ids or exclude (400 beyond)"})
    max_context_chars: int = field(default=MAX_CONTEXT_CHARS, metadata={"help": "length of context_text"})
    header_timeout_s: float = field(default=10.0, metadata={"help": "seconds to send the request headers"})
    body_timeout_s: float = field(default=10.0, metadata={"help": "seconds to send the body (408 beyond)"})
    max_connections: int = field(default=64, metadata={"help": "open connections and requests (503 beyond)"})

    def request_limits(self) -> RequestLimits:
        return RequestLimits(max_k=self.max_k, max_id_chars=self.max_id_chars, max_ids=self.max_ids,
                             max_context_chars=self.max_context_chars)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("limits (what one client may ask)")
        for item in dataclasses.fields(cls):
            group.add_argument(f"--{item.name.replace('_', '-')}", type=type(item.default), default=item.default,
                               help=f"{item.metadata['help']} (default: %(default)s)")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServerLimits:
        return cls(**{item.name: getattr(args, item.name) for item in dataclasses.fields(cls)})


async def read_body(request, limits: ServerLimits) -> bytes:
    """The request body, refused with 413 past ``max_body_bytes`` (by its Content-Length or as
    it arrives) and with 408 when it takes longer than ``body_timeout_s``."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise RequestRefused(413, f"request body of {declared} bytes is over the limit of {limits.max_body_bytes}")

    async def receive() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.max_body_bytes:
                raise RequestRefused(413, f"request body is over the limit of {limits.max_body_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(receive(), limits.body_timeout_s)
    except TimeoutError:
        raise RequestRefused(408, f"the request body did not arrive within {limits.body_timeout_s:g} s") from None


def parse_json(body: bytes, max_depth: int) -> object:
    """The JSON document in ``body``; 400 when it is not JSON or nests deeper than ``max_depth``."""
    try:
        payload = json.loads(body)
    except RecursionError:
        raise RequestRefused(400, f"the JSON nests deeper than {max_depth} levels") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestRefused(400, f"the request body is not valid JSON: {exc}"[:300]) from None
    level, depth = [payload], 0
    while level:  # breadth-first, so no recursion here either
        depth += 1
        if depth > max_depth:
            raise RequestRefused(400, f"the JSON nests deeper than {max_depth} levels")
        level = [child for node in level if isinstance(node, (dict, list))
                 for child in (node.values() if isinstance(node, dict) else node) if isinstance(child, (dict, list))]
    return payload


MAX_HEADER_BYTES = 64 * 1024


def timed_protocol(header_timeout_s: float, max_header_bytes: int = MAX_HEADER_BYTES):
    """uvicorn's httptools protocol, closing connections whose request line and headers take
    longer than ``header_timeout_s`` or pass ``max_header_bytes`` (uvicorn itself waits forever
    for a partial request line and keeps every header byte it is sent)."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class HeaderTimeoutProtocol(HttpToolsProtocol):
        _header_timer = None
        _header_bytes = 0

        def on_url(self, url: bytes) -> None:
            self._count(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count(len(name) + len(value))
            super().on_header(name, value)

        def _count(self, size: int) -> None:
            self._header_bytes += size
            if self._header_bytes > max_header_bytes and not self.transport.is_closing():
                self.send_400_response(f"request headers over {max_header_bytes} bytes")

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout_s, self._expire)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _expire(self) -> None:
            if not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()  # the first request's headers must arrive in time

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._header_bytes = 0
            self._arm()  # a keep-alive connection's next request too

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeaderTimeoutProtocol
