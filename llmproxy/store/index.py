"""The index: request key -> recordings, built from the store when the proxy starts.

A recording's key is computed from its stored request with today's routes and rules, never
read from its file name, so renamed files, other recorders' files and rule changes all work.
Names serve only as hints while loading: llmproxy's names end in the key's first 16 hex digits,
so a request that arrives before its files were read has them read first (a bucket of 10,000
files answers in the time of one listing, not of 10,000 reads); what it serves is still keyed
from the files' contents.

The index keeps, per recording, only what identifies it (its canonical request) and where it
lives. Response bodies are read when first replayed and kept, framed, in a cache bounded in
bytes: memory follows the index, not the bodies, and tens of thousands of files load fast.
"""

from __future__ import annotations

import itertools
import math
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from llmproxy.answers import wire_head
from llmproxy.canonical import CanonicalRequest, canonical_request
from llmproxy.errors import LlmproxyError
from llmproxy.headers import replay_headers
from llmproxy.providers import Provider
from llmproxy.routing import Route, Router
from llmproxy.store.base import Store
from llmproxy.store.directory import DEFAULT_MAX_FILE_BYTES, KEY_IN_NAME, RecordingStore
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
    head: bytes  # the status line's tail and headers on the wire (answers.wire_head)
    dated: bool  # the recorded headers carry their own Date

    @property
    def size(self) -> int:
        return len(self.body) + 8 * len(self.ends)

    @property
    def segments(self) -> list[bytes]:
        starts = (0, *self.ends[:-1])
        return [self.body[start:end] for start, end in zip(starts, self.ends)]


def render(recording: Recording, route: Route) -> Rendered:
    """A recording's response framed for the wire, with the headers replay sends.

    Everything that could fail when sending it fails here instead, as RecordingError: the
    loader renders each file once, so a file that cannot be served is reported and skipped
    at load (and a good recording of the same request is served), never a 500 at request time.
    """
    response = recording.response
    if not 200 <= response.status <= 599:
        # 1xx are interim answers (101 switches protocols): no recorded exchange ends in one.
        raise RecordingError(f"response.status {response.status} cannot be replayed (200-599 only)")
    try:
        segments = render_segments(response.body, response.framing, route.provider.json_value)
    except Exception as exc:  # noqa: BLE001 - any failure to frame a file's body means "cannot replay"
        raise RecordingError(f"response body and framing do not fit: {type(exc).__name__}: {exc}") from None
    headers = replay_headers(response.headers)
    for name, value in headers.items():
        if not _TOKEN.fullmatch(name) or _BAD_VALUE.search(value) or not value.isascii() and not _latin1(value):
            raise RecordingError(f"response.headers.{name}: not a valid HTTP header (name, CR/LF, encoding)")
    if not any(name.lower() == "content-type" for name in headers):
        # Recordings that did not keep their content type (other recorders' files).
        headers["Content-Type"] = default_content_type(str(response.framing.get("format")))
    body = b"".join(segments)
    return Rendered(
        status=response.status,
        headers=headers,
        body=body,
        ends=tuple(itertools.accumulate(len(segment) for segment in segments)),
        streaming=response.is_streaming,
        timing=_timing(response.timing),
        head=wire_head(response.status, headers.items(), len(body)),
        dated=any(name.lower() == "date" for name in headers),
    )


_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def _latin1(value: str) -> bool:
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return True


