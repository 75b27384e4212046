"""The recorder: turn a completed exchange into a recording and write it, off the event loop.

Parsing the body into chunks, checking that they frame back to the received bytes, scanning
for secrets and writing the file all happen in a worker thread after the client was served.
"""

from __future__ import annotations

import asyncio
import bisect
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import structlog

from llmproxy import __version__
from llmproxy.call import Call, Outcome
from llmproxy.canonical import RawBody, public_query
from llmproxy.headers import recorded_response_headers
from llmproxy.providers import Provider
from llmproxy.store.directory import RecordingStore
from llmproxy.store.document import TOOL_NAME, RecordedRequest, RecordedResponse, Recording, to_document
from llmproxy.store.secrets import SecretScanner
from llmproxy.upstream.client import Exchange, body_format
from llmproxy.wire.framing import CapturedBody, capture, capture_opaque, data_of

log = structlog.get_logger("llmproxy.record")


class SecretFound(Exception):
    """A recording would have held a credential; it was not written."""


@dataclass(slots=True)
class Recorder:
    store: RecordingStore
    outcome: Outcome
    scanner: SecretScanner = field(default_factory=SecretScanner)
    # 429 and 5xx answers would poison replay, so they are only kept when asked for.
    record_errors: bool = False
    # Exchanges waiting for the writer may hold this many body bytes; past it, handlers wait
    # (after their client was answered), so a burst is absorbed and a flood slows down.
    max_pending_bytes: int = 64 * 1024 * 1024
    written: list[str] = field(default_factory=list)
    _sequences: dict[str, int] = field(default_factory=dict)
    _pending: set[asyncio.Future[Any]] = field(default_factory=set)
    _room: asyncio.Condition | None = None
    _pending_bytes: int = 0
    # One writer thread: recordings are written in the order exchanges completed, and a burst
    # of completions queues up instead of waking a crowd of threads that fight for the GIL.
    _writer: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmproxy-writer")
    )

    def should_record(self, status: int) -> bool:
        return self.record_errors or (status < 500 and status != 429)

    def next_sequence(self, key: str, after: int = 0) -> int:
        """The sequence the next recording of `key` gets: 1, then 2, 3, ... for repeats. `after`
        is how many recordings of it exist already (record --missing adds to them)."""
        sequence = self._sequences[key] = max(self._sequences.get(key, 0), after) + 1
        return sequence

    def give_back(self, key: str, sequence: int) -> None:
        """Undo `next_sequence` for a call that will not be recorded after all."""
        if self._sequences.get(key) == sequence:
            self._sequences[key] = sequence - 1

    def target(self, call: Call, sequence: int) -> Path:
        return self.store.name_for(
            route=call.route.name, path=call.path, model=call.model, key=call.canonical.key, sequence=sequence
        )

    async def schedule(self, exchange: Exchange, sequence: int, done: Callable[[], None] | None = None) -> None:
        """Write the exchange in the writer thread, then call `done` (there, written or not).

        When clients outpace the disk for long, this waits (after their response was sent),
        which slows them down instead of letting the queue, and memory, grow."""
        if not exchange.complete and not self.record_errors:
            self.outcome.truncated += 1
            if done is not None:
                done()
            return
        if not self.should_record(exchange.status):
            log.warning(
                "not recorded: upstream error status",
                route=exchange.call.route.name,
                path=exchange.call.path,
                status=exchange.status,
            )
            if done is not None:
                done()
            return
        if self._room is None:
            self._room = asyncio.Condition()
        size = len(exchange.body)
        async with self._room:
            await self._room.wait_for(lambda: not self._pending or self._pending_bytes + size <= self.max_pending_bytes)
            self._pending_bytes += size
        future = asyncio.get_running_loop().run_in_executor(self._writer, self._write_then, exchange, sequence, done)
        self._pending.add(future)
        future.add_done_callback(lambda done: asyncio.ensure_future(self._written(done, size)))

    async def _written(self, future: asyncio.Future[Any], size: int) -> None:
        assert self._room is not None
        async with self._room:
            self._pending.discard(future)
            self._pending_bytes -= size
            self._room.notify_all()

    async def drain(self) -> None:
        """Wait for every scheduled write (at shutdown: nothing in flight is lost)."""
        while self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)
        self._writer.shutdown(wait=True)

    def _write_then(self, exchange: Exchange, sequence: int, done: Callable[[], None] | None) -> Path | None:
        try:
            return self.write(exchange, sequence)
        finally:
            if done is not None:
                done()

    def write(self, exchange: Exchange, sequence: int = 1) -> Path | None:
        call = exchange.call
        try:
            recording = build_recording(exchange)
            if _truncated(exchange, recording):
                if not self.record_errors:
                    self.outcome.truncated += 1
                    log.warning(
                        "not recorded: the response was cut short",
                        route=call.route.name,
                        path=call.path,
                        hint="record_errors keeps such answers, marked truncated",
                    )
                    return None
                recording.response.truncated = True
            recording.request.sequence = sequence
            document = to_document(recording)
            data = self.store.serialize(document)
            findings = self.scanner.scan(document, data)
            if findings:
                raise SecretFound("; ".join(str(finding) for finding in findings))
            path = self.store.write(self.target(call, sequence), data)
        except SecretFound as exc:
            self.outcome.refused += 1
            log.error(
                "recording refused: it would hold a credential",
                route=call.route.name,
                path=call.path,
                findings=str(exc),
                hint="remove the credential from the request, or add an ignore rule for that field",
            )
            return None
        except Exception:
            self.outcome.errors += 1
            log.exception("recording not written", route=call.route.name, path=call.path)
            return None
        self.written.append(str(path))
        log.info(
            "recorded",
            route=call.route.name,
            method=call.method,
            path=call.path,
            status=exchange.status,
            file=str(path),
            key=call.canonical.key[:16],
        )
        return path


