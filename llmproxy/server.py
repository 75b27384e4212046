"""The HTTP front: checks (middlewares), routing and keying, then the pipeline decides."""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import signal
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl

import structlog
from aiohttp import web

from llmproxy.call import Call, Outcome, error_response
from llmproxy.canonical import CanonicalRequest, RawBody, parse_body
from llmproxy.config import Settings, validate_timing
from llmproxy.pipeline import MODES, MissPolicy, Pipeline, RecordPolicy
from llmproxy.playback import Playback
from llmproxy.routing import Refusal, Router
from llmproxy.store.directory import RecordingStore
from llmproxy.store.index import RecordingIndex, canonical_for_route
from llmproxy.store.secrets import SecretScanner
from llmproxy.store.writer import Recorder
from llmproxy.tools.report import build_report, write_report
from llmproxy.upstream.client import AiohttpUpstream
from llmproxy.upstream.singleflight import SUPPORTED as INFLIGHT_SUPPORTED
from llmproxy.upstream.singleflight import InFlight

log = structlog.get_logger("llmproxy.server")


def record_command(settings: Settings) -> str:
    """The command that records what a replay missed, with this run's directory and config."""
    if settings.record_hint is not None:  # set by `run` and the pytest plugin
        return settings.record_hint
    parts = ["llmproxy record --missing", f"--recordings {settings.recordings}"]
    if settings.config_path is not None:
        parts.append(f"--config {settings.config_path}")
    return " ".join(parts)


def build_pipeline(settings: Settings, mode_name: str) -> Pipeline:
    """The pipeline for a CLI mode: `record`, `record-missing` or `replay` (see pipeline.MODES)."""
    try:
        record = MODES[mode_name]
    except KeyError:
        raise ValueError(f"unknown mode {mode_name!r}") from None
    on_miss = MissPolicy(settings.on_miss) if record is RecordPolicy.OFF else MissPolicy.ERROR
    store = RecordingStore(settings.recordings, durable=settings.durable_writes)
    outcome = Outcome()
    upstream = None
    if record is not RecordPolicy.OFF or on_miss is MissPolicy.FORWARD:
        upstream = AiohttpUpstream(connect_timeout=settings.connect_timeout, read_timeout=settings.read_timeout)
    playback = None
    if record is not RecordPolicy.ALL:
        playback = Playback(
            RecordingIndex(settings.router()),
            store,
            speed=validate_timing(settings.timing),
            # In record --missing with after_last "error", a call asked more often than recorded
            # is recorded as a new repeat.
            repeat_last=settings.after_last == "repeat",
            record_command=record_command(settings),
        )
    recorder = None
    if record is not RecordPolicy.OFF:
        recorder = Recorder(
            store, outcome, scanner=SecretScanner(settings.secret_patterns), record_errors=settings.record_errors
        )
    return Pipeline(
        name=mode_name,
        record=record,
        on_miss=on_miss,
        outcome=outcome,
        upstream=upstream,
        playback=playback,
        recorder=recorder,
        inflight=InFlight(settings.recordings) if INFLIGHT_SUPPORTED and settings.share_inflight else None,
        share_inflight=settings.share_inflight,
        record_after_disconnect=settings.client_disconnect == "drain",
        max_recording_bytes=settings.max_recording_bytes,
    )


ALLOWED_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
TOKEN_HEADER = "x-llmproxy-token"

SETTINGS = web.AppKey("settings", Settings)
ROUTER = web.AppKey("router", Router)
PIPELINE = web.AppKey("pipeline", Pipeline)


# Test suites send the same requests again and again: their keys are remembered (by exact
# bytes), so parsing and hashing happen once per distinct request, not once per request.
KEY_MEMO_SIZE = 4096
KEY_MEMO_MAX_BODY = 64 * 1024

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def token_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    token = request.app[SETTINGS].token
    if token is not None and not hmac.compare_digest(
        request.headers.get(TOKEN_HEADER, "").encode("utf-8", "surrogateescape"), token.encode()
    ):
        log.warning("client refused: missing or wrong token", path=request.path, peer=request.remote)
        return error_response(None, 401, f"this llmproxy needs the {TOKEN_HEADER} header", "proxy_token_required")
    return await handler(request)


@web.middleware
async def method_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.method not in ALLOWED_METHODS:
        log.warning("method not allowed", method=request.method, path=request.path)
        return error_response(None, 405, f"method {request.method} is not proxied", "method_not_allowed")
    return await handler(request)