def _milliseconds(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise RecordingError(f"response.timing.{where} must be a finite number of milliseconds, not {value!r}")
    return float(value)


def _timing(timing: dict[str, Any] | None) -> dict[str, Any] | None:
    """Recorded pacing, checked: numbers only (huge ones are clamped when replaying)."""
    if timing is None:
        return None
    headers_ms = _milliseconds(timing.get("headers_ms") or 0, "headers_ms")
    chunk_ms = timing.get("chunk_ms") or []
    if not isinstance(chunk_ms, list):
        raise RecordingError("response.timing.chunk_ms must be a list of milliseconds")
    return {
        "headers_ms": headers_ms,
        "chunk_ms": [_milliseconds(value, f"chunk_ms[{index}]") for index, value in enumerate(chunk_ms)],
    }


@dataclass(slots=True)
class Entry:
    canonical: CanonicalRequest
    route: Route
    sequence: int = 1
    source: Path | None = None
    model: str | None = None
    # Kept for recordings that have no file (built in memory) or when the index keeps them all.
    held: Recording | None = field(default=None, repr=False)
    # The size limit of the store it was loaded from: it is read again when first replayed.
    max_bytes: int = DEFAULT_MAX_FILE_BYTES
    # A remote store it is read again from (None: a file on this machine).
    store: Any = field(default=None, repr=False)
    # The test (or x-llmproxy-scope) it was recorded for; None: shared by every request.
    scope: str | None = None

    def recording(self, provider_for: Any) -> Recording:
        """The full recording: held, or read again from its file."""
        if self.held is not None:
            return self.held
        assert self.source is not None
        if self.store is not None:
            return from_document(self.store.load(self.source), provider_for)
        return from_document(RecordingStore.read(self.source, max_bytes=self.max_bytes), provider_for)


class RenderCache:
    """Framed responses by entry, least recently used out first, bounded in bytes."""

    def __init__(self, limit_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.limit = limit_bytes
        self.size = 0
        self._items: OrderedDict[int, Rendered] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, entry: Entry) -> Rendered | None:
        # Every replayed request asks, on the loop: no lock. Each OrderedDict call is atomic
        # (its keys are ints); a `put` in a reader thread may evict the entry in between.
        rendered = self._items.get(id(entry))
        if rendered is not None:
            try:
                self._items.move_to_end(id(entry))
            except KeyError:
                pass
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


Group = tuple[str | None, str]  # (scope, request key)


class RecordingIndex:
    """(scope, key) -> the recordings of that request in that scope, in replay order.

    The same request recorded N times (sampling, retries, polling) has N entries, replayed in
    recorded order: by `request.sequence`, then by file path (other recorders' files). A
    recording's scope (the test it was recorded for) is `request.scope` in its file; files
    without one are shared (scope None).
    """

    def __init__(
        self, router: Router, *, keep_recordings: bool = False, cache_bytes: int = DEFAULT_CACHE_BYTES
    ) -> None:
        self.router = router
        self.keep_recordings = keep_recordings
        self.cache = RenderCache(cache_bytes)
        self._entries: dict[Group, list[Entry]] = {}
        # Groups by (route, path): where a miss looks for its nearest recording first.
        self._by_endpoint: dict[tuple[str, str], list[Group]] = {}
        self.max_file_bytes = DEFAULT_MAX_FILE_BYTES
        # Candidates the last nearest-recording search compared (bounded by NEAREST_CANDIDATES).
        self.compared = 0
        self.problems: list[LoadProblem] = []
        self.loaded = threading.Event()
        self.listed = threading.Event()  # the first listing is done: names can be hinted
        self.failure: str | None = None  # why loading the store failed, if it did
        self._stop_loading = threading.Event()
        self._seen: set[str] = set()  # files already read (indexed or skipped)
        # While loading: files by the key prefix in their name, and the files already taken by
        # the loader or by a request's hinted load (each file is indexed once).
        self._hints: dict[str, list[Path]] = {}
        self._claimed: set[str] = set()
        self._claim_lock = threading.Lock()
        self._loading_from: Store | None = None
        self._generation = 0  # one per load (start, refresh): a hinted load belongs to one
        # Hinted loads of one key prefix run one at a time: the second finds the first's files
        # indexed, never taken and still being read.
        self._prefix_locks: dict[str, threading.Lock] = {}

    def __len__(self) -> int:
        return sum(len(entries) for entries in self._entries.values())

    def keys(self) -> list[str]:
        """The request keys recorded, in any scope."""
        return list(dict.fromkeys(key for _, key in list(self._entries)))

    def groups(self) -> list[Group]:
        return list(self._entries)

    def entries(self) -> list[Entry]:
        return [entry for entries in list(self._entries.values()) for entry in entries]

    def get(self, key: str, scope: str | None = None) -> list[Entry]:
        """The recordings of `key` in `scope` (None: the shared ones), in replay order."""
        return self._entries.get((scope, key), [])

    def in_any_scope(self, key: str) -> list[Entry]:
        return [entry for (_, each), entries in list(self._entries.items()) if each == key for entry in entries]

    def drop_scope(self, scope: str) -> None:
        """Forget a scope's recordings (their files were removed to record the test again)."""
        for group in [group for group in list(self._entries) if group[0] == scope]:
            entries = self._entries.pop(group)
            # Their names may be written again (and found again by refresh or --watch).
            sources = [str(entry.source) for entry in entries if entry.source is not None]
            self._seen.difference_update(sources)
            with self._claim_lock:
                self._claimed.difference_update(sources)
            endpoint = (entries[0].canonical.route, entries[0].canonical.path)
            self._by_endpoint[endpoint] = [other for other in self._by_endpoint.get(endpoint, []) if other != group]

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

    def add(
        self, recording: Recording, source: Path | None = None, *, check: bool = False, cache: bool = False
    ) -> Entry:
        """Index a recording. `check` renders its response first (RecordingError if it cannot
        be served): the loader indexes only files that would replay. `cache` keeps that
        rendering (a request is waiting to be served it)."""
        route = self.route_of(recording)
        request = recording.request
        canonical = canonical_for_route(
            route, request.method, request.path, request.query, request.headers, request.body
        )
        rendered = render(recording, route) if check or cache else None
        held = recording if (source is None or self.keep_recordings) else None
        entry = Entry(
            canonical, route, request.sequence, source, request.model, held, self.max_file_bytes, request.scope
        )
        group = (request.scope, canonical.key)
        # A new list, swapped in whole: the event loop may read this key while a loader thread adds.
        previous = self._entries.get(group, ())
        entries = [*previous, entry]
        entries.sort(key=lambda e: (e.sequence, str(e.source or "")))
        self._entries[group] = entries
        if not previous:
            self._by_endpoint.setdefault((canonical.route, canonical.path), []).append(group)
        if cache and rendered is not None:
            self.cache.put(entry, rendered)
        return entry

    def load_document(self, document: Any, source: Path | None = None) -> Entry:
        return self.add(from_document(document, self.provider_for), source)

    def load_file(self, store: RecordingStore, path: Path) -> tuple[Entry, Any]:
        """Read, validate and index one file: bounded read (regular files inside the directory,
        size and depth limits), a valid recording, and a response that renders. Raises
        StoreError or RecordingError saying why not."""
        self.max_file_bytes = store.max_file_bytes
        document = store.load(path)
        return self.add(from_document(document, self.provider_for), path, check=True), document

    def stop_loading(self) -> None:
        """Ask a load in progress (in another thread) to stop: the proxy is shutting down."""
        self._stop_loading.set()

    def load_store(self, store: Store) -> None:
        try:
            self.load_new(store)
        except LlmproxyError as exc:  # the store cannot be listed or read: said by health too
            self.failure = str(exc)
            raise
        finally:
            self.listed.set()
            self.loaded.set()

    def load_new(self, store: Store, skip: Collection[str] = ()) -> int:
        """Index the store's files not seen yet (all of them at start; then what other writers
        added: refresh and --watch). `skip`: names this process wrote itself. Returns how many."""
        added = 0
        try:
            self.begin_loading(store)
            fresh = [path for path in store.paths() if str(path) not in self._seen and str(path) not in skip]
            self._seen.update(str(path) for path in fresh)
            remote = store if not isinstance(store, RecordingStore) else None
            self.max_file_bytes = store.max_file_bytes
            with self._claim_lock:
                for path in fresh:
                    hint = KEY_IN_NAME.search(path.name)
                    if hint is not None:
                        self._hints.setdefault(hint.group(1), []).append(path)
            self.listed.set()
            for path, document in store.load_many(fresh):
                if self._stop_loading.is_set():
                    break
                with self._claim_lock:
                    # Claimed and indexed under one lock: a hinted load never sees a file taken
                    # but not yet indexed.
                    if str(path) in self._claimed:
                        continue
                    self._claimed.add(str(path))
                    added += self._index(path, document, remote)
        finally:
            with self._claim_lock:
                self._hints.clear()
                self._claimed.clear()
                self._prefix_locks.clear()
                self._loading_from = None
        return added

    def begin_loading(self, store: Store) -> None:
        """Say which store is being loaded, before its listing starts (hinted loads need it)."""
        with self._claim_lock:
            if self._loading_from is not store:
                self._generation += 1
            self._loading_from = store

    def load_hinted(self, key: str, find: Callable[[], Iterable[Path]] | None = None) -> int:
        """While loading: read and index now the files named for `key` (their names carry its
        first 16 hex digits), ahead of the others: from the store's listing once it is done,
        before that from `find` (which asks the store for the names the request's own repeats
        would have). Returns how many files are named for it (0: none, or not loading). Once it
        returns, every such file is indexed (or skipped, saying why)."""
        with self._claim_lock:
            store, generation = self._loading_from, self._generation
            prefix_lock = self._prefix_locks.setdefault(key[:16], threading.Lock())
        if store is None:
            return 0
        with prefix_lock:
            return self._load_named(key, find, store, generation)

    def _load_named(self, key: str, find: Callable[[], Iterable[Path]] | None, store: Store, generation: int) -> int:
        with self._claim_lock:
            named = list(self._hints.get(key[:16], ())) if self.listed.is_set() else None
        if named is None:
            named = list(find()) if find is not None else []
        with self._claim_lock:
            if self._loading_from is not store or self._generation != generation:
                return len(named)  # that load ended meanwhile: it indexed them all
            wanted = [path for path in named if str(path) not in self._claimed]
            self._claimed.update(str(path) for path in wanted)
        remote = store if not isinstance(store, RecordingStore) else None
        for path, document in store.load_many(wanted, urgent=True):
            with self._claim_lock:
                self._index(path, document, remote, cache=True)  # served next: not read twice
        return len(named)

    def _index(self, path: Path, document: Any, remote: Store | None, *, cache: bool = False) -> int:
        """Index one loaded file (1), or record why it cannot be served (0)."""
        try:
            if isinstance(document, Exception):
                raise document
            entry = self.add(from_document(document, self.provider_for), path, check=True, cache=cache)
            entry.store = remote
            return 1
        except Exception as exc:  # noqa: BLE001 - one bad file never stops the others loading
            reason = str(exc) if isinstance(exc, LlmproxyError) else _describe(exc)
            self.problems.append(LoadProblem(path, reason))
            log.warning("recording skipped", path=str(path), reason=reason)
            return 0

    def rendered(self, entry: Entry) -> Rendered:
        """The entry's framed response, from the cache or read and framed now (blocking I/O:
        call it off the event loop unless the cache has it)."""
        cached = self.cache.get(entry)
        if cached is not None:
            return cached
        rendered = render(entry.recording(self.provider_for), entry.route)
        self.cache.put(entry, rendered)
        return rendered

    def nearest(self, canonical: CanonicalRequest, count: int = 3, model: str | None = None) -> list[Entry]:
        """The recordings closest to a request that missed, best first.

        Bounded whatever the directory holds: at most NEAREST_CANDIDATES requests are compared
        (same route and path first, the same model first among those), each on at most
        NEAREST_TEXT_BYTES of its body. Blocking CPU work: call it off the event loop.
        """
        groups = self._entries
        endpoint = [group for group in self._by_endpoint.get((canonical.route, canonical.path), []) if group in groups]
        keys: list[Group] = endpoint
        if len(endpoint) > NEAREST_CANDIDATES and model is not None:
            same_model = [key for key in endpoint if groups[key][0].model == model]
            keys = same_model + [key for key in endpoint if groups[key][0].model != model]
        if not keys:
            keys = list(groups)[:NEAREST_CANDIDATES]  # list(): one atomic copy while a loader adds
        candidates = [groups[key][0] for key in keys[:NEAREST_CANDIDATES] if key in groups]
        self.compared = len(candidates)
        wanted = Comparable(canonical)
        scored = sorted(candidates, key=lambda entry: wanted.similarity(entry.canonical), reverse=True)
        return scored[:count]


NEAREST_CANDIDATES = 1000
NEAREST_TEXT_BYTES = 16 * 1024


class Comparable:
    """A request prepared once for comparing with many recordings (its body tokens split once)."""

    def __init__(self, canonical: CanonicalRequest) -> None:
        self.canonical = canonical
        self.tokens = _tokens(canonical.body_json)

    def similarity(self, other: CanonicalRequest) -> float:
        a, b = self.canonical, other
        score = 4.0 * (a.route == b.route) + 8 * (a.path == b.path) + 2 * (a.method == b.method) + (a.query == b.query)
        if a.body_json == b.body_json:
            return score + 4
        theirs = _tokens(b.body_json)
        if not self.tokens or not theirs:
            return score
        return score + 3 * len(self.tokens & theirs) / len(self.tokens | theirs)


def _tokens(body_json: bytes) -> set[bytes]:
    return set(body_json[:NEAREST_TEXT_BYTES].split(b'"'))


def _describe(exc: BaseException) -> str:
    if isinstance(exc, RecursionError):
        return "nested too deep to process"
    return f"{type(exc).__name__}: {exc}"
