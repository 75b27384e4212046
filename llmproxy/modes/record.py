"""Record mode: forward each call, pass the answer through as it arrives, tee it to disk.

With a replayer (`llmproxy record --missing`) calls that already have a recording are
replayed and only the others go upstream (each such live call is logged). Identical calls in
flight at the same moment go upstream once, the others get the same answer: within this
process through a shared future, across proxies on the same directory through a lock file.
"""

from __future__ import annotations

import asyncio
import time

import structlog
from aiohttp import web

from llmproxy.call import Call, Outcome
from llmproxy.errors import LlmproxyError
from llmproxy.headers import client_response_headers
from llmproxy.modes.replay import Replayer
from llmproxy.store.directory import RecordingStore
from llmproxy.store.document import from_document
from llmproxy.store.index import render
from llmproxy.store.writer import Recorder
from llmproxy.upstream.client import Exchange, Forwarder
from llmproxy.upstream.singleflight import InFlight, Lock

log = structlog.get_logger("llmproxy.record")

MAX_HELD_LOCKS = 256


class RecordMode:
    def __init__(
        self,
        forwarder: Forwarder,
        recorder: Recorder,
        replayer: Replayer | None = None,
        inflight: InFlight | None = None,
    ) -> None:
        self.forwarder = forwarder
        self.recorder = recorder
        self.replayer = replayer
        self.inflight = inflight
        self.outcome: Outcome = forwarder.outcome
        self.name = "record-missing" if replayer is not None else "record"
        self._in_flight: dict[str, asyncio.Future[Exchange | None]] = {}
        self._locks: dict[str, Lock] = {}  # cross-process locks this proxy holds, by key

    async def start(self) -> None:
        if self.replayer is not None:
            await self.replayer.start()
        await self.forwarder.start()

    async def wait_ready(self) -> None:
        if self.replayer is not None:
            await self.replayer.wait_loaded()

    async def close(self) -> None:
        if self.replayer is not None:
            await self.replayer.stop()
        await self.recorder.drain()
        await self.forwarder.close()

    async def handle(self, request: web.Request, call: Call) -> web.StreamResponse:
        if self.replayer is not None:
            replayed = await self.replayer.serve(request, call)
            if replayed is not None:
                return replayed
            self.outcome.note_miss(call)
            log.info("live call: no recording yet", method=call.method, path=call.path, route=call.route.name)
        key = call.canonical.key
        twin = self._in_flight.get(key)
        if twin is not None:
            self.outcome.shared += 1
            exchange = await asyncio.shield(twin)
            if exchange is not None and exchange.complete:
                log.debug("identical call in flight: shared its answer", path=call.path, key=key[:16])
                return web.Response(
                    status=exchange.status, body=exchange.body, headers=client_response_headers(exchange.headers)
                )
        lock: Lock | None = None
        # Locks are held until the recording is written; past MAX_HELD_LOCKS pending writes,
        # calls go unshared rather than hold a file descriptor each.
        if self.inflight is not None and key not in self._locks and len(self._locks) < MAX_HELD_LOCKS:
            taken = self.inflight.try_acquire(key)
            if taken is None:  # another proxy on this directory is making this very call
                shared = await self._wait_for_other_process(call)
                if shared is not None:
                    return shared
                taken = self.inflight.try_acquire(key)
            if isinstance(taken, Lock):
                lock = self._locks[key] = taken
        recorded_before = len(self.replayer.index.get(key)) if self.replayer is not None else 0
        sequence = self.recorder.next_sequence(key, recorded_before)
        future: asyncio.Future[Exchange | None] = asyncio.get_running_loop().create_future()
        self._in_flight[key] = future
        exchange = None
        try:
            response, exchange = await self.forwarder.forward(request, call)
        finally:
            future.set_result(exchange)
            if self._in_flight.get(key) is future:
                del self._in_flight[key]
            if exchange is None and lock is not None:
                self._unlock(key, lock)
        if exchange is None:
            self.recorder.give_back(key, sequence)
            return response
        if not response.prepared:
            # Send the answer now: waiting for room in the writer queue must not delay it.
            await response.prepare(request)
            await response.write_eof()
        # The lock is held until the recording is written: another proxy waiting for this call
        # then finds the file.
        loop = asyncio.get_running_loop()
        done = (lambda: loop.call_soon_threadsafe(self._unlock, key, lock)) if lock is not None else None
        await self.recorder.schedule(exchange, sequence, done)
        return response

    def _unlock(self, key: str, lock: Lock) -> None:
        if self._locks.get(key) is lock:
            del self._locks[key]
        InFlight.release(lock)

    async def _wait_for_other_process(self, call: Call) -> web.StreamResponse | None:
        """Wait for the proxy that holds this call's lock; serve what it recorded, if it did."""
        assert self.inflight is not None
        self.outcome.shared += 1
        started = time.time()
        log.info("identical call in flight in another proxy: waiting", path=call.path, key=call.canonical.key[:16])
        if not await self.inflight.wait(call.canonical.key, self.forwarder.read_timeout):
            return None
        store = self.recorder.store
        path = store.newest_recording(call.route.name, call.canonical.key, since=started - 1)
        if path is None:
            return None  # the other call recorded nothing (an error, a cut): go upstream ourselves
        loop = asyncio.get_running_loop()
        try:
            document = await loop.run_in_executor(None, RecordingStore.read, path)
            rendered = render(from_document(document, lambda _method, _path: call.route.provider), call.route)
        except LlmproxyError:
            return None
        log.info("identical call in flight in another proxy: served its recording", path=call.path, file=str(path))
        return web.Response(status=rendered.status, body=rendered.body, headers=rendered.headers)
