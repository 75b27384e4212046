"""The HTTP front: every request is routed, keyed, then handed to the mode."""

from __future__ import annotations

import asyncio
import signal
import time
from urllib.parse import parse_qsl

import structlog
from aiohttp import web

from llmproxy.config import Settings, validate_timing
from llmproxy.index import RecordingIndex, canonical_for_route
from llmproxy.matching import parse_body
from llmproxy.modes.base import Call, Mode, error_response
from llmproxy.modes.record import RecordMode
from llmproxy.modes.replay import ReplayMode
from llmproxy.routing import Router
from llmproxy.store import RecordingStore

log = structlog.get_logger("llmproxy.server")

MODE_KEY = web.AppKey("mode", object)


def build_mode(settings: Settings, mode_name: str, router: Router) -> Mode:
    store = RecordingStore(settings.recordings)
    if mode_name == "record":
        return RecordMode(store, connect_timeout=settings.connect_timeout, read_timeout=settings.read_timeout)
    if mode_name == "replay":
        index = RecordingIndex(router)
        index.load_store(store)
        log.info(
            "recordings loaded",
            directory=str(settings.recordings),
            recordings=len(index),
            skipped=len(index.problems),
        )
        return ReplayMode(index, speed=validate_timing(settings.timing), recordings_hint=str(settings.recordings))
    raise ValueError(f"unknown mode {mode_name!r}")


def build_app(settings: Settings, router: Router, mode: Mode) -> web.Application:
    async def handle(request: web.Request) -> web.StreamResponse:
        match = router.resolve(request.method, request.path, request.headers)
        if match is None:
            log.warning("no route", method=request.method, path=request.path)
            return error_response(None, 404, f"no route for {request.method} {request.path}", "no_route")
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
        body_value = parse_body(body, request.headers.get("Content-Type", ""))
        canonical = canonical_for_route(route, request.method, match.path, query, headers, body_value)
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
            started=time.monotonic(),
        )
        return await mode.handle(request, call)

    async def on_startup(_: web.Application) -> None:
        await mode.start()

    async def on_cleanup(_: web.Application) -> None:
        await mode.close()

    app = web.Application(client_max_size=settings.max_body_bytes)
    app[MODE_KEY] = mode
    app.router.add_route("*", "/{tail:.*}", handle)
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app


class ProxyServer:
    """The proxy bound to a socket; port 0 picks a free port (see `.port` after start)."""

    def __init__(self, settings: Settings, mode_name: str) -> None:
        self.settings = settings
        self.router = settings.router()
        self.mode = build_mode(settings, mode_name, self.router)
        self.app = build_app(settings, self.router, self.mode)
        self._runner: web.AppRunner | None = None
        self.port: int = settings.port

    async def start(self) -> int:
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
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
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        outcome = self.mode.outcome
        log.info(
            "summary",
            mode=self.mode.name,
            hits=outcome.hits,
            misses=outcome.misses,
            recorded=outcome.recorded,
            forwarded=outcome.forwarded,
            errors=outcome.errors,
        )


async def serve(settings: Settings, mode_name: str) -> None:
    """Run until SIGINT/SIGTERM, then finish in-flight writes and print the summary."""
    server = ProxyServer(settings, mode_name)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        await server.stop()
