"""The HTTP front: checks (middlewares), routing and keying, then the pipeline decides."""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl

import structlog
from aiohttp import HttpVersion11, web
from multidict import CIMultiDict

from llmproxy.call import Call, Outcome, error_response
from llmproxy.canonical import BadRequest, KeyMemo, RawBody, header_bytes, parse_body
from llmproxy.config import Settings, validate_timing
from llmproxy.intake import read_body, token_matches
from llmproxy.lastresort import answer_unexpected, install_loop_errors
from llmproxy.logs import bind_request, request_context
from llmproxy.pipeline import MODES, MissPolicy, Pipeline, RecordPolicy
from llmproxy.playback import Playback
from llmproxy.routing import Refusal, Route, Router
from llmproxy.store.base import Store, is_remote, normalize_location, open_store
from llmproxy.store.directory import RecordingStore
from llmproxy.store.index import RecordingIndex, canonical_for_route
from llmproxy.store.journal import recover as recover_journals
from llmproxy.store.secrets import SecretScanner, request_credentials
from llmproxy.store.writer import Recorder
from llmproxy.tools.report import build_report, replay_savings, write_report
from llmproxy.upstream.client import AiohttpUpstream
from llmproxy.upstream.http1 import Http1Upstream
from llmproxy.upstream.redislock import RedisInFlight
from llmproxy.upstream.singleflight import SUPPORTED as INFLIGHT_SUPPORTED
from llmproxy.upstream.singleflight import InFlight

log = structlog.get_logger("llmproxy.server")


def record_command(settings: Settings) -> str:
    """The command that records what a replay missed, with this run's directory and config."""
    if settings.record_hint is not None:  # set by `run` and the pytest plugin
        return settings.record_hint
    parts = ["llmproxy record --missing", f"--recordings {normalize_location(settings.recordings)}"]
    if settings.config_path is not None:
        parts.append(f"--config {settings.config_path}")
    return " ".join(parts)


def build_pipeline(settings: Settings, mode_name: str, *, switchable: bool = False) -> Pipeline:
    """The pipeline for a CLI mode: `record`, `record-missing` or `replay` (see pipeline.MODES).
    `switchable` (the pytest plugin) builds every part, so a test can have a mode of its own."""
    try:
        record = MODES[mode_name]
    except KeyError:
        raise ValueError(f"unknown mode {mode_name!r}") from None
    on_miss = MissPolicy(settings.on_miss) if record is RecordPolicy.OFF or switchable else MissPolicy.ERROR
    store = open_store(settings.recordings, durable=settings.durable_writes, max_file_bytes=settings.max_file_bytes)
    outcome = Outcome()
    upstream = None
    if record is not RecordPolicy.OFF or on_miss is MissPolicy.FORWARD or switchable:
        client = Http1Upstream if settings.upstream_client == "http1" else AiohttpUpstream
        upstream = client(connect_timeout=settings.connect_timeout, read_timeout=settings.read_timeout)
    playback = None
    if record is not RecordPolicy.ALL or switchable:
        playback = Playback(
            RecordingIndex(settings.router()),
            store,
            speed=validate_timing(settings.timing),
            # In record --missing with after_last "error", a call asked more often than recorded
            # is recorded as a new repeat.
            repeat_last=settings.after_last == "repeat",
            record_command=record_command(settings),
            max_pause=settings.max_pause,
            fallback=settings.scope_fallback,
        )
    recorder = None
    if record is not RecordPolicy.OFF or switchable:
        recorder = Recorder(
            store,
            outcome,
            scanner=SecretScanner(settings.secret_patterns, allow=settings.secret_allow),
            record_errors=settings.record_errors,
            redact=settings.secrets == "redact",
            journal_mode=settings.journal,
            writer=settings.writer,
            max_pending_bytes=settings.max_pending_bytes,
        )
    if playback is not None and (settings.watch or is_remote(settings.recordings)):
        playback.refresh_seconds = settings.refresh_seconds
        if recorder is not None:
            playback.own_files = recorder.written
    pipeline = Pipeline(
        name=mode_name,
        record=record,
        on_miss=on_miss,
        outcome=outcome,
        upstream=upstream,
        playback=playback,
        recorder=recorder,
        inflight=_inflight(settings, store),
        share_inflight=settings.share_inflight,
        record_after_disconnect=settings.client_disconnect == "drain",
        max_recording_bytes=settings.max_recording_bytes,
        switchable=switchable,
    )
    pipeline.store = store
    return pipeline


