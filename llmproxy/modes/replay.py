"""Replay mode: answer from recordings only. No network, no API key, a clear error on a miss."""

from __future__ import annotations

import asyncio
import time

import structlog
from aiohttp import web

from llmproxy.call import Call, Outcome, error_response
from llmproxy.canonical import request_differences
from llmproxy.store.directory import RecordingStore, StoreError
from llmproxy.store.document import RecordingError
from llmproxy.store.index import Entry, RecordingIndex, Rendered
from llmproxy.upstream.client import Forwarder

log = structlog.get_logger("llmproxy.replay")


class Replayer:
    """Serves recordings from the index: the Nth identical request gets the Nth recording."""

    def __init__(
        self,
        index: RecordingIndex,
        outcome: Outcome,
        store: RecordingStore | None = None,
        *,
        speed: float | None = None,
        repeat_last: bool = True,
        record_command: str = "llmproxy record --missing",
        record_exhausted: bool = False,
    ) -> None:
        self.index = index
        self.outcome = outcome
        # None replays as fast as possible; otherwise the recorded pacing divided by speed.
        self.speed = speed
        # After the last recorded repeat of a request: serve the last one again, or fail.
        self.repeat_last = repeat_last
        self.record_command = record_command
        # In record --missing, a request asked more often than recorded is recorded again.
        self.record_exhausted = record_exhausted
        self.store = store
        self._served: dict[str, int] = {}
        self._loading: asyncio.Future[None] | None = None

    async def start(self) -> None:
        """Load the store in a worker thread; requests are served while it loads."""
        if self.store is not None:
            self._loading = asyncio.get_running_loop().run_in_executor(None, self._load, self.store)

    async def wait_loaded(self) -> None:
        if self._loading is not None:
            await self._loading

    async def stop(self) -> None:
        """Stop a load still in progress, so shutting down never waits for it to finish."""
        if self._loading is not None and not self._loading.done():
            self.index.stop_loading()
            await self._loading

    def _load(self, store: RecordingStore) -> None:
        started = time.perf_counter()
        self.index.load_store(store)
        log.info(
            "recordings loaded",
            directory=str(store.root),
            recordings=len(self.index),
            skipped=len(self.index.problems),
            seconds=round(time.perf_counter() - started, 3),
        )

    def unused(self) -> list[Entry]:
        """Recordings no request reached (for repeats: the ones past the last served)."""
        unused = []
        for key in self.index.keys():
            unused.extend(self.index.get(key)[self._served.get(key, 0) :])
        return unused

    async def serve(self, request: web.Request, call: Call) -> web.StreamResponse | None:
        """The recorded answer, or None when nothing was recorded for this request."""
        key = call.canonical.key
        entries = self.index.get(key)
        while not entries and self._loading is not None and not self._loading.done():
            # Perhaps not loaded yet: look again as the index grows, until loading ends.
            await asyncio.wait([self._loading], timeout=0.02)
            entries = self.index.get(key)
        if not entries:
            return None
        served = self._served.get(key, 0)
        self._served[key] = served + 1
        if served >= len(entries) and not self.repeat_last:
            if self.record_exhausted:
                return None  # record --missing: the extra call is a new repeat to record
            self.outcome.note_miss(call)
            message = (
                f"all {len(entries)} recordings of {call.canonical.describe()} (key {key[:16]}) were "
                "already replayed and repeats are off; record the extra call to replay it"
            )
            log.warning("replay exhausted", path=call.path, key=key[:16], recorded=len(entries))
            return error_response(call.route, 404, message, "recordings_exhausted")
        entry = entries[min(served, len(entries) - 1)]
        rendered = self.index.cache.get(entry)
        if rendered is None:
            try:
                rendered = await asyncio.get_running_loop().run_in_executor(None, self.index.rendered, entry)
            except (StoreError, RecordingError, ValueError, TypeError) as exc:
                self.outcome.errors += 1
                log.error("recording cannot be replayed", file=str(entry.source), reason=str(exc))
                message = f"the recording {entry.source} cannot be replayed: {exc}"
                return error_response(call.route, 500, message, "recording_unreadable")
        self.outcome.hits += 1
        if self.speed is None or not rendered.streaming:
            return web.Response(status=rendered.status, body=rendered.body, headers=rendered.headers)
        return await self._paced(request, rendered, rendered.headers)

    async def _paced(self, request: web.Request, rendered: Rendered, headers: dict[str, str]) -> web.StreamResponse:
        """Write each chunk at its recorded offset (divided by the speed factor)."""
        assert self.speed is not None
        timing = rendered.timing or {}
        offsets = list(timing.get("chunk_ms") or [])
        segments = rendered.segments
        stream = web.StreamResponse(status=rendered.status, headers=headers)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.sleep(float(timing.get("headers_ms") or 0) / 1000 / self.speed)
        await stream.prepare(request)
        for index, segment in enumerate(segments):
            if index < len(offsets):
                due = started + float(offsets[index]) / 1000 / self.speed
                delay = due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            await stream.write(segment)
        await stream.write_eof()
        return stream

    def miss(self, call: Call) -> web.Response:
        """A 404 in the provider's shape naming the request, the nearest recording and the fix."""
        self.outcome.note_miss(call)
        canonical = call.canonical
        model = call.model or "-"
        message = (
            f"llmproxy has no recording for {canonical.describe()} "
            f"(route {call.route.name}, model {model}, key {canonical.key[:16]})."
        )
        nearest = self.index.nearest(canonical, 1)
        closest_file = None
        differences: list[str] = []
        if nearest:
            closest = nearest[0]
            closest_file = str(closest.source) if closest.source else None
            differences = request_differences(closest.canonical, canonical)
            message += f" Closest recording: {closest_file or '(in memory)'}; it differs in: {'; '.join(differences)}."
        message += f" To record it, run `{self.record_command}` and repeat this request through it."
        log.warning(
            "replay miss",
            method=call.method,
            path=call.path,
            route=call.route.name,
            model=model,
            key=canonical.key[:16],
            closest=closest_file,
            differences=differences,
        )
        return error_response(call.route, 404, message, "recording_not_found")

    def replayed(self) -> list[tuple[Entry, int]]:
        """Each recording this run replayed and how often (what replay saved going upstream)."""
        counts: dict[int, tuple[Entry, int]] = {}
        for key, served in self._served.items():
            entries = self.index.get(key)
            for number in range(served):
                if number >= len(entries) and not self.repeat_last:
                    break
                entry = entries[min(number, len(entries) - 1)]
                counts[id(entry)] = (entry, counts.get(id(entry), (entry, 0))[1] + 1)
        return list(counts.values())


class ReplayMode:
    """Answer from recordings only; on a miss, fail loudly (default) or forward unrecorded."""

    name = "replay"

    def __init__(self, replayer: Replayer, forwarder: Forwarder | None = None) -> None:
        self.replayer = replayer
        self.outcome = replayer.outcome
        self.index = replayer.index
        self.forwarder = forwarder

    async def start(self) -> None:
        await self.replayer.start()
        if self.forwarder is not None:
            await self.forwarder.start()

    async def wait_ready(self) -> None:
        await self.replayer.wait_loaded()

    async def close(self) -> None:
        await self.replayer.stop()
        if self.forwarder is not None:
            await self.forwarder.close()

    async def handle(self, request: web.Request, call: Call) -> web.StreamResponse:
        response = await self.replayer.serve(request, call)
        if response is not None:
            return response
        if self.forwarder is None:
            return self.replayer.miss(call)
        self.outcome.note_miss(call)
        log.warning(
            "replay miss forwarded live, not recorded", method=call.method, path=call.path, route=call.route.name
        )
        response, _ = await self.forwarder.forward(request, call)
        return response
