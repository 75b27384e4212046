"""Logging for people: one event per line, key=value on a terminal, JSON with --log-json.

Each event names its logger (`llmproxy.server`, `llmproxy.replay`, ...), so a line says which
part of the proxy wrote it.

aiohttp logs through the standard library; those records go through the same renderer, and a
client's malformed request (bad header, bad request line) is one warning line, not a traceback.
"""

from __future__ import annotations

import logging
import sys
from contextvars import ContextVar
from typing import TextIO

import orjson
import structlog
from aiohttp import http_exceptions
from aiohttp.web_protocol import RequestPayloadError

from llmproxy.errors import ResponseAbandoned


def _orjson_dumps(value: object, **_: object) -> str:
    return orjson.dumps(value, default=str).decode()


class _NamedPrintLogger(structlog.PrintLogger):
    """A PrintLogger that remembers the name it was asked for (structlog.get_logger(name))."""

    def __init__(self, file: TextIO, name: str) -> None:
        super().__init__(file)
        self.name = name


def _named_logger_factory(*args: object) -> _NamedPrintLogger:
    return _NamedPrintLogger(sys.stderr, str(args[0]) if args else "llmproxy")


def add_logger_name(logger: object, _method: str, event_dict: structlog.typing.EventDict) -> structlog.typing.EventDict:
    """Put the logger's name into the event (structlog's own processor needs stdlib loggers)."""
    name = getattr(logger, "name", None)
    if name and "logger" not in event_dict:
        event_dict["logger"] = name
    return event_dict


class RequestContext:
    """What every log line caused by a request says about it: set once per request, filled in as
    it is known (route and key after routing), read only when a line is actually logged."""

    __slots__ = ("method", "path", "route", "key")

    def __init__(self, method: str, path: str) -> None:
        self.method, self.path = method, path
        self.route: str | None = None
        self.key: str | None = None

    def update(self, route: str, key: str) -> None:
        self.route, self.key = route, key


_request: ContextVar[RequestContext | None] = ContextVar("llmproxy_request", default=None)
_NO_REQUEST = RequestContext("", "")


def bind_request(method: str, path: str) -> RequestContext:
    """The context of the request now served (tasks it starts see it too): one variable set, no
    per-key bookkeeping; a connection's earlier request is replaced."""
    context = RequestContext(method, path)
    _request.set(context)
    return context


def request_context() -> RequestContext:
    return _request.get() or _NO_REQUEST


def merge_request_context(
    _logger: object, _method: str, event_dict: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    """Add the request's method, path, route and key (key: 16 characters) to a line that has not
    set them itself."""
    context = _request.get()
    if context is not None:
        event_dict.setdefault("method", context.method)
        event_dict.setdefault("path", context.path)
        if context.route is not None:
            event_dict.setdefault("route", context.route)
            event_dict.setdefault("key", context.key[:16] if context.key else context.key)
    return event_dict


# Whether debug lines are logged at all: hot paths test it before building a debug line (with
# loggers not cached, even a filtered-out call builds a bound logger). True until configured.
_debug = True


def debug_enabled() -> bool:
    return _debug


class _ClientProtocolErrors(logging.Filter):
    """aiohttp reports a client's malformed HTTP with a traceback; it is the client's fault."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, ResponseAbandoned):
            return False  # the last-resort middleware logged it, redacted, with its id
        if isinstance(error, ConnectionResetError) and not isinstance(error, http_exceptions.HttpProcessingError):
            # The client left while aiohttp itself was answering (e.g. 100-continue): no traceback.
            record.msg, record.args = "client connection lost: %s", (str(error),)
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info = None
            record.exc_text = None
            return True
        if isinstance(error, RequestPayloadError) and isinstance(error.__cause__, http_exceptions.HttpProcessingError):
            # A body aiohttp could not decode (bad Content-Encoding), seen again as it drains it
            # after the handler answered 400.
            error = error.__cause__
        if record.exc_info and isinstance(error, http_exceptions.HttpProcessingError):
            record.msg = "bad HTTP request from client: %s"
            # aiohttp's message spans lines (the bad header, a caret): one line in the log.
            record.args = (" ".join(str(getattr(error, "message", error)).split()),)
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info = None
            record.exc_text = None
        return True


def configure_logging(*, json: bool = False, level: str = "info") -> None:
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    global _debug
    _debug = numeric <= logging.DEBUG
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        merge_request_context,
        add_logger_name,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if json:
        renderer: structlog.typing.Processor = structlog.processors.JSONRenderer(_orjson_dumps)
        shared_tail: list[structlog.typing.Processor] = [structlog.processors.format_exc_info]
    else:
        # Plain tracebacks: structlog's defaults when rich or better-exceptions is installed
        # print every frame's local variables (request headers, keys) and are slow to render.
        renderer = structlog.dev.ConsoleRenderer(
            colors=sys.stderr.isatty(), exception_formatter=structlog.dev.plain_traceback
        )
        shared_tail = []
    structlog.configure(
        processors=[*shared, *shared_tail, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=_named_logger_factory,
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processor=renderer,
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared, *shared_tail],
        )
    )
    handler.addFilter(_ClientProtocolErrors())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(numeric, logging.WARNING))  # libraries: only what needs attention
