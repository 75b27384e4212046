"""The replay side of the pipeline: which recording answers a call, at what pace, and the miss
message when none does. It never writes to a client: the pipeline does."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import time
from collections.abc import AsyncIterator, Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from llmproxy.call import Call, error_response
from llmproxy.canonical import CanonicalRequest, request_differences
from llmproxy.errors import LlmproxyError
from llmproxy.logs import debug_enabled
from llmproxy.store import dropped
from llmproxy.store.base import Store
from llmproxy.store.index import Entry, Group, RecordingIndex, Rendered

log = structlog.get_logger("llmproxy.playback")

# Realtime pacing trusts the file's timing only this far: a pause is at most this long.
MAX_PAUSE_MS = 60_000.0
READ_THREADS = 32
STOP_LOADING_WAIT = 1.0  # seconds


@dataclass(frozen=True, slots=True)
class Found:
    rendered: Rendered
    entry: Entry


@dataclass(frozen=True, slots=True)
class Exhausted:
    """Every recorded repeat was served, and repeats are off."""

    recorded: int


@dataclass(frozen=True, slots=True)
class Unreadable:
    entry: Entry
    reason: str


Lookup = Found | Exhausted | Unreadable | None


class Playback:
    """Recordings by key: the Nth identical request gets the Nth recording.

    A call in a scope (a test) is answered by that scope's recordings, its repeats counted in
    that scope alone, so a test gets the same answers whatever else runs; with none there, by
    the shared recordings (`fallback`), counted as shared (as they were recorded).
    """

    def __init__(
        self,
        index: RecordingIndex,
        store: Store | None = None,
        *,
        speed: float | None = None,
        repeat_last: bool = True,
        record_command: str = "llmproxy record --missing",
        max_pause: float = MAX_PAUSE_MS / 1000,
        fallback: bool = True,
    ) -> None:
        self.index = index
        self.store = store
        # None replays as fast as possible; otherwise the recorded pacing divided by speed.
        self.speed = speed
        # After the last recorded repeat of a request: serve the last one again, or not.
        self.repeat_last = repeat_last
        self.record_command = record_command
        # Paced replay never waits longer than this at once (seconds), whatever a file says.
        self.max_pause = max_pause
        # A scoped call with no recording in its scope: answered by the shared recordings.
        self.fallback = fallback
        self._served: dict[Group, int] = {}
        self.dropped: dict[str, dict[str, Any]] = {}  # exchanges record runs did not write, by key
        self._loading: asyncio.Future[None] | None = None
        # Look for files other writers added every this many seconds (None: never); the files
        # this process wrote itself (`own_files`) are left out, they are its own repeats.
        self.refresh_seconds: float | None = None
        self.own_files: Collection[str] = ()
        self._refreshing: asyncio.Task[None] | None = None
        # Hinted loads in flight, by key prefix: a second request for the same key waits for
        # the first's instead of finding its files taken but not indexed yet.
        self._hinting: dict[tuple[str | None, str], asyncio.Future[int]] = {}
        self.waiting = 0  # requests waiting on the store while it loads (health shows it)
        # Reads a request waits for (its hinted files, a body read for its first replay): threads
        # of their own, mostly waiting on storage, so a slow bucket never fills the loop's
        # default executor (which the loader and the writer use too).
        self._reads = ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="llmproxy-read")

    async def start(self) -> None:
        """Load the store in a worker thread; requests are served while it loads."""
        if self.store is not None:
            self.index.begin_loading(self.store)
            self._loading = asyncio.get_running_loop().run_in_executor(None, self._load, self.store)
            if self.refresh_seconds:
                self._refreshing = asyncio.create_task(self._refresh(self.store, self.refresh_seconds))

    async def _refresh(self, store: Store, every: float) -> None:
        """Staleness is bounded by `every` plus one listing: what another replica (or a file
        copied into the directory) wrote is served from the next refresh on."""
        assert self._loading is not None
        await asyncio.shield(self._loading)
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(every)
            try:
                added = await loop.run_in_executor(None, self.index.load_new, store, set(self.own_files))
            except Exception as exc:  # noqa: BLE001 - a failed refresh is retried, never fatal
                log.warning("recordings refresh failed; retried later", location=store.location, reason=str(exc))
                continue
            if added:
                log.info("recordings added since start", location=store.location, added=added)

    async def wait_loaded(self) -> None:
        if self._loading is not None:
            await self._loading

    async def stop(self) -> None:
        """Stop a load still in progress, so shutting down never waits for it to finish."""
        if self._refreshing is not None:
            self._refreshing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refreshing
        if self._loading is not None and not self._loading.done():
            self.index.stop_loading()
            # A load waiting on a slow bucket is not waited for long: closing the store (the
            # pipeline's last step) ends its reads.
            await asyncio.wait([self._loading], timeout=STOP_LOADING_WAIT)
        # Called once requests are done (the app's cleanup): its threads end with it.
        self._reads.shutdown(wait=False, cancel_futures=True)

    def _load(self, store: Store) -> None:
        started = time.perf_counter()
        try:
            self.index.load_store(store)
        except LlmproxyError as exc:
            log.error("recordings cannot be loaded", directory=store.location, reason=str(exc))
            return
        self.dropped = dropped.read_notes(store.root) if store.root is not None else {}
        log.info(
            "recordings loaded",
            directory=store.location,
            recordings=len(self.index),
            skipped=len(self.index.problems),
            seconds=round(time.perf_counter() - started, 3),
        )

    def replayed(self) -> list[tuple[Entry, int]]:
        """Each recording this run replayed and how often (what replay saved going upstream)."""
        counts: dict[int, tuple[Entry, int]] = {}
        for (scope, key), served in self._served.items():
            entries = self.index.get(key, scope)
            if not entries:
                continue  # a scope re-recorded since: its old recordings are gone
            for number in range(served):
                if number >= len(entries) and not self.repeat_last:
                    break
                entry = entries[min(number, len(entries) - 1)]
                counts[id(entry)] = (entry, counts.get(id(entry), (entry, 0))[1] + 1)
        return list(counts.values())

    def unused(self) -> list[Entry]:
        """Recordings no request reached (for repeats: the ones past the last served)."""
        unused = []
        for scope, key in self.index.groups():
            unused.extend(self.index.get(key, scope)[self._served.get((scope, key), 0) :])
        return unused

    def recorded(self, call: Call) -> int:
        """How many recordings of this call its own scope has (a new one comes after them)."""
        return len(self.index.get(call.canonical.key, call.scope))

    def forget_scope(self, scope: str) -> None:
        self.index.drop_scope(scope)
        for group in [group for group in self._served if group[0] == scope]:
            del self._served[group]

    def _entries(self, call: Call) -> tuple[Group, list[Entry]]:
        key, scope = call.canonical.key, call.scope
        entries = self.index.get(key, scope)
        if entries or scope is None or not self.fallback:
            return (scope, key), entries
        return (None, key), self.index.get(key)

    def _still_loading(self) -> bool:
        return self._loading is not None and not self._loading.done()

    async def _load_hinted(self, call: Call) -> None:
        """While loading: have this call's files (known by their names) read first."""
        key = call.canonical.key
        # Per scope: each call lists its own scope's names (before the store is listed).
        hinting = (call.scope, key[:16])
        pending = self._hinting.get(hinting)
        if pending is None:
            if not self._still_loading():
                return
            find = functools.partial(self._named_for, call)
            pending = asyncio.get_running_loop().run_in_executor(self._reads, self.index.load_hinted, key, find)
            self._hinting[hinting] = pending
            pending.add_done_callback(lambda _: self._hinting.pop(hinting, None))
        try:
            await asyncio.shield(pending)
        except Exception as exc:  # noqa: BLE001 - the full load still finds them
            log.warning("hinted load failed; waiting for the full load", key=key[:16], reason=str(exc))

    def _named_for(self, call: Call) -> list[Path]:
        """The files the store holds under the names this call's repeats get, in its scope and,
        with fallback, the shared ones (one small listing each: the whole store is not listed yet)."""
        assert self.store is not None
        key, found = call.canonical.key, []
        scopes = (call.scope, None) if call.scope is not None and self.fallback else (call.scope,)
        for scope in scopes:
            first = self.store.name_for(route=call.route.name, path=call.path, model=call.model, key=key, scope=scope)
            found += self.store.named_for(call.route.name, key, name=first, scope=scope)
        return found

    def _settled(self, call: Call, group: Group, entries: list[Entry]) -> bool:
        """What is indexed so far answers this call as the whole store would: its own scope's
        recordings, with the repeat it needs next in recorded order (a later one may have been
        loaded first)."""
        if not entries or group[0] != call.scope:
            return False
        served = self._served.get(group, 0)
        return served < len(entries) and entries[served].sequence <= served + 1

    async def lookup(self, call: Call) -> Lookup:
        """The recording that answers this call (None: nothing recorded for it)."""
        loading = self._still_loading() or bool(self._hinting)
        if loading:
            self.waiting += 1
        try:
            if loading:  # loaded and no hinted read under way: nothing to wait for (most calls)
                await self._load_hinted(call)
            group, entries = self._entries(call)
            # What the names led to answers the call when it settles it; anything else (a miss,
            # a shared answer to a scoped call, a repeat past those found) waits for the whole
            # store, which may hold the call's files under other names.
            while self._still_loading() and not self._settled(call, group, entries):
                await asyncio.wait([self._loading], timeout=0.02)
                group, entries = self._entries(call)
        finally:
            if loading:
                self.waiting -= 1
        if not entries:
            return None
        key = group[1]
        served = self._served.get(group, 0)
        self._served[group] = served + 1
        if served >= len(entries) and not self.repeat_last:
            return Exhausted(len(entries))
        entry = entries[min(served, len(entries) - 1)]
        rendered = self.index.cache.get(entry)
        if rendered is None:
            try:
                rendered = await asyncio.get_running_loop().run_in_executor(self._reads, self.index.rendered, entry)
            except LlmproxyError as exc:
                log.error("recording cannot be replayed", file=str(entry.source), reason=str(exc))
                return Unreadable(entry, str(exc))
        if debug_enabled():
            log.debug(
                "replay hit",
                path=call.path,
                key=key[:16],
                scope=call.scope,
                shared=group[0] != call.scope,
                file=str(entry.source) if entry.source else None,
            )
        return Found(rendered, entry)

    def _pause_ms(self, value: Any) -> float:
        """A pause from a recording's timing: a finite, non-negative number, clamped to max_pause."""
        if isinstance(value, bool) or not isinstance(value, int | float):
            return 0.0
        value = float(value)
        if not math.isfinite(value) or value <= 0:
            return 0.0
        return min(value, self.max_pause * 1000)

    def paced(self, rendered: Rendered) -> bool:
        return self.speed is not None and rendered.streaming

    async def headers_pause(self, rendered: Rendered) -> None:
        assert self.speed is not None
        await asyncio.sleep(self._pause_ms((rendered.timing or {}).get("headers_ms")) / 1000 / self.speed)

    async def segments(self, rendered: Rendered) -> AsyncIterator[bytes]:
        """Each chunk at its recorded offset (divided by the speed factor), from now."""
        assert self.speed is not None
        offsets = (rendered.timing or {}).get("chunk_ms") or []
        if not isinstance(offsets, list):
            offsets = []
        loop = asyncio.get_running_loop()
        started = loop.time() - self._pause_ms((rendered.timing or {}).get("headers_ms")) / 1000 / self.speed
        for index, segment in enumerate(rendered.segments):
            if index < len(offsets):
                delay = started + self._pause_ms(offsets[index]) / 1000 / self.speed - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            yield segment

    def exhausted_response(self, call: Call, recorded: int) -> web.Response:
        key = call.canonical.key
        message = (
            f"all {recorded} recordings of {call.canonical.describe()} (key {key[:16]}) were "
            "already replayed and repeats are off; record the extra call to replay it"
        )
        log.warning("replay exhausted", path=call.path, key=key[:16], recorded=recorded)
        return error_response(call.route, 404, message, "recordings_exhausted")

    def unreadable_response(self, call: Call, found: Unreadable) -> web.Response:
        message = f"the recording {found.entry.source} cannot be replayed: {found.reason}"
        return error_response(call.route, 500, message, "recording_unreadable")

    def _closest(self, canonical: CanonicalRequest, model: str | None) -> tuple[Entry | None, list[str]]:
        nearest = self.index.nearest(canonical, 1, model)
        if not nearest:
            return None, []
        return nearest[0], request_differences(nearest[0].canonical, canonical)

    async def miss_response(self, call: Call) -> web.Response:
        """A 404 in the provider's shape naming the request, the nearest recording and the fix."""
        canonical = call.canonical
        model = call.model or "-"
        message = (
            f"llmproxy has no recording for {canonical.describe()} "
            f"(route {call.route.name}, model {model}, key {canonical.key[:16]})"
        )
        if call.scope is not None:
            shared = " or shared" if self.fallback else ""
            message += f" in scope {call.scope}{shared}"
        message += "."
        # Comparing with many recordings (and diffing large bodies) is CPU work: off the loop,
        # so other clients go on.
        closest, differences = await asyncio.get_running_loop().run_in_executor(
            None, self._closest, canonical, call.model
        )
        closest_file = None
        note = self.dropped.get(canonical.key)
        if note is not None:
            message += " " + dropped.describe(note)
        if closest is not None:
            closest_file = str(closest.source) if closest.source else None
            where = "" if closest.scope == call.scope else f" (in scope {closest.scope or 'shared'})"
            differ = "; ".join(differences) or "its scope only"
            message += f" Closest recording: {closest_file or '(in memory)'}{where}; it differs in: {differ}."
        message += f" To record it, run `{self.record_command}` and repeat this request through it."
        log.warning(
            "replay miss",
            method=call.method,
            path=call.path,
            route=call.route.name,
            model=model,
            key=canonical.key[:16],
            scope=call.scope,
            closest=closest_file,
            differences=differences,
            not_recorded=(note.get("reason") or "unknown") if note is not None else None,
            compared=self.index.compared,
        )
        return error_response(call.route, 404, message, "recording_not_found")
