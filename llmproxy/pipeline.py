"""The request pipeline: one handler decides, per routed call, what answers it.

Two settings decide, as in talkback: what to record (`RecordPolicy`: nothing, what is missing,
everything) and what a miss gets when nothing is recorded (`MissPolicy`: llmproxy's 404, or the
live upstream, unrecorded). The CLI modes are points on that grid:

    replay                      OFF     x ERROR
    replay --on-miss forward    OFF     x FORWARD
    record --missing            MISSING (a miss is forwarded and recorded)
    record                      ALL     (every call is forwarded and recorded)

A call may belong to a scope (the pytest test running, or an x-llmproxy-scope header): its
recordings are that scope's, and the pytest plugin may switch the record policy per test
(`enter_scope`) on a pipeline built `switchable`, with every part any policy needs.

Only this module writes to the client: the playback finds recordings, the upstream hands back a
response to read, a flight fans it out to every identical call in flight, and the recorder
writes what the flight received once it ended, whether or not its clients stayed.
"""

from __future__ import annotations

import asyncio
import time
from enum import StrEnum
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from llmproxy.answers import PreparedAnswer, fits, wire_head
from llmproxy.call import Call, NotRecorded, Outcome, Result, error_response
from llmproxy.errors import LlmproxyError
from llmproxy.headers import client_response_headers
from llmproxy.lastresort import report_unexpected
from llmproxy.logs import debug_enabled
from llmproxy.playback import Exhausted, Found, Playback, Unreadable
from llmproxy.providers import PLACEHOLDER_KEYS
from llmproxy.store import dropped
from llmproxy.store.base import Store
from llmproxy.store.document import from_document
from llmproxy.store.index import Rendered, render
from llmproxy.store.writer import Recorder
from llmproxy.upstream.base import Upstream, UpstreamFailure
from llmproxy.upstream.client import Exchange
from llmproxy.upstream.flight import Flight
from llmproxy.upstream.redislock import RedisInFlight
from llmproxy.upstream.singleflight import InFlight
from llmproxy.wire.registry import codec_for_content_type

log = structlog.get_logger("llmproxy.pipeline")

# Cross-process locks are held until the recording is written; past this many, calls go
# unshared across processes rather than hold a file descriptor each.
MAX_HELD_LOCKS = 256
# A non-streamed answer up to this size is sent whole, with its length (and a 502 if the upstream
# breaks off before its end); a bigger one is passed through as it arrives.
WHOLE_BODY_BYTES = 1024 * 1024
# An upstream answer without a Content-Type gets aiohttp's default on every path (HTTP/1.0 and
# HEAD clients get aiohttp's Response, which adds it), as it did before the prepared answer.
DEFAULT_CONTENT_TYPE = "application/octet-stream"


class RecordPolicy(StrEnum):
    OFF = "off"  # replay only
    MISSING = "missing"  # replay what is recorded, record what is not
    ALL = "all"  # (re-)record every call


class MissPolicy(StrEnum):
    ERROR = "error"  # llmproxy's 404 naming the nearest recording
    FORWARD = "forward"  # the live upstream's answer, not recorded


MODES: dict[str, RecordPolicy] = {
    "record": RecordPolicy.ALL,
    "record-missing": RecordPolicy.MISSING,
    "replay": RecordPolicy.OFF,
}


