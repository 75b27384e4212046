"""The HTTP front: every request is routed, keyed, then handed to the mode."""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import signal
from collections import OrderedDict
from typing import Any
from urllib.parse import parse_qsl

import structlog
from aiohttp import web

from llmproxy.call import Call, Outcome, error_response
from llmproxy.canonical import CanonicalRequest, RawBody, parse_body
from llmproxy.config import Settings, validate_timing
from llmproxy.modes.base import Mode
from llmproxy.modes.record import RecordMode
from llmproxy.modes.replay import Replayer, ReplayMode
from llmproxy.routing import Refusal, Router
from llmproxy.store.directory import RecordingStore
from llmproxy.store.index import RecordingIndex, canonical_for_route
from llmproxy.store.secrets import SecretScanner
from llmproxy.store.writer import Recorder
from llmproxy.tools.report import build_report, write_report
from llmproxy.upstream.client import Forwarder
from llmproxy.upstream.singleflight import SUPPORTED as INFLIGHT_SUPPORTED
from llmproxy.upstream.singleflight import InFlight

log = structlog.get_logger("llmproxy.server")


def record_command(settings: Settings) -> str:
    """The command that records what a replay missed, with this run's directory and config."""
    parts = ["llmproxy record --missing", f"--recordings {settings.recordings}"]
    if settings.config_path is not None:
        parts.append(f"--config {settings.config_path}")
    return " ".join(parts)


def build_mode(settings: Settings, mode_name: str, router: Router) -> Mode:
    store = RecordingStore(settings.recordings, durable=settings.durable_writes)
    outcome = Outcome()

    def forwarder() -> Forwarder:
        return Forwarder(
            outcome,
            connect_timeout=settings.connect_timeout,
            read_timeout=settings.read_timeout,
            drain_on_disconnect=settings.client_disconnect == "drain",
        )

    def replayer(recording: bool = False) -> Replayer:
        return Replayer(
            RecordingIndex(router),
            outcome,
            store,
            speed=validate_timing(settings.timing),
            repeat_last=settings.after_last == "repeat",
            record_command=record_command(settings),
            record_exhausted=recording,
        )

    if mode_name in ("record", "record-missing"):
        recorder = Recorder(
            store, outcome, scanner=SecretScanner(settings.secret_patterns), record_errors=settings.record_errors
        )
        return RecordMode(
            forwarder(),
            recorder,
            replayer(recording=True) if mode_name == "record-missing" else None,
            InFlight(settings.recordings) if INFLIGHT_SUPPORTED else None,
        )
    if mode_name == "replay":
        return ReplayMode(replayer(), forwarder() if settings.on_miss == "forward" else None)
    raise ValueError(f"unknown mode {mode_name!r}")


ALLOWED_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
TOKEN_HEADER = "x-llmproxy-token"


# Test suites send the same requests again and again: their keys are remembered (by exact
# bytes), so parsing and hashing happen once per distinct request, not once per request.
KEY_MEMO_SIZE = 4096
KEY_MEMO_MAX_BODY = 64 * 1024


def build_app(settings: Settings, router: Router, mode: Mode) -> web.Application:
    keys: OrderedDict[tuple[object, ...], tuple[object, CanonicalRequest]] = OrderedDict()

    async def handle(request: web.Request) -> web.StreamResponse:
        if settings.token is not None and not hmac.compare_digest(
            request.headers.get(TOKEN_HEADER, "").encode(), settings.token.encode()
        ):
            log.warning("client refused: missing or wrong token", path=request.path, peer=request.remote)
            return error_response(None, 401, f"this llmproxy needs the {TOKEN_HEADER} header", "proxy_token_required")
        if request.method not in ALLOWED_METHODS:
            log.warning("method not allowed", method=request.method, path=request.path)
            return error_response(None, 405, f"method {request.method} is not proxied", "method_not_allowed")
        match = router.route(request.method, request.path, request.headers, request.query_string, request.host)
        if isinstance(match, Refusal):
            log.warning("request refused", code=match.code, method=request.method, path=request.path)
            return error_response(match.route, match.status, match.message, match.code)
        route = match.route
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            log.warning("request body too large", path=request.path, limit=settings.max_body_bytes)
            return error_response(
                route, 413, f"request body exceeds the {settings.max_body_bytes} byte limit", "body_too_large"
            )
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
        )
        return await mode.handle(request, call)

    async def on_startup(_: web.Application) -> None:
        await mode.start()

    async def on_cleanup(_: web.Application) -> None:
        await mode.close()

    app = web.Application(client_max_size=settings.max_body_bytes)
    app.router.add_route("*", "/{tail:.*}", handle)
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
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
        self.mode = build_mode(settings, mode_name, self.router)
        self.app = build_app(settings, self.router, self.mode)
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
            self.app, access_log=None, handle_signals=False, shutdown_timeout=self.settings.shutdown_timeout
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.settings.host, self.settings.port)
        await site.start()
        addresses = self._runner.addresses
        if addresses:
            self.port = addresses[0][1]
        log.info(
            "listening",
            mode=self.mode.name,
            host=self.settings.host,
            port=self.port,
            url=f"http://{self.settings.host}:{self.port}",
        )
        if wait_ready:
            await self.mode.wait_ready()
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        report = self.report()
        if self.settings.report is not None:
            write_report(self.settings.report, report)
        log.info(
            "summary",
            mode=self.mode.name,
            hits=report["hits"],
            misses=len(report["misses"]),
            recorded=len(report["recorded"]),
            forwarded=self.mode.outcome.forwarded,
            unused="-" if report["unused"] is None else len(report["unused"]),
            errors=report["errors"],
            refused=report["refused"],
            report=str(self.settings.report) if self.settings.report else None,
        )

    def report(self) -> dict[str, Any]:
        mode = self.mode
        replayer = getattr(mode, "replayer", None)
        recorder = getattr(mode, "recorder", None)
        unused = None
        if replayer is not None:
            unused = [entry.source for entry in replayer.unused() if entry.source is not None]
        recorded = list(recorder.written) if recorder is not None else []
        return build_report(mode.name, mode.outcome, self.settings.recordings, recorded, unused)


async def serve(settings: Settings, mode_name: str) -> None:
    """Run until SIGINT/SIGTERM, then finish in-flight writes and print the summary."""
    server = ProxyServer(settings, mode_name)
    await server.start(wait_ready=False)  # serve while the recordings load
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        await server.stop()