@web.middleware
async def body_size_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse a body over max_body_mb (by its announced length, or while reading it)."""
    limit = request.app[SETTINGS].max_body_bytes
    too_large = request.content_length is not None and request.content_length > limit
    if not too_large:
        try:
            await request.read()  # kept by aiohttp: the handler reads it again for free
        except web.HTTPRequestEntityTooLarge:
            too_large = True
    if too_large:
        log.warning("request body too large", path=request.path, limit=limit)
        match = request.app[ROUTER].resolve(request.method, request.path, request.headers)
        return error_response(
            match.route if match else None, 413, f"request body exceeds the {limit} byte limit", "body_too_large"
        )
    return await handler(request)


def build_app(settings: Settings, router: Router, pipeline: Pipeline) -> web.Application:
    keys: OrderedDict[tuple[object, ...], tuple[object, CanonicalRequest]] = OrderedDict()

    async def handle(request: web.Request) -> web.StreamResponse:
        match = router.route(request.method, request.path, request.headers, request.query_string, request.host)
        if isinstance(match, Refusal):
            log.warning("request refused", code=match.code, method=request.method, path=request.path)
            return error_response(match.route, match.status, match.message, match.code)
        route = match.route
        body = await request.read()
        query = parse_qsl(request.query_string, keep_blank_values=True)
        headers = {name.lower(): value for name, value in request.headers.items()}
        content_type = request.headers.get("Content-Type", "")
        memo_key = (route.name, request.method, match.path, request.query_string, content_type, body)
        memo_key += tuple(headers.get(name) for name in route.key_headers)  # type: ignore[assignment]
        known = keys.get(memo_key) if len(body) <= KEY_MEMO_MAX_BODY else None
        if known is not None:
            body_value, canonical = known
        else:
            body_value = parse_body(body, content_type)
            if isinstance(body_value, RawBody) and content_type.lower().startswith("application/json"):
                # Forwarding it would only record the upstream's complaint about our client's bug.
                log.warning("request body is not valid JSON", method=request.method, path=request.path, size=len(body))
                return error_response(
                    route,
                    400,
                    "the request body is not valid JSON (UTF-8) though its content type says so",
                    "invalid_json",
                )
            canonical = canonical_for_route(route, request.method, match.path, query, headers, body_value)
            if len(body) <= KEY_MEMO_MAX_BODY:
                keys[memo_key] = (body_value, canonical)
                if len(keys) > KEY_MEMO_SIZE:
                    keys.popitem(last=False)
        call = Call(
            route=route,
            method=request.method.upper(),
            path=match.path,
            query_string=request.query_string,
            query=query,
            headers=headers,
            body=body,
            body_value=body_value,
            canonical=canonical,
            raw_headers=list(request.headers.items()),
        )
        return await request.app[PIPELINE].handle(request, call)

    async def pipeline_context(app: web.Application) -> AsyncIterator[None]:
        await app[PIPELINE].start()
        yield
        await app[PIPELINE].close(grace=app[SETTINGS].shutdown_timeout)

    app = web.Application(
        client_max_size=settings.max_body_bytes,
        middlewares=[token_middleware, method_middleware, body_size_middleware],
    )
    app[SETTINGS] = settings
    app[ROUTER] = router
    app[PIPELINE] = pipeline
    app.router.add_route("*", "/{tail:.*}", handle)
    app.cleanup_ctx.append(pipeline_context)
    return app


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ProxyServer:
    """The proxy bound to a socket; port 0 picks a free port (see `.port` after start)."""

    def __init__(self, settings: Settings, mode_name: str) -> None:
        self.settings = settings
        self.router = settings.router()
        self.pipeline = build_pipeline(settings, mode_name)
        self.app = build_app(settings, self.router, self.pipeline)
        self._runner: web.AppRunner | None = None
        self.port: int = settings.port

    async def start(self, *, wait_ready: bool = True) -> int:
        """Listen; with wait_ready, return only once the recordings are loaded."""
        if not _is_loopback(self.settings.host):
            log.warning(
                "listening on a non-loopback address: anyone who can reach it can use it",
                host=self.settings.host,
                token_required=self.settings.token is not None,
            )
        self._runner = web.AppRunner(
            self.app,
            access_log=None,
            handle_signals=False,
            shutdown_timeout=self.settings.shutdown_timeout,
            # A client that leaves cancels its handler at once, also while the upstream is
            # silent: the pipeline then closes the upstream call (or reads it on to record it).
            handler_cancellation=True,
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.settings.host, self.settings.port)
        await site.start()
        addresses = self._runner.addresses
        if addresses:
            self.port = addresses[0][1]
        log.info(
            "listening",
            mode=self.pipeline.name,
            host=self.settings.host,
            port=self.port,
            url=f"http://{self.settings.host}:{self.port}",
        )
        if wait_ready:
            await self.pipeline.wait_ready()
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            # One shutdown_timeout in all: what the handlers use of it is not given again to the
            # calls still reading their upstream to record it.
            self.pipeline.stop_by = time.monotonic() + self.settings.shutdown_timeout
            await self._runner.cleanup()
            self._runner = None
        report = self.report()
        if self.settings.report is not None:
            write_report(self.settings.report, report)
        outcome = self.pipeline.outcome
        log.info(
            "summary",
            mode=self.pipeline.name,
            hits=report["hits"],
            misses=len(report["misses"]),
            recorded_misses=len(report["recorded_misses"]),
            recorded=len(report["recorded"]),
            forwarded=outcome.forwarded,
            shared=outcome.shared,
            unused="-" if report["unused"] is None else len(report["unused"]),
            errors=report["errors"],
            not_recorded=report["not_recorded"],
            refused=report["refused"],
            report=str(self.settings.report) if self.settings.report else None,
        )

    @property
    def mode(self) -> Pipeline:
        """The pipeline (the name tests and the plugin have used for it)."""
        return self.pipeline

    def report(self) -> dict[str, Any]:
        pipeline = self.pipeline
        return build_report(
            pipeline.name, pipeline.outcome, self.settings.recordings, pipeline.recorded(), pipeline.unused()
        )


async def serve(settings: Settings, mode_name: str) -> None:
    """Run until SIGINT/SIGTERM, then finish in-flight writes and print the summary."""
    server = ProxyServer(settings, mode_name)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Before listening: a signal right after the `listening` line must still stop cleanly.
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await server.start(wait_ready=False)  # serve while the recordings load
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        await server.stop()
