"""The index: request key -> recordings, built from the store when the proxy starts.

A recording's key is computed from its stored request with today's routes and rules, never
read from its file name, so renamed files, other recorders' files and rule changes all work.

The index keeps, per recording, only what identifies it (its canonical request) and where it
lives. Response bodies are read when first replayed and kept, framed, in a cache bounded in
bytes: memory follows the index, not the bodies, and tens of thousands of files load fast.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from llmproxy.canonical import CanonicalRequest, canonical_request, similarity
from llmproxy.headers import replay_headers
from llmproxy.providers import Provider
from llmproxy.routing import Route, Router
from llmproxy.store.directory import RecordingStore, StoreError
from llmproxy.store.document import Recording, RecordingError, from_document
from llmproxy.wire.registry import default_content_type, render_segments

log = structlog.get_logger("llmproxy.store.index")

DEFAULT_CACHE_BYTES = 256 * 1024 * 1024


def canonical_for_route(
    route: Route, method: str, path: str, query: Any, headers: Mapping[str, str], body: Any
) -> CanonicalRequest:
    """The one place incoming requests and stored recordings are turned into keys."""
    return canonical_request(
        route=route.name,
        method=method,
        path=path,
        query=query,
        headers=headers,
        body=body,
        key_headers=route.key_headers,
        ignore_body=route.ignore_body,
        ignore_query=route.ignore_query,
        round_floats=route.round_floats,
    )


@dataclass(frozen=True, slots=True)
class Rendered:
    """A recording's response, framed and ready to send: one bytes object, and where each
    chunk ends in it (paced replay sends it chunk by chunk)."""

    status: int
    headers: dict[str, str]  # as sent on replay: credentials, hop-by-hop and length left out
    body: bytes
    ends: tuple[int, ...]
    streaming: bool
    timing: dict[str, Any] | None

    @property
    def size(self) -> int:
        return len(self.body) + 8 * len(self.ends)

    @property
    def segments(self) -> list[bytes]:
        starts = (0, *self.ends[:-1])
        return [self.body[start:end] for start, end in zip(starts, self.ends)]


def render(recording: Recording, route: Route) -> Rendered:
    """A recording's response framed for the wire, with the headers replay sends."""
    response = recording.response
    segments = render_segments(response.body, response.framing, route.provider.json_value)
    headers = replay_headers(response.headers)
    if not any(name.lower() == "content-type" for name in headers):
        # Recordings that did not keep their content type (other recorders' files).
        headers["Content-Type"] = default_content_type(str(response.framing.get("format")))
    return Rendered(
        status=response.status,
        headers=headers,
        body=b"".join(segments),
        ends=tuple(itertools.accumulate(len(segment) for segment in segments)),
        streaming=response.is_streaming,
        timing=response.timing,
    )


@dataclass(slots=True)
class Entry:
    canonical: CanonicalRequest
    route: Route
    sequence: int = 1
    source: Path | None = None
    # Kept for recordings that have no file (built in memory) or when the index keeps them all.
    held: Recording | None = field(default=None, repr=False)

    def recording(self, provider_for: Any) -> Recording:
        """The full recording: held, or read again from its file."""
        if self.held is not None:
            return self.held
        assert self.source is not None
        return from_document(RecordingStore.read(self.source), provider_for)


class RenderCache:
    """Framed responses by entry, least recently used out first, bounded in bytes."""

    def __init__(self, limit_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.limit = limit_bytes
        self.size = 0
        self._items: OrderedDict[int, Rendered] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, entry: Entry) -> Rendered | None:
        with self._lock:
            rendered = self._items.get(id(entry))
            if rendered is not None:
                self._items.move_to_end(id(entry))
            return rendered

    def put(self, entry: Entry, rendered: Rendered) -> None:
        with self._lock:
            if id(entry) in self._items or rendered.size > self.limit:
                return
            self._items[id(entry)] = rendered
            self.size += rendered.size
            while self.size > self.limit:
                _, evicted = self._items.popitem(last=False)
                self.size -= evicted.size


@dataclass(slots=True)
class LoadProblem:
    path: Path
    reason: str


class RecordingIndex:
    """Key -> the recordings of that request, in replay order.

    The same request recorded N times (sampling, retries, polling) has N entries, replayed in
    recorded order: by `request.sequence`, then by file path (other recorders' files).
    """

    def __init__(
        self, router: Router, *, keep_recordings: bool = False, cache_bytes: int = DEFAULT_CACHE_BYTES
    ) -> None:
        self.router = router
        self.keep_recordings = keep_recordings
        self.cache = RenderCache(cache_bytes)
        self._entries: dict[str, list[Entry]] = {}
        self.problems: list[LoadProblem] = []
        self.loaded = threading.Event()
        self._stop_loading = threading.Event()

    def __len__(self) -> int:
        return sum(len(entries) for entries in self._entries.values())

    def keys(self) -> list[str]:
        return list(self._entries)

    def entries(self) -> list[Entry]:
        return [entry for entries in self._entries.values() for entry in entries]

    def get(self, key: str) -> list[Entry]:
        return self._entries.get(key, [])

    def provider_for(self, method: str, path: str) -> Provider | None:
        match = self.router.resolve(method, path, {})
        return match.route.provider if match else None

    def route_of(self, recording: Recording) -> Route:
        request = recording.request
        if request.route:
            route = self.router.get(request.route)
            if route is not None:
                return route
        match = self.router.resolve(request.method, request.path, request.headers)
        if match is None:
            raise RecordingError(f"no route serves {request.method} {request.path}")
        return match.route

    def add(self, recording: Recording, source: Path | None = None) -> Entry:
        route = self.route_of(recording)
        request = recording.request
        canonical = canonical_for_route(
            route, request.method, request.path, request.query, request.headers, request.body
        )
        held = recording if (source is None or self.keep_recordings) else None
        entry = Entry(canonical, route, request.sequence, source, held)
        # A new list, swapped in whole: the event loop may read this key while a loader thread adds.
        entries = [*self._entries.get(canonical.key, ()), entry]
        entries.sort(key=lambda e: (e.sequence, str(e.source or "")))
        self._entries[canonical.key] = entries
        return entry

    def load_document(self, document: Any, source: Path | None = None) -> Entry:
        return self.add(from_document(document, self.provider_for), source)

    def stop_loading(self) -> None:
        """Ask a load in progress (in another thread) to stop: the proxy is shutting down."""
        self._stop_loading.set()

    def load_store(self, store: RecordingStore) -> None:
        try:
            for path in store.paths():
                if self._stop_loading.is_set():
                    break
                try:
                    self.load_document(store.read(path), path)
                except (StoreError, RecordingError, ValueError, TypeError) as exc:
                    self.problems.append(LoadProblem(path, str(exc)))
                    log.warning("recording skipped", path=str(path), reason=str(exc))
        finally:
            self.loaded.set()

    def rendered(self, entry: Entry) -> Rendered:
        """The entry's framed response, from the cache or read and framed now (blocking I/O:
        call it off the event loop unless the cache has it)."""
        cached = self.cache.get(entry)
        if cached is not None:
            return cached
        rendered = render(entry.recording(self.provider_for), entry.route)
        self.cache.put(entry, rendered)
        return rendered

    def nearest(self, canonical: CanonicalRequest, count: int = 3) -> list[Entry]:
        scored = sorted(
            (entries[0] for entries in self._entries.values()),
            key=lambda entry: similarity(entry.canonical, canonical),
            reverse=True,
        )
        return scored[:count]
