"""Logging for people: one event per line, key=value on a terminal, JSON with --log-json.

aiohttp logs through the standard library; those records go through the same renderer, and a
client's malformed request (bad header, bad request line) is one warning line, not a traceback.
"""

from __future__ import annotations

import logging
import sys

import orjson
import structlog
from aiohttp import http_exceptions


def _orjson_dumps(value: object, **_: object) -> str:
    return orjson.dumps(value, default=str).decode()


class _ClientProtocolErrors(logging.Filter):
    """aiohttp reports a client's malformed HTTP with a traceback; it is the client's fault."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], http_exceptions.HttpProcessingError):
            error = record.exc_info[1]
            record.msg = "bad HTTP request from client: %s"
            record.args = (getattr(error, "message", str(error)),)
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info = None
            record.exc_text = None
        return True


def _traceback_formatter() -> structlog.typing.ExceptionRenderer:
    """Tracebacks without local variables: a frame's locals hold request headers and keys.
    (structlog's defaults, rich and better-exceptions, both print them when installed.)"""
    try:
        import rich  # noqa: F401
    except ImportError:
        return structlog.dev.plain_traceback
    return structlog.dev.RichTracebackFormatter(show_locals=False)


def configure_logging(*, json: bool = False, level: str = "info") -> None:
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if json:
        renderer: structlog.typing.Processor = structlog.processors.JSONRenderer(_orjson_dumps)
        shared_tail: list[structlog.typing.Processor] = [structlog.processors.format_exc_info]
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty(), exception_formatter=_traceback_formatter())
        shared_tail = []
    structlog.configure(
        processors=[*shared, *shared_tail, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
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