def _truncated(exchange: Exchange, recording: Recording) -> bool:
    if not exchange.complete:
        return True
    response = recording.response
    if not response.is_streaming:
        return False
    chunks = [data_of(item) for item in response.body]
    return not exchange.call.route.provider.stream_complete(exchange.call.path, chunks, response.framing.get("end", ""))


def capture_response(provider: Provider, path: str, fmt: str, raw: bytes) -> CapturedBody:
    """Chunks and framing for a response body.

    Capture compares every event with its canonical framing as it goes and keeps the exact
    text of any that differ (`framing.verbatim`), so what is stored always frames back to the
    received bytes; only JSON inside chunks may be re-serialised.
    """
    if fmt == "opaque":
        return capture_opaque(raw)
    streaming = fmt in ("sse", "ndjson")
    captured = capture(fmt, raw, lambda value: provider.label(path, streaming, value))
    if captured.framing.get("format") == "json" and "verbatim" not in captured.framing:
        value = provider.json_value(captured.body)
        packed = provider.pack_json(path, value)
        if packed is not None and provider.json_value(packed) == value:
            captured.body = packed
    return captured


def _values(body: Any) -> list[Any]:
    """The JSON values of a stored body: its chunks, or the whole body as one."""
    return [data_of(item) for item in body] if isinstance(body, list) else [data_of(body)]


def build_recording(exchange: Exchange) -> Recording:
    call = exchange.call
    provider = call.route.provider
    content_type = next((v for k, v in exchange.headers if k.lower() == "content-type"), "")
    captured = capture_response(provider, call.path, body_format(content_type), exchange.body)
    base = exchange.url.partition("?")[0]
    query = public_query(call.query)
    request = RecordedRequest(
        method=call.method,
        url=f"{base}?{urlencode(query)}" if query else base,
        path=call.path,
        query=query,
        body=call.body_value,
        raw_body=call.body if isinstance(call.body_value, RawBody) else None,
        model=call.model,
        route=call.route.name,
        headers=dict(call.canonical.headers),
    )
    timing = None
    if captured.is_streaming and exchange.reads:
        read_ends = [end for end, _ in exchange.reads]
        last = len(exchange.reads) - 1
        chunk_ms = [
            round(exchange.reads[min(bisect.bisect_left(read_ends, end), last)][1], 1) for end in captured.chunk_ends
        ]
        timing = {"headers_ms": round(exchange.headers_ms, 1), "chunk_ms": chunk_ms}
    response = RecordedResponse(
        status=exchange.status,
        headers=recorded_response_headers(exchange.headers),
        body=captured.body,
        framing=captured.framing,
        timing=timing,
    )
    provenance = {
        "tool": TOOL_NAME,
        "version": __version__,
        "recorded_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "response_model": provider.response_model(_values(captured.body)),
        "client_user_agent": call.headers.get("user-agent", ""),
    }
    return Recording(request, response, provenance)