def _inflight(settings: Settings, store: Store) -> InFlight | RedisInFlight | None:
    """Redis shares in-flight calls across machines (named by the store location); without it,
    the Unix-socket lock shares them among the processes of one host."""
    if not settings.share_inflight:
        return None
    if settings.redis_url:
        return RedisInFlight(settings.redis_url, store.location)
    return InFlight(settings.recordings) if INFLIGHT_SUPPORTED else None


ALLOWED_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
TOKEN_HEADER = "x-llmproxy-token"
# Reserved for llmproxy's own pages and endpoints: no provider's path starts with it.
UI_PREFIX = "/_llmproxy"
SCOPE_HEADER = "x-llmproxy-scope"  # the client's choice of scope; never forwarded, recorded or keyed
MAX_SCOPE_CHARS = 1024

SETTINGS = web.AppKey("settings", Settings)
ROUTER = web.AppKey("router", Router)
PIPELINE = web.AppKey("pipeline", Pipeline)


KEY_MEMO = web.AppKey("key_memo", KeyMemo)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


HEALTH_PATH = UI_PREFIX + "/health"


def _health(pipeline: Pipeline) -> web.Response:
    """For load balancers and orchestrators: answered before the token check and routing (it
    says nothing secret). 503 `starting` until the recordings are listed; then 200: `loading`
    while their files are read (a recorded request is answered at once, its files read first;
    a request without one waits for the rest), `ok` once every file is indexed; 503 `failed`
    when the recordings could not be listed (the bucket went away after start)."""
    index = pipeline.index
    if index is not None and index.failure is not None:
        body = {"status": "failed", "mode": pipeline.name, "reason": index.failure}
        return web.json_response(body, status=503)
    if index is None or index.loaded.is_set():
        status = "ok"
    else:
        status = "loading" if index.listed.is_set() else "starting"
    body: dict[str, Any] = {"status": status, "mode": pipeline.name, "recordings": len(index or ())}
    if status != "ok" and pipeline.playback is not None:
        body["waiting"] = pipeline.playback.waiting  # requests waiting on the store meanwhile
    if index is not None and index.problems:
        body["skipped"] = len(index.problems)  # files that could not be read or served (logged)
    return web.json_response(body, status=503 if status == "starting" else 200)


def _refused(request: web.Request, settings: Settings) -> web.Response | None:
    """The token and method checks: an answer when the request goes no further."""
    token = settings.token
    if token is not None:
        # The browser's page is served to anyone who reaches it (it then asks for the token); its
        # sub-app checks the token on every API call itself.
        ui_page = settings.ui and (request.path == UI_PREFIX or request.path.startswith(UI_PREFIX + "/"))
        if not ui_page and not token_matches(request.headers.get(TOKEN_HEADER), token):
            log.warning("client refused: missing or wrong token", path=request.path, peer=request.remote)
            return error_response(None, 401, f"this llmproxy needs the {TOKEN_HEADER} header", "proxy_token_required")
    if request.method not in ALLOWED_METHODS:
        log.warning("method not allowed", method=request.method, path=request.path)
        return error_response(None, 405, f"method {request.method} is not proxied", "method_not_allowed")
    return None