class Pipeline:
    def __init__(
        self,
        *,
        name: str,
        record: RecordPolicy,
        on_miss: MissPolicy,
        outcome: Outcome,
        upstream: Upstream | None,
        playback: Playback | None = None,
        recorder: Recorder | None = None,
        inflight: InFlight | RedisInFlight | None = None,
        share_inflight: bool = True,
        record_after_disconnect: bool = True,
        max_recording_bytes: int = 64 * 1024 * 1024,
        switchable: bool = False,
    ) -> None:
        if record is not RecordPolicy.OFF and (upstream is None or recorder is None):
            raise ValueError("recording needs an upstream and a recorder")
        if record is not RecordPolicy.ALL and playback is None:
            raise ValueError("replaying needs a playback")
        if on_miss is MissPolicy.FORWARD and upstream is None:
            raise ValueError("forwarding misses needs an upstream")
        if switchable and (upstream is None or recorder is None or playback is None):
            raise ValueError("a switchable pipeline needs an upstream, a recorder and a playback")
        self.name = name
        self.record = record
        self.on_miss = on_miss
        self.outcome = outcome
        self.upstream = upstream
        self.playback = playback
        self.recorder = recorder
        self.inflight = inflight
        self.share_inflight = share_inflight
        # A client that leaves before the end: read the upstream on and record the exchange
        # whole (True), or close the upstream request at once and record nothing.
        self.record_after_disconnect = record_after_disconnect
        self.max_recording_bytes = max_recording_bytes
        self._flights: dict[str, Flight] = {}  # shareable flights by request key
        self._flight_misses: dict[Flight, list[dict[str, Any]]] = {}
        # The tasks of flights still reading their upstream or writing what they read.
        self._landing: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        # Cross-process locks held, by key (a file lock's, or a Redis lock's).
        self._locks: dict[str, Any] = {}
        self._drop_reasons: dict[Flight, str] = {}  # why a flight's exchange is not written
        self.store: Store | None = None  # closed last (a bucket's connections)
        self.serving = 0  # clients being fed from a flight right now
        self.stop_by: float | None = None  # time.monotonic() by which close() must be done
        self.switchable = switchable
        # The scope of calls without an x-llmproxy-scope header (the pytest test running), and
        # its record policy when it has its own (a mark); set by the plugin between tests.
        self.scope: str | None = None
        self.scope_record: RecordPolicy | None = None
        self._replaced: set[str] = set()  # scopes whose old files were removed this session

    @property
    def index(self) -> Any:
        return self.playback.index if self.playback is not None else None

    # -- lifetime ---------------------------------------------------------------------------

    async def start(self) -> None:
        if self.playback is not None:
            await self.playback.start()
        if self.upstream is not None:
            await self.upstream.start()
        if self.recorder is not None and self.record is not RecordPolicy.OFF:
            await self.recorder.start()  # a switchable pipeline (the pytest plugin) starts it when recording

    async def wait_ready(self) -> None:
        if self.playback is not None:
            await self.playback.wait_loaded()

    async def close(self, grace: float = 10.0) -> None:
        """Let flights end (bounded by `grace`), write what they received, release everything."""
        if self.playback is not None:
            await self.playback.stop()
        if self.stop_by is not None:
            grace = min(grace, max(0.0, self.stop_by - time.monotonic()))
        if self._landing:
            _, pending = await asyncio.wait(list(self._landing), timeout=grace)
            if pending:
                log.warning("shutting down: calls still reading their upstream are cut off", calls=len(pending))
                for flight in list(self._flight_misses):
                    flight.abandon()
                await asyncio.wait(pending)
        if self.recorder is not None:
            await self.recorder.drain()
        if self.upstream is not None:
            await self.upstream.close()
        if self.inflight is not None:
            await self.inflight.aclose()
        if self.store is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.store.close)

    def unused(self) -> list[Path] | None:
        """Recordings loaded but never served (None when nothing was loaded)."""
        if self.playback is None or self.record is RecordPolicy.ALL:
            return None
        return [entry.source for entry in self.playback.unused() if entry.source is not None]

    def recorded(self) -> list[str]:
        return list(self.recorder.written) if self.recorder is not None else []

    # -- scopes -----------------------------------------------------------------------------

    def policy(self) -> RecordPolicy:
        """The record policy for calls right now: the current scope's own, or the pipeline's."""
        return self.scope_record or self.record

    async def enter_scope(self, scope: str | None, record: RecordPolicy | None = None) -> list[Path]:
        """Calls without a scope header belong to `scope` from now on, recorded per `record`
        (None: the pipeline's policy). Recording a scope ALL replaces its recordings: the first
        time in a session, its old files are removed (only its own); they are returned."""
        if record is not None and record is not self.record and not self.switchable:
            raise ValueError(f"this pipeline cannot switch to {record.value}")
        removed: list[Path] = []
        if scope is not None and (record or self.record) is RecordPolicy.ALL and scope not in self._replaced:
            self._replaced.add(scope)
            assert self.recorder is not None
            store = self.recorder.store
            removed = await asyncio.get_running_loop().run_in_executor(None, store.remove_scope, scope)
            if self.playback is not None:
                self.playback.forget_scope(scope)
            if removed:
                log.info("recording the scope again: its old recordings removed", scope=scope, files=len(removed))
        self.scope, self.scope_record = scope, record  # once its old files are gone
        return removed

    def leave_scope(self) -> None:
        self.scope, self.scope_record = None, None

    # -- the handler ------------------------------------------------------------------------

    async def handle(self, request: web.Request, call: Call) -> web.StreamResponse:
        record = self.policy()
        if self.playback is not None and record is not RecordPolicy.ALL:
            found = await self.playback.lookup(call)
            if isinstance(found, Found):
                self.outcome.count(Result.HIT)
                return await self._send_rendered(request, found.rendered)
            if isinstance(found, Unreadable):
                self.outcome.count(Result.ERROR)
                return self.playback.unreadable_response(call, found)
            if isinstance(found, Exhausted) and record is not RecordPolicy.MISSING:
                self.outcome.note_miss(call)
                return self.playback.exhausted_response(call, found.recorded)
        if record is RecordPolicy.OFF:
            assert self.playback is not None
            self.outcome.note_miss(call)
            if self.on_miss is MissPolicy.ERROR:
                return await self.playback.miss_response(call)
            log.warning(
                "replay miss forwarded live, not recorded", method=call.method, path=call.path, route=call.route.name
            )
            return await self._forward(request, call, record=False)
        miss = None
        if record is RecordPolicy.MISSING:
            miss = self.outcome.note_miss(call)
            log.info("live call: no recording yet", method=call.method, path=call.path, route=call.route.name)
        return await self._forward(request, call, record=True, miss=miss)

    async def _forward(
        self, request: web.Request, call: Call, *, record: bool, miss: dict[str, Any] | None = None
    ) -> web.StreamResponse:
        assert self.upstream is not None
        placeholder = placeholder_key_in(call)
        if placeholder is not None:
            # A replay run's stand-in key would only earn a 401, recorded as the answer.
            self.outcome.count(Result.ERROR)
            log.warning("refused: the request carries a placeholder key", variable=placeholder, route=call.route.name)
            message = (
                f"this call goes upstream but carries llmproxy's replay placeholder key ({placeholder}, set by "
                f"`llmproxy run` or the pytest plugin in replay); set a real {placeholder} to record it"
            )
            return error_response(call.route, 401, message, "placeholder_key")
        key = call.scoped_key  # identical calls of different scopes are recorded apart
        share = record and self.share_inflight
        if share:
            joined = self._join(key, miss)
            if joined is not None:
                return await self._serve(request, call, *joined, leader=False)
        lock: Any = None
        if share and self.inflight is not None and key not in self._locks and len(self._locks) < MAX_HELD_LOCKS:
            taken = await self.inflight.acquire(key)
            if taken is None:  # another proxy on this directory is making this very call
                served = await self._wait_for_other_process(call)
                if served is not None:
                    rendered, path = served
                    self.outcome.count(Result.SHARED)
                    if miss is not None:
                        miss["recorded"] = str(path)
                    return await self._send_rendered(request, rendered)
                joined = self._join(key, miss)  # one of our own may have started it meanwhile
                if joined is not None:
                    return await self._serve(request, call, *joined, leader=False)
                taken = await self.inflight.acquire(key)
            if taken is not None and taken is not False:
                if miss is not None:
                    # Another proxy may have recorded it between our lookup and taking the lock.
                    served = await self._recorded_elsewhere(call)
                    if served is not None:
                        self.inflight.release(taken)
                        rendered, path = served
                        self.outcome.count(Result.SHARED)
                        miss["recorded"] = str(path)
                        return await self._send_rendered(request, rendered)
                lock = self._locks[key] = taken
        sequence = 0
        if record:
            assert self.recorder is not None
            # Backpressure: when recordings queue up faster than the disk takes them, new calls
            # wait here, before going upstream; streams already under way never wait.
            await self.recorder.room()
            # record --missing (a miss noted) adds to what is recorded; record starts again.
            after = self.playback.recorded(call) if self.playback is not None and miss is not None else 0
            sequence = self.recorder.next_sequence(key, after)
        if self._loop is None:  # cached: on Python 3.11 each lookup is a getpid() system call
            self._loop = asyncio.get_running_loop()
        # A recorded flight's clients get the end of the response only once its recording is
        # journaled (or known not to be), so an answer a client has is recoverable.
        flight = Flight(
            call,
            self.upstream,
            keep_bytes=self.max_recording_bytes if record else None,
            persist=record and self.record_after_disconnect,
            journal=record,
            land=lambda flight: self._land(flight, record, sequence, lock),
            loop=self._loop,
        )
        reader = flight.join()  # before the flight's task first runs: it must see its reader
        self._flight_misses[flight] = [miss] if miss is not None else []
        if share:
            self._flights[key] = flight
        self._landing.add(flight.task)
        return await self._serve(request, call, flight, reader, leader=True)

    def _join(self, key: str, miss: dict[str, Any] | None) -> tuple[Flight, int] | None:
        flight = self._flights.get(key)
        if flight is None or not flight.joinable:
            return None
        self.outcome.count(Result.SHARED)
        if miss is not None:
            self._flight_misses.setdefault(flight, []).append(miss)
        if debug_enabled():
            log.debug("identical call in flight: fed from it", key=key[:16])
        return flight, flight.join()

    async def _serve(
        self, request: web.Request, call: Call, flight: Flight, reader: int, *, leader: bool
    ) -> web.StreamResponse:
        """Write the flight's answer to this client as it arrives."""
        response: web.StreamResponse | None = None
        self.serving += 1
        try:
            head = await flight.headers()
            if isinstance(head, UpstreamFailure):
                self.outcome.count(Result.ERROR)
                return error_response(call.route, head.status, head.message, head.code)
            headers = client_response_headers(head.headers)
            content_type = next((value for name, value in head.headers if name.lower() == "content-type"), "")
            if not codec_for_content_type(content_type).streaming:
                parts: list[bytes] = []
                size = 0
                while (batch := flight.take(reader)) is not None:
                    if not batch:
                        await flight.changed()
                        continue
                    parts += batch
                    size += sum(map(len, batch))
                    if size > WHOLE_BODY_BYTES:
                        break
                else:
                    if flight.broken is not None:
                        self.outcome.count(Result.ERROR)
                        log.error("upstream broke off the response", route=call.route.name, error=flight.broken)
                        message = f"upstream {call.route.name} broke off: {flight.broken}"
                        return error_response(call.route, 502, message, "upstream_broken")
                    await flight.journaled_end()
                    if leader:
                        self.outcome.count(Result.FORWARDED)
                    body = b"".join(parts)
                    if fits(request, head.status):
                        if not any(name.lower() == "content-type" for name, _ in headers):
                            headers.append(("Content-Type", DEFAULT_CONTENT_TYPE))  # as aiohttp's Response
                        dated = any(name.lower() == "date" for name, _ in headers)
                        answer = PreparedAnswer(wire_head(head.status, headers, len(body)), body, dated)
                        return answer  # type: ignore[return-value]
                    return web.Response(status=head.status, body=body, headers=headers)
                response = web.StreamResponse(status=head.status, headers=headers)
                await response.prepare(request)
                for data in parts:
                    await response.write(data)
                del parts
            else:
                response = web.StreamResponse(status=head.status, headers=headers)
                await response.prepare(request)
            while (batch := flight.take(reader)) is not None:
                if not batch:
                    await flight.changed()
                    continue
                for data in batch:
                    await response.write(data)  # straight on: the client's time to first byte is the upstream's
            if flight.broken is not None:
                self.outcome.count(Result.ERROR)
                log.error("upstream broke off the response", route=call.route.name, error=flight.broken)
                _abort(request)  # the client already has part of the answer: cut it off too
                return response
            await flight.journaled_end()
            try:
                await response.write_eof()
            except ConnectionError:
                # SDKs stop reading at their end marker ([DONE], message_stop) and may close
                # before the final empty chunk: the client had everything, the flight has too.
                pass
            if leader:
                self.outcome.count(Result.FORWARDED)
            return response
        except (ConnectionError, asyncio.CancelledError) as exc:
            # With persist the flight reads on and records the exchange whole; else the last
            # reader to leave closes the upstream call.
            log.info("client went away before the end", path=call.path, read_on=flight.persist and flight.keeping)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return response if response is not None else web.Response(status=499)
        finally:
            self.serving -= 1
            flight.leave(reader)

    async def _land(self, flight: Flight, record: bool, sequence: int, lock: Any) -> None:
        """At the end of the flight, in its task: write its exchange, or say loudly why not; then
        free its lock."""
        call = flight.call
        key = call.scoped_key
        written = False
        try:
            # Readers woken by the flight's end first pass on its last chunks: the client's bytes
            # never wait for the recording to be prepared.
            await asyncio.sleep(0)
            if self._flights.get(key) is flight:
                del self._flights[key]
            if not record:
                return
            assert self.recorder is not None
            reason = None
            if flight.over_limit:
                reason = NotRecorded.OVER_LIMIT
            elif flight.abandoned:
                reason = NotRecorded.CLIENT_LEFT
            elif flight.response is None:
                reason = NotRecorded.UPSTREAM_FAILED
            if reason is not None:
                self._drop_reasons[flight] = reason.value
                self.outcome.note_not_recorded(reason)
                log.warning(
                    "not recorded",
                    reason=reason.value,
                    route=call.route.name,
                    method=call.method,
                    path=call.path,
                    received=flight.received,
                    limit=self.max_recording_bytes if reason is NotRecorded.OVER_LIMIT else None,
                )
                self.recorder.give_back(key, sequence)
                return
            assert flight.response is not None
            body = flight.body()
            assert body is not None
            exchange = Exchange(
                call=call,
                url=flight.response.url,
                status=flight.response.status,
                headers=flight.response.headers,
                body=body,
                reads=flight.reads,
                headers_ms=flight.response.headers_ms,
                complete=flight.broken is None,
            )

            def done(path: str | None) -> None:  # called on the loop
                if path is None and exchange.dropped is not None:
                    self._drop_reasons.setdefault(flight, exchange.dropped)
                self._landed(flight, key, lock, path)

            written = True  # from here `done` releases the lock
            await self.recorder.schedule(exchange, sequence, done, flight.mark_journaled)
        except Exception as exc:  # noqa: BLE001 - nobody awaits this task: a bug must not die unseen
            written = False
            report_unexpected(exc, call.headers, call.query, method=call.method, path=call.path)
            if record:
                self._drop_reasons[flight] = NotRecorded.WRITE_FAILED.value
                self.outcome.note_not_recorded(NotRecorded.WRITE_FAILED)
        finally:
            flight.mark_journaled()
            if not written:
                self._landed(flight, key, lock, None)
            self._landing.discard(flight.task)

    def _landed(self, flight: Flight, key: str, lock: Any, path: str | None) -> None:
        reason = self._drop_reasons.pop(flight, None)
        root = self.recorder.store.root if self.recorder is not None else None
        if path is None and flight.keep_bytes is not None and root is not None:
            # Meant for the recordings, not written: a later replay miss of it says so.
            call = flight.call
            note = (root, key, call.route.name, call.method, call.path, reason)
            asyncio.get_running_loop().run_in_executor(None, dropped.note, *note)
        for miss in self._flight_misses.pop(flight, []):
            if path is not None:
                miss["recorded"] = path
        if lock is not None:
            if self._locks.get(key) is lock:
                del self._locks[key]
            assert self.inflight is not None
            self.inflight.release(lock)

    async def _send_rendered(self, request: web.Request, rendered: Rendered) -> web.StreamResponse:
        playback = self.playback
        if playback is None or not playback.paced(rendered):
            if fits(request, rendered.status):
                return PreparedAnswer(rendered.head, rendered.body, rendered.dated)  # type: ignore[return-value]
            return web.Response(status=rendered.status, body=rendered.body, headers=rendered.headers)
        await playback.headers_pause(rendered)
        stream = web.StreamResponse(status=rendered.status, headers=rendered.headers)
        await stream.prepare(request)
        try:
            async for segment in playback.segments(rendered):
                await stream.write(segment)
            await stream.write_eof()
        except ConnectionError:
            pass  # the client left: nothing to record in replay
        return stream

    async def _wait_for_other_process(self, call: Call) -> tuple[Rendered, Path] | None:
        """Wait for the proxy that holds this call's lock; the recording it wrote, if it did."""
        assert self.inflight is not None and self.recorder is not None and self.upstream is not None
        started = time.time()
        log.info("identical call in flight in another proxy: waiting", path=call.path, key=call.canonical.key[:16])
        if not await self.inflight.wait(call.scoped_key, self.upstream.read_timeout):
            return None
        served = await self._newest(call, started - 1)
        if served is not None:
            log.info("identical call in flight in another proxy: served its recording", path=call.path)
        # None: the other call recorded nothing (an error, a cut): go upstream ourselves.
        return served

    async def _newest(self, call: Call, since: float) -> tuple[Rendered, Path] | None:
        """The newest recording of the call in the store, written at or after `since`."""
        assert self.recorder is not None
        store = self.recorder.store
        loop = asyncio.get_running_loop()
        try:
            name = self.recorder.target(call, 1)
            path = await loop.run_in_executor(
                None,
                lambda: store.newest_recording(
                    call.route.name, call.canonical.key, since=since, name=name, scope=call.scope
                ),
            )
            if path is None:
                return None
            document = await loop.run_in_executor(None, store.load, path)
            rendered = render(from_document(document, lambda _method, _path: call.route.provider), call.route)
        except LlmproxyError:
            return None
        return rendered, path

    async def _recorded_elsewhere(self, call: Call) -> tuple[Rendered, Path] | None:
        """A recording of this missed call that another writer added since the index was built."""
        assert self.recorder is not None
        key = call.canonical.key
        known = max(self.playback.recorded(call) if self.playback else 0, self.recorder.known(call.scoped_key))
        store = self.recorder.store
        loop = asyncio.get_running_loop()
        try:
            name = self.recorder.target(call, 1)
            highest = await loop.run_in_executor(
                None, lambda: store.highest_sequence(call.route.name, key, name=name, scope=call.scope)
            )
        except LlmproxyError:
            return None
        if highest <= known:
            return None
        return await self._newest(call, 0.0)


def _abort(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.close()


# Values that stand in for a key in replay runs (not region names and the like).
_PLACEHOLDER_VALUES = {value for value in PLACEHOLDER_KEYS.values() if "placeholder" in value}


def placeholder_key_in(call: Call) -> str | None:
    """The variable (of the call's provider) whose replay placeholder this call carries as its
    credential, if it carries one."""
    credentials = call.credentials()
    if _PLACEHOLDER_VALUES.isdisjoint(credentials):
        return None
    carried = _PLACEHOLDER_VALUES.intersection(credentials)
    own = [name for name, value in call.route.provider.placeholder_keys.items() if value in carried]
    return " or ".join(own) or "API key variable"
