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

import orjson
import structlog

from llmproxy import __version__
from llmproxy.call import Call, NotRecorded, Outcome
from llmproxy.canonical import RawBody, public_query
from llmproxy.headers import recorded_response_headers
from llmproxy.providers import Provider
from llmproxy.store.base import Store
from llmproxy.store.document import TOOL_NAME, RecordedRequest, RecordedResponse, Recording, to_document
from llmproxy.store.secrets import SecretScanner, request_credentials
from llmproxy.upstream.client import Exchange
from llmproxy.wire.framing import CapturedBody, Codec, Format, data_of
from llmproxy.wire.opaque import OPAQUE
from llmproxy.wire.registry import codec_for_content_type

log = structlog.get_logger("llmproxy.record")


class SecretFound(Exception):
    """A recording would have held a credential; it was not written."""


@dataclass(slots=True)
class Recorder:
    store: Store
    outcome: Outcome
    scanner: SecretScanner = field(default_factory=SecretScanner)
    # 429 and 5xx answers would poison replay, so they are only kept when asked for.
    record_errors: bool = False
    # Exchanges waiting for the writer may hold this many body bytes; past it, handlers wait
    # (after their client was answered), so a burst is absorbed and a flood slows down.
    max_pending_bytes: int = 64 * 1024 * 1024
    # secrets = "redact": credentials found are replaced by placeholders instead of refusing.
    redact: bool = False
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

    def known(self, key: str) -> int:
        """The highest sequence of `key` this recorder gave out or wrote."""
        return self._sequences.get(key, 0)

    def give_back(self, key: str, sequence: int) -> None:
        """Undo `next_sequence` for a call that will not be recorded after all."""
        if self._sequences.get(key) == sequence:
            self._sequences[key] = sequence - 1

    def target(self, call: Call, sequence: int) -> Path:
        return self.store.name_for(
            route=call.route.name, path=call.path, model=call.model, key=call.canonical.key, sequence=sequence
        )

    async def schedule(
        self, exchange: Exchange, sequence: int, done: Callable[[Path | None], None] | None = None
    ) -> None:
        """Write the exchange in the writer thread, then call `done` there with the file written
        (None when it was not).

        When clients outpace the disk for long, this waits (after their response was sent),
        which slows them down instead of letting the queue, and memory, grow."""
        if not exchange.complete and not self.record_errors:
            self.outcome.note_not_recorded(NotRecorded.TRUNCATED)
            log.warning(
                "not recorded: the upstream broke off the response",
                route=exchange.call.route.name,
                path=exchange.call.path,
                hint="record_errors keeps such answers, marked truncated",
            )
            if done is not None:
                done(None)
            return
        if not self.should_record(exchange.status):
            self.outcome.note_not_recorded(NotRecorded.UPSTREAM_STATUS)
            log.warning(
                "not recorded: upstream error status",
                route=exchange.call.route.name,
                path=exchange.call.path,
                status=exchange.status,
                hint="record_errors keeps 429 and 5xx answers",
            )
            if done is not None:
                done(None)
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

    def _write_then(self, exchange: Exchange, sequence: int, done: Callable[[Path | None], None] | None) -> Path | None:
        path = None
        try:
            path = self.write(exchange, sequence)
            return path
        finally:
            if done is not None:
                done(path)

    def write(self, exchange: Exchange, sequence: int = 1) -> Path | None:
        call = exchange.call
        try:
            recording = build_recording(exchange)
            if _truncated(exchange, recording):
                if not self.record_errors:
                    self.outcome.note_not_recorded(NotRecorded.TRUNCATED)
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
            # This request's own credentials are searched for too: upstreams echo keys back.
            values = request_credentials(call.headers, call.query)
            findings = self.scanner.scan(document, data, values)
            if findings and self.redact:
                document = self.scanner.redact(document, values)
                data = self.store.serialize(document)
                log.warning(
                    "credentials redacted from the recording",
                    route=call.route.name,
                    path=call.path,
                    fields=[str(finding) for finding in findings],
                )
                findings = self.scanner.scan(document, data, values)
            if findings:
                raise SecretFound("; ".join(str(finding) for finding in findings))
            path = self._write_new(call, document, data)
        except SecretFound as exc:
            self.outcome.note_not_recorded(NotRecorded.SECRET)
            log.error(
                "recording refused: it would hold a credential",
                route=call.route.name,
                path=call.path,
                findings=str(exc),
                hint='set secrets = "redact" to record it with the value replaced, or list a test key in secret_allow',
            )
            return None
        except Exception:
            self.outcome.note_not_recorded(NotRecorded.WRITE_FAILED)
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

    def _write_new(self, call: Call, document: dict[str, Any], data: bytes) -> Path:
        """Write under the first free sequence from the one assigned: create-only, so a repeat
        recorded by another process (or an earlier run) on this directory is never replaced.
        Taking a name is one atomic link; losing the race just moves on to the next number."""
        key = call.canonical.key
        sequence = int(document["request"].get("sequence", 1))
        for attempt in range(MAX_NAME_ATTEMPTS):
            try:
                path = self.store.write(self.target(call, sequence), data)
            except FileExistsError:
                # Jump past every repeat already on disk once, then step (races are rare).
                taken = (
                    self.store.highest_sequence(call.route.name, key, name=self.target(call, 1))
                    if attempt == 0
                    else sequence
                )
                sequence = max(sequence, taken) + 1
                document["request"]["sequence"] = sequence
                data = self.store.serialize(document)
                continue
            # GIL-atomic; a stale read elsewhere only costs one more FileExistsError.
            self._sequences[key] = max(self._sequences.get(key, 0), sequence)
            return path
        raise RuntimeError(f"no free sequence for key {key[:16]} after {MAX_NAME_ATTEMPTS} attempts")