async def _read_body(request: web.Request, settings: Settings, router: Router) -> web.StreamResponse | None:
    """Read the body once (kept by aiohttp for the handler): over max_body_mb, undecodable or cut
    short by a client leaving, it is answered here in the route's error shape (else None)."""
    limit = settings.max_body_bytes
    timeout = settings.body_timeout
    problem: BadRequest | None = None
    too_large = request.content_length is not None and request.content_length > limit
    if not too_large and request.headers.get("Expect"):
        # Answered once the checks that need no body passed: a client refused for its token,
        # method or declared size gets the refusal instead of 100 Continue and never sends it.
        expectation = await _expect_continue(request)
        if expectation is not None:
            return expectation
    if too_large:
        problem = BadRequest(
            413, "body_too_large", f"request body exceeds the {limit} byte limit", "request body too large"
        )
    elif request.content.is_eof():
        # The whole body came with the head (most requests): nothing to wait for, no timer.
        try:
            await read_body(request, limit)
        except BadRequest as exc:
            problem = exc
    else:
        try:
            async with asyncio.timeout(timeout):  # a client that stalls mid-body holds no connection for ever
                await read_body(request, limit)
        except BadRequest as exc:
            problem = exc
        except TimeoutError:
            message = f"the request body did not arrive within body_timeout ({timeout:g} s)"
            problem = BadRequest(408, "request_timeout", message, "request body too slow: connection closed")
        except asyncio.CancelledError:
            # aiohttp cancels the handler when its client disconnects: one line, no traceback.
            log.warning("client left during the request body", path=request.path)
            raise
    if problem is None:
        return None
    log.warning(problem.event, path=request.path, reason=problem.message, code=problem.code, limit=limit)
    match = router.resolve(request.method, request.path, request.headers)
    response = error_response(match.route if match else None, problem.status, problem.message, problem.code)
    if problem.status == 408 and request.transport is not None:
        # Answer, then close: aiohttp would otherwise linger reading the rest of the body.
        response.force_close()
        await response.prepare(request)
        await response.write_eof()
        request.transport.close()
    return response


async def _expect_continue(request: web.Request) -> web.Response | None:
    """`Expect: 100-continue` (curl sends it for bodies over 1 MB): the client waits for the
    interim answer before it sends the body. As aiohttp's router would answer it."""
    expect = request.headers.get("Expect", "")
    if request.version != HttpVersion11:
        return None
    if expect.lower() != "100-continue":
        # Echoed as text whatever its bytes: aiohttp keeps undecodable ones as surrogates, which
        # the JSON error body cannot carry (that was a 500).
        shown = expect.encode("utf-8", "backslashreplace").decode("utf-8")
        log.warning("unknown Expect header", expect=shown)
        return error_response(None, 417, f"Expect: {shown} is not supported", "expectation_failed")
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    request.writer.output_size = 0  # the answer proper has not started: an error can still be sent
    return None


class Front:
    """Every request's way in, in one coroutine: its log context, the last resort, tracking for
    shutdown, health, token and method, the body, then the proxy's handler (or, for the
    recordings page, the application's router).

    It is the server's request handler itself, not a middleware behind aiohttp's router: a
    proxy has one catch-all route, and resolving it, wrapping middlewares and looking the loop
    up (a getpid() system call on Python 3.11) cost ~8% of the loop per request."""

    def __init__(self, settings: Settings, router: Router, pipeline: Pipeline, handle: Handler) -> None:
        self.settings = settings
        self.router = router
        self.pipeline = pipeline
        self.handle = handle
        self.serves_ui = False  # the recordings page is mounted on the application
        # The application's own handling (its router: the recordings page), set when serving.
        self.application: Handler | None = None
        self.running: set[asyncio.Task[Any]] = set()  # so shutting down can cancel them at its deadline
        self._loop: asyncio.AbstractEventLoop | None = None

    def _is_ui(self, path: str) -> bool:
        return self.application is not None and (path == UI_PREFIX or path.startswith(UI_PREFIX + "/"))

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        # Bound lazily: log lines read the request through one context variable (logs.py), so a
        # request that logs nothing costs one set (a connection's earlier request is replaced).
        bind_request(request.method, request.path)
        try:
            # The handler's own task (`request.task` is its connection's); the loop is passed:
            # looking it up is a getpid() system call on Python 3.11.
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            task = asyncio.current_task(self._loop)
            assert task is not None
            self.running.add(task)
            try:
                if request.path == HEALTH_PATH and request.method in ("GET", "HEAD"):
                    return _health(self.pipeline)
                settings = self.settings
                refused = _refused(request, settings)
                if refused is not None:
                    return refused
                problem = await _read_body(request, settings, self.router)
                if problem is not None:
                    return problem
                if self._is_ui(request.path):
                    assert self.application is not None
                    if "Expect" in request.headers:  # answered above: the router would again
                        request = request.clone(headers=_without(request.headers, "Expect"))
                    return await self.application(request)
                return await self.handle(request)
            finally:
                self.running.discard(task)
        except web.HTTPException:
            raise  # aiohttp's own answers (they are not failures)
        except Exception as exc:  # noqa: BLE001 - the last resort: the one place that catches everything
            return answer_unexpected(request, exc, self._route_of)

    def _route_of(self, request: web.Request) -> Route | None:
        match = self.router.resolve(request.method, request.path, request.headers)
        return match.route if match else None


