"""The last resort: an exception nobody expected never reaches a client as a bare 500 nor the log
as a traceback with data in it.

The client gets an error in its route's provider shape (so SDKs surface it) with an error id;
the log gets one line with the same id, the exception's type, where it was raised (file, line,
function: no local variables) and its message with every credential this request carried, and
every known key shape, redacted.
"""

from __future__ import annotations

import asyncio
import secrets
import time
import traceback
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any
from urllib.parse import parse_qsl

import structlog
from aiohttp import web

from llmproxy.call import error_response
from llmproxy.errors import ResponseAbandoned
from llmproxy.routing import Route
from llmproxy.store.secrets import SecretScanner, request_credentials

log = structlog.get_logger("llmproxy.server")

ERROR_ID_HEADER = "x-llmproxy-error-id"
# What of an exception's message is logged: enough to tell errors apart, never a whole body.
MAX_DETAIL = 300

_scanner = SecretScanner()


def _where(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "-"
    frame = frames[-1]
    return f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno} in {frame.name}"


def redacted(text: str, headers: Mapping[str, str], query: Iterable[tuple[str, str]]) -> str:
    """`text` on one line, bounded, with this request's credentials and any key shape replaced."""
    text = _scanner.redact_text(text, request_credentials(headers, query))
    text = " ".join(text.split())
    return text if len(text) <= MAX_DETAIL else text[:MAX_DETAIL] + "..."


def report_unexpected(
    exc: BaseException, headers: Mapping[str, str], query: Iterable[tuple[str, str]], **context: Any
) -> str:
    """Log an unexpected exception as one redacted line; the error id to give the client."""
    error_id = secrets.token_hex(6)
    log.error(
        "internal error",
        error_id=error_id,
        error=type(exc).__name__,
        detail=redacted(str(exc), headers, query),
        where=_where(exc),
        **context,
    )
    return error_id


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def answer_unexpected(
    request: web.Request, exc: Exception, resolve: Callable[[web.Request], Route | None]
) -> web.StreamResponse:
    """The last resort's answer to an exception nobody expected: logged as one redacted line, and
    an error in the route's shape (`resolve` names it) with its id, or the connection cut when
    part of an answer is already out."""
    headers = {name.lower(): value for name, value in request.headers.items()}
    query = parse_qsl(request.query_string, keep_blank_values=True)
    error_id = report_unexpected(exc, headers, query, method=request.method, path=request.path)
    if request.writer is not None and request.writer.output_size > 0:
        # Part of an answer is out: the only honest end is to cut the connection.
        if request.transport is not None:
            request.transport.close()
        raise ResponseAbandoned(f"internal error {error_id} after the response started") from None
    try:
        route = resolve(request)
    except Exception:  # noqa: BLE001 - the error still gets an answer, in the default shape
        route = None
    message = f"llmproxy failed on this request (error id {error_id}; its log has the details)"
    return error_response(route, 500, message, "internal_error", headers={ERROR_ID_HEADER: error_id})


class LoopErrors:
    """The event loop's exception handler: one line per kind of error, no traceback, and repeats
    of a kind within `interval` seconds collapsed into a count on its next line. Out of
    descriptors, asyncio reports every failed accept (hundreds a second, rising): one line
    every `interval` seconds says it all."""

    MAX_KINDS = 1000

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._repeated: dict[str, int] = {}

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        message = str(context.get("message") or "event loop error").splitlines()[0]
        exc = context.get("exception")
        kind = f"{message}|{type(exc).__name__}"
        now = time.monotonic()
        last = self._last.get(kind)
        if last is not None and now - last < self.interval:
            self._repeated[kind] = self._repeated.get(kind, 0) + 1
            return
        if len(self._last) >= self.MAX_KINDS:
            self._last.clear()
            self._repeated.clear()
        self._last[kind] = now
        repeated = self._repeated.pop(kind, 0)
        log.error(
            "event loop error",
            message=message,
            error=type(exc).__name__ if exc is not None else None,
            detail=redacted(str(exc), {}, ()) if exc is not None else None,
            where=_where(exc) if exc is not None else None,
            repeated_since_last=repeated if last is not None else None,
        )


def install_loop_errors(loop: asyncio.AbstractEventLoop) -> None:
    loop.set_exception_handler(LoopErrors())
