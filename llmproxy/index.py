"""The index: request key -> recording, built once from the store when the proxy starts.

A recording's key is computed from its stored request with today's routes and rules, never
read from its file name, so renamed files, other recorders' files and rule changes all work.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from llmproxy.framing import render_segments
from llmproxy.matching import CanonicalRequest, canonical_request, similarity
from llmproxy.providers import Provider
from llmproxy.recording import Recording, RecordingError, from_document
from llmproxy.routing import Route, Router
from llmproxy.store import RecordingStore, StoreError

log = structlog.get_logger("llmproxy.index")


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


@dataclass(slots=True)
class Entry:
    recording: Recording
    canonical: CanonicalRequest
    route: Route
    source: Path | None = None
    _segments: list[bytes] | None = field(default=None, repr=False)
    _joined: bytes | None = field(default=None, repr=False)

    def segments(self) -> list[bytes]:
        """The response bytes, one segment per chunk, framed once and cached."""
        if self._segments is None:
            response = self.recording.response
            self._segments = render_segments(response.body, response.framing, self.route.provider.json_value)
        return self._segments

    def body_bytes(self) -> bytes:
        if self._joined is None:
            self._joined = b"".join(self.segments())
        return self._joined


@dataclass(slots=True)
class LoadProblem:
    path: Path
    reason: str


class RecordingIndex:
    """Key -> the recordings of that request, in replay order.

    The same request recorded N times (sampling, retries, polling) has N entries, replayed in
    recorded order: by `request.sequence`, then by file path (other recorders' files).
    """

    def __init__(self, router: Router) -> None:
        self.router = router
        self._entries: dict[str, list[Entry]] = {}
        self.problems: list[LoadProblem] = []

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
        entry = Entry(recording, canonical, route, source)
        entries = self._entries.setdefault(canonical.key, [])
        entries.append(entry)
        entries.sort(key=lambda e: (e.recording.request.sequence, str(e.source or "")))
        return entry

    def load_document(self, document: Any, source: Path | None = None) -> Entry:
        recording = from_document(document, self.provider_for)
        entry = self.add(recording, source)
        entry.segments()  # render once now, so a file that cannot be replayed is found at load
        return entry

    def load_store(self, store: RecordingStore) -> None:
        for path in store.paths():
            try:
                self.load_document(store.read(path), path)
            except (StoreError, RecordingError, ValueError, TypeError) as exc:
                problem = LoadProblem(path, str(exc))
                self.problems.append(problem)
                log.warning("recording skipped", path=str(path), reason=str(exc))

    def nearest(self, canonical: CanonicalRequest, count: int = 3) -> list[Entry]:
        scored = sorted(
            (entries[0] for entries in self._entries.values()),
            key=lambda entry: similarity(entry.canonical, canonical),
            reverse=True,
        )
        return scored[:count]