FRONT = web.AppKey("front", Front)


def _without(headers: Any, name: str) -> CIMultiDict[str]:
    kept = CIMultiDict(headers)
    kept.popall(name, None)
    return kept


def build_app(settings: Settings, router: Router, pipeline: Pipeline) -> web.Application:
    # Parsing and hashing happen once per distinct request (by exact bytes), bounded in bytes.
    keys = KeyMemo()
    redact = settings.secrets == "redact"
    scanner = SecretScanner(settings.secret_patterns, allow=settings.secret_allow)

    async def handle(request: web.Request) -> web.StreamResponse:
        headers = {name.lower(): value for name, value in request.headers.items()}
        query_string = request.query_string
        match = router.route(request.method, request.path, headers, query_string, request.host, lowered=True)
        if isinstance(match, Refusal):
            log.warning("request refused", code=match.code, method=request.method, path=request.path)
            return error_response(match.route, match.status, match.message, match.code)
        route = match.route
        body = await request.read()
        query = parse_qsl(query_string, keep_blank_values=True) if query_string else []
        scope = pipeline.scope
        if SCOPE_HEADER in headers:  # the header wins over the test running; empty: shared
            chosen = headers.pop(SCOPE_HEADER).strip()
            if len(chosen) > MAX_SCOPE_CHARS or not chosen.isprintable():
                message = f"{SCOPE_HEADER} must be printable text of at most {MAX_SCOPE_CHARS} characters"
                log.warning("request refused", code="bad_scope", path=request.path)
                return error_response(route, 400, message, "bad_scope")
            scope = chosen or None
        content_type = request.headers.get("Content-Type", "")
        memo_key = (route.name, request.method, match.path, query_string, content_type, body)
        memo_key += tuple(headers.get(name) for name in route.key_headers)  # type: ignore[assignment]
        # secrets = "redact": the key is computed from the body as it will be recorded.
        credentials = request_credentials(headers, query) if redact else {}
        memo_key += tuple(value for value in credentials if header_bytes(value) in body)  # type: ignore[assignment]
        known = keys.get(memo_key)
        if known is not None:
            body_value, canonical = known
        else:
            try:
                body_value = parse_body(body, content_type)
            except BadRequest as exc:
                log.warning(exc.event, path=request.path, reason=exc.message, code=exc.code)
                return error_response(route, exc.status, exc.message, exc.code)
            if isinstance(body_value, RawBody) and content_type.lower().startswith("application/json"):
                # Forwarding it would only record the upstream's complaint about our client's bug.
                log.warning("request body is not valid JSON", method=request.method, path=request.path, size=len(body))
                return error_response(
                    route,
                    400,
                    "the request body is not valid JSON (UTF-8) though its content type says so",
                    "invalid_json",
                )
            key_query = query
            if redact:  # as the recorder will write them, so a replay finds the recording
                body_value = scanner.redact_body(body_value, body, credentials)
                key_query = [(name, scanner.redact_text(value, credentials)) for name, value in query]
            canonical = canonical_for_route(route, request.method, match.path, key_query, headers, body_value)
            keys.put(memo_key, (body_value, canonical), len(body))
        request_context().update(route.name, canonical.key)
        call = Call(
            route=route,
            method=request.method.upper(),
            path=match.path,
            query_string=query_string,
            query=query,
            headers=headers,
            body=body,
            body_value=body_value,
            canonical=canonical,
            raw_headers=list(request.headers.items()),
            scope=scope,
        )
        return await pipeline.handle(request, call)

    async def pipeline_context(app: web.Application) -> AsyncIterator[None]:
        await app[PIPELINE].start()
        yield
        await app[PIPELINE].close(grace=app[SETTINGS].shutdown_timeout)

    # The application holds the settings, the pipeline's lifetime (cleanup_ctx) and the
    # recordings page's routes; every request enters through FRONT (ProxyServer.start).
    app = web.Application(client_max_size=settings.max_body_bytes)
    app[SETTINGS] = settings
    app[ROUTER] = router
    app[PIPELINE] = pipeline
    app[KEY_MEMO] = keys
    app[FRONT] = Front(settings, router, pipeline, handle)
    if settings.ui and is_remote(settings.recordings):
        log.warning("the recordings page browses a directory: not served for a bucket", recordings=settings.recordings)
    elif settings.ui:  # the recordings browser, under a prefix no provider uses
        from llmproxy.tools.ui import ui_subapp

        browser = ui_subapp(settings.recordings, router, token=settings.token, loopback=_is_loopback(settings.host))
        app.add_subapp(UI_PREFIX, browser)
        app[FRONT].serves_ui = True
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

    def __init__(self, settings: Settings, mode_name: str, *, switchable: bool = False) -> None:
        self.settings = settings
        self.router = settings.router()
        self.pipeline = build_pipeline(settings, mode_name, switchable=switchable)
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
        # What a killed proxy acknowledged but never wrote becomes recordings before anything is served.
        # A bucket has no journal (nothing is journaled on this machine for it).
        if not is_remote(self.settings.recordings):
            store = RecordingStore(self.settings.recordings, max_file_bytes=self.settings.max_file_bytes)
            await asyncio.get_running_loop().run_in_executor(None, recover_journals, store)
        self._runner = web.AppRunner(
            self.app,
            access_log=None,
            handle_signals=False,
            shutdown_timeout=self.settings.shutdown_timeout,
            # aiohttp closes a connection still without a whole request head this long after it
            # opened (or after its previous answer): slow or idle clients free their descriptor.
            keepalive_timeout=self.settings.header_timeout,
            # A client that leaves cancels its handler at once, also while the upstream is
            # silent: the pipeline then closes the upstream call (or reads it on to record it).
            handler_cancellation=True,
        )
        await self._runner.setup()
        front = self.app[FRONT]
        server = self._runner.server
        assert server is not None
        if front.serves_ui:
            front.application = server.request_handler  # the application's router: the recordings page
        server.request_handler = front  # before the site listens: every connection gets it
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
            cleanup = asyncio.ensure_future(self._runner.cleanup())
            done, _ = await asyncio.wait([cleanup], timeout=self.settings.shutdown_timeout)
            if not done:
                # aiohttp would wait as long again before cancelling handlers still serving
                # (its "cancel" only fails their request-body reads): cancel them now.
                for task in list(self.app[FRONT].running):
                    task.cancel()
            await cleanup
            self._runner = None
        report = self.report()
        saved = report["saved"]  # what replay saved going upstream, for the summary
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
            saved_tokens=saved and saved["input_tokens"] + saved["output_tokens"],
            saved_usd=saved and round(saved["cost_usd"], 6),
            report=str(self.settings.report) if self.settings.report else None,
        )

    @property
    def mode(self) -> Pipeline:
        """The pipeline (the name tests and the plugin have used for it)."""
        return self.pipeline

    def report(self) -> dict[str, Any]:
        pipeline = self.pipeline
        playback = pipeline.playback
        saved = replay_savings(playback.replayed(), playback.index.provider_for) if playback is not None else None
        return build_report(
            pipeline.name,
            pipeline.outcome,
            normalize_location(self.settings.recordings),
            pipeline.recorded(),
            pipeline.unused(),
            saved,
        )


SWITCH_INTERVAL_SECONDS = 0.0005


def tune_runtime() -> None:
    """A server allocates many short-lived objects: with the default thresholds, full collections
    of every long-lived object (routes, loaded recordings, modules) ran every few hundred requests
    and took a third of the loop. What exists after start is frozen out of collections, and young
    collections run less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 1000)
    # A big recording is prepared in a thread (writer.INLINE_PREPARE_BYTES); by default it keeps
    # the GIL for 5 ms before the loop, woken by a socket, gets a turn. At 0.5 ms, ten clients
    # of 5,000-chunk streams got their first byte ~20 ms sooner (109 -> 89 ms, bench.variants
    # --scenario sse5000). With a single thread running, the interval costs nothing.
    sys.setswitchinterval(SWITCH_INTERVAL_SECONDS)


async def serve(settings: Settings, mode_name: str) -> None:
    """Run until SIGINT/SIGTERM, then finish in-flight writes and print the summary."""
    server = ProxyServer(settings, mode_name)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    install_loop_errors(loop)
    # Before listening: a signal right after the `listening` line must still stop cleanly.
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await server.start(wait_ready=False)  # serve while the recordings load
    tune_runtime()
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        await server.stop()