MAX_NAME_ATTEMPTS = 1000


def _truncated(exchange: Exchange, recording: Recording) -> bool:
    if not exchange.complete:
        return True
    response = recording.response
    if not response.is_streaming:
        return False
    chunks = [data_of(item) for item in response.body]
    return not exchange.call.route.provider.stream_complete(exchange.call.path, chunks, response.framing.get("end", ""))


def capture_response(provider: Provider, path: str, codec: Codec, raw: bytes) -> CapturedBody:
    """Chunks and framing for a response body.

    Capture compares every event with its rendering as it goes and keeps the exact text of any
    that differ (`framing.verbatim`), so what is stored always renders back to the received bytes.
    """
    streaming = codec.streaming
    captured = codec.capture(raw, lambda value: provider.label(path, streaming, value))
    if captured.framing.get("format") == Format.JSON and "verbatim" not in captured.framing:
        value = provider.json_value(captured.body)
        packed = provider.pack_json(path, value)
        # Compared as bytes, not as values: key order must survive the packing too.
        if packed is not None and orjson.dumps(provider.json_value(packed)) == orjson.dumps(value):
            captured.body = packed
    # The codecs promise this; checked here so a codec bug costs a readable file, never a byte.
    try:
        exact = b"".join(codec.render(captured.body, captured.framing, provider.json_value)) == raw
    except ValueError:
        exact = False
    if not exact:
        log.warning("body does not render back exactly; stored whole", path=path, codec=codec.name)
        return OPAQUE.capture(raw)
    return captured


def _values(body: Any) -> list[Any]:
    """The JSON values of a stored body: its chunks, or the whole body as one."""
    return [data_of(item) for item in body] if isinstance(body, list) else [data_of(body)]


def build_recording(exchange: Exchange) -> Recording:
    call = exchange.call
    provider = call.route.provider
    content_type = next((v for k, v in exchange.headers if k.lower() == "content-type"), "")
    captured = capture_response(provider, call.path, codec_for_content_type(content_type), exchange.body)
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
