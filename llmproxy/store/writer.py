"""The recorder: turn a completed exchange into a recording and write it, off the event loop.

Parsing the body into chunks, checking that they frame back to the received bytes, scanning for
secrets and journaling happen before the client gets its end (on the loop, or in the preparer
thread for big exchanges); the file is then written by the file writer process (store/fileproc.py)
or, where it cannot run, by a writer thread.
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from operator import itemgetter
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import orjson
import structlog

from llmproxy import __version__
from llmproxy.call import Call, NotRecorded, Outcome
from llmproxy.canonical import RawBody, public_query
from llmproxy.config import JournalMode, WriterKind
from llmproxy.headers import recorded_response_headers
from llmproxy.logs import debug_enabled
from llmproxy.providers import Provider
from llmproxy.store.base import Store
from llmproxy.store.directory import StoreError
from llmproxy.store.document import TOOL_NAME, RecordedRequest, RecordedResponse, Recording, to_document
from llmproxy.store.fileproc import STALL_SECONDS, FileWriterProcess, Results
from llmproxy.store.journal import Journal, Target, frame_entries, write_new
from llmproxy.store.secrets import JOINED, SecretScanner
from llmproxy.upstream.client import Exchange
from llmproxy.wire.framing import DATA_KEY, TYPE_KEY, CapturedBody, Codec, ConstantLabel, Format, data_of
from llmproxy.wire.json import JSON
from llmproxy.wire.opaque import OPAQUE
from llmproxy.wire.registry import codec_for_content_type

log = structlog.get_logger("llmproxy.record")


class SecretFound(Exception):
    """A recording would have held a credential; it was not written."""


@dataclass(slots=True)
class Prepared:
    """A recording in its final form: the bytes its file gets, and where it goes."""

    call: Call
    status: int
    target: Target
    data: bytes
    entry: int | None = None  # its journal entry
    size: int = 0  # bytes it holds while queued (the body and the recording)
    done: Callable[[str | None], None] | None = None


@dataclass(slots=True)
class Recorder:
    store: Store
    outcome: Outcome
    scanner: SecretScanner = field(default_factory=SecretScanner)
    # 429 and 5xx answers would poison replay, so they are only kept when asked for.
    record_errors: bool = False
    # Exchanges waiting to be prepared or written hold at most about this many bytes (bodies and
    # their recordings); past it, new calls wait before going upstream (`room`), so a flood is
    # slowed down at its source and never a client's stream already under way.
    max_pending_bytes: int = 32 * 1024 * 1024
    # secrets = "redact": credentials found are replaced by placeholders instead of refusing.
    redact: bool = False
    # The write-ahead journal (store/journal.py): "fsync" also survives a power cut, "off" none.
    journal_mode: JournalMode = "on"
    # Who creates the files: a child process (directory stores on POSIX; no GIL shared with the
    # event loop, see store/fileproc.py) or a thread (buckets, and wherever the process cannot run).
    writer: WriterKind = "process"
    # Seconds the writer process may answer nothing while the proxy waits to stop before it is
    # killed and a thread writes the rest.
    stall_seconds: float = STALL_SECONDS
    # Test hook: runs in the writer thread before each file (a slow or stuck disk); set, the
    # files are written by the thread.
    before_write: Callable[[], None] | None = None
    written: list[str] = field(default_factory=list)
    journal: Journal | None = None
    _sequences: dict[str, int] = field(default_factory=dict)
    _pending: int = 0  # recordings handed to the writer thread and not yet written
    _waiting_room: list[asyncio.Future[None]] = field(default_factory=list)
    _pending_bytes: int = 0
    # Small exchanges are prepared (parsed, checked, scanned, serialised, journaled) on the event
    # loop: handing them to a thread costs more, and a CPU-bound thread makes the loop wait for the
    # GIL on every socket call. Bigger ones go to the preparer thread, so the loop is never held
    # long. The writer thread only creates files, in the order exchanges completed.
    _preparer: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmproxy-prepare")
    )
    _queue: queue.SimpleQueue[list[Prepared] | None] = field(default_factory=queue.SimpleQueue)
    # Prepared and waiting for this loop iteration's journal append, with their journaled callbacks.
    _outbox: list[tuple[Prepared, Callable[[], None] | None]] = field(default_factory=list)
    _writer: threading.Thread | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    _idle: asyncio.Event | None = None
    _files: FileWriterProcess | None = None
    _files_started: asyncio.Task[None] | None = None
    _sent: dict[int, Prepared] = field(default_factory=dict)  # handed to the process, by entry id
    _feed_ids: int = 0  # entry ids when there is no journal to number them

    def should_record(self, status: int) -> bool:
        return self.record_errors or (status < 500 and status != 429)

    def next_sequence(self, key: str, after: int = 0) -> int:
        """The sequence the next recording of `key` (a call's scoped key) gets: 1, then 2, 3, ...
        for repeats. `after` is how many recordings of it exist already (record --missing adds
        to them)."""
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
            route=call.route.name,
            path=call.path,
            model=call.model,
            key=call.canonical.key,
            sequence=sequence,
            scope=call.scope,
        )

    @property
    def pending_bytes(self) -> int:
        return self._pending_bytes

    @property
    def writer_pid(self) -> int | None:
        """The file writer process's pid (None: files are written by a thread)."""
        return self._files.pid if self._files is not None else None

    @property
    def waiting(self) -> int:
        """Calls waiting for room before going upstream."""
        return len(self._waiting_room)

    async def room(self) -> None:
        """Wait until the queue of recordings is under its byte bound (before a new upstream call)."""
        while self._pending_bytes > self.max_pending_bytes:
            assert self._loop is not None  # bytes are pending only after a schedule
            waiter = self._loop.create_future()
            self._waiting_room.append(waiter)
            await waiter

    def _release(self, size: int) -> None:
        self._pending_bytes -= size
        if self._waiting_room and self._pending_bytes <= self.max_pending_bytes:
            waiters, self._waiting_room = self._waiting_room, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    async def schedule(
        self,
        exchange: Exchange,
        sequence: int,
        done: Callable[[str | None], None] | None = None,
        journaled: Callable[[], None] | None = None,
    ) -> None:
        """Prepare the exchange's recording (journaled when `journaled` is called: the client may
        get its end), then have the writer process (or thread) write its file; `done` is called on
        the event loop with the file written (None when it was not)."""
        try:
            if not exchange.complete and not self.record_errors:
                self._dropped(exchange, NotRecorded.TRUNCATED)
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
                self._dropped(exchange, NotRecorded.UPSTREAM_STATUS)
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
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            starting = self._files_starting()
            if not starting.done():
                await asyncio.shield(starting)
            # What a queued exchange holds beyond its bytes (its call, flight, headers): counted, so
            # that many small recordings cannot hold much more memory than the bound says.
            body_size = len(exchange.body) + len(exchange.call.body) + QUEUED_OVERHEAD
            self._pending_bytes += body_size
            try:
                if body_size <= INLINE_PREPARE_BYTES:
                    prepared = self.prepare(exchange, sequence)
                else:
                    prepared = await self._loop.run_in_executor(self._preparer, self.prepare, exchange, sequence)
            except BaseException:
                self._release(body_size)
                raise
            if prepared is None:
                self._release(body_size)
                if done is not None:
                    done(None)
                return
            prepared.size = body_size + len(prepared.data)
            prepared.done = done
            self._pending_bytes += len(prepared.data)
            self._pending += 1
            self._outbox.append((prepared, journaled))
            if len(self._outbox) == 1:
                self._loop.call_soon(self._flush)
            journaled = None  # _flush tells it, once journaled
        finally:
            if journaled is not None:
                journaled()

    async def start(self) -> None:
        """Start the file writer process now rather than at the first recording (whose file
        would otherwise wait for the child's start-up)."""
        self._loop = asyncio.get_running_loop()
        await self._files_starting()

    def _files_starting(self) -> asyncio.Task[None]:
        """Starting the file writer process, once (at start, or at the first recording)."""
        if self._files_started is None:
            assert self._loop is not None
            self._files_started = self._loop.create_task(self._start_files())
        return self._files_started

    async def _start_files(self) -> None:
        """The file writer process, where it can run; else files are written by a thread."""
        root = self.store.root
        if self.writer != "process" or root is None or os.name != "posix" or self.before_write is not None:
            return
        files = FileWriterProcess(
            root, durable=self.store.durable, on_results=self._files_written, on_exit=self._files_gone
        )
        try:
            await files.start()
        except (OSError, RuntimeError) as exc:
            log.warning("file writer process not started: writing in a thread", error=str(exc))
            return
        self._files = files

    def _flush(self) -> None:
        """Once per loop iteration: journal what was prepared in one append, tell the flights
        (their clients may get their ends), then hand it all to the writer process (or thread) in
        one write (each wake-up of another thread costs the loop a GIL handoff)."""
        batch, self._outbox = self._outbox, []
        if not batch:
            return
        prepared_batch = [prepared for prepared, _ in batch]
        files = self._files if self._files is not None and self._files.alive else None
        # A bucket has no directory on this machine to journal in: its recordings are written
        # (a durable PUT) right after, unjournaled.
        if self.journal_mode != "off" and self.store.root is not None and self.journal is None:
            try:
                self.journal = Journal(self.store.root, fsync="always" if self.journal_mode == "fsync" else "off")
            except OSError as exc:
                log.error("journal not created: these recordings are lost if the proxy is killed", error=str(exc))
        frames = b""
        if self.journal is not None or files is not None:
            if self.journal is not None:
                entries = self.journal.next_ids(len(batch))
            else:
                entries = list(range(self._feed_ids + 1, self._feed_ids + 1 + len(batch)))
                self._feed_ids += len(batch)
            # The same bytes go to the journal and to the writer process.
            recordings = [(prepared.target, prepared.data) for prepared in prepared_batch]
            frames = b"".join(frame_entries(zip(entries, recordings, strict=True)))
            if self.journal is not None:
                try:
                    self.journal.append_framed(frames, entries)
                except OSError as exc:
                    log.error(
                        "journal not written: these recordings are lost if the proxy is killed",
                        count=len(batch),
                        error=str(exc),
                    )
                else:
                    for prepared, entry in zip(prepared_batch, entries, strict=True):
                        prepared.entry = entry
            if files is not None:
                for prepared, entry in zip(prepared_batch, entries, strict=True):
                    self._sent[entry] = prepared
        for _, journaled in batch:
            if journaled is not None:
                journaled()  # from here a kill loses nothing the client gets
        if files is not None:
            if files.send(frames):
                return
            for entry in entries:  # it is gone: the thread writes these
                self._sent.pop(entry, None)
        self._to_thread(prepared_batch)

    def _to_thread(self, batch: list[Prepared]) -> None:
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_queued, name="llmproxy-writer", daemon=True)
            self._writer.start()
        self._queue.put(batch)

    def _files_written(self, results: Results) -> None:
        """The writer process's answers to one batch (on the loop)."""
        written: list[tuple[Prepared, str | None]] = []
        done: list[int] = []
        sent = self._sent
        for answer in results:
            prepared = sent.pop(answer[0], None)
            if prepared is None:
                continue
            path = answer[1]
            if path is None:
                self._not_written(prepared, answer[2] if len(answer) > 2 else "unknown error")
            else:
                self._note_written(prepared, path)
                if prepared.entry:
                    done.append(prepared.entry)
            written.append((prepared, path))
        if self.journal is not None:
            self.journal.done(done)
        self._written(written)

    def _files_gone(self, code: int | None) -> None:
        """The writer process exited: expected at shutdown; otherwise its outstanding entries
        (journaled, so not lost either way) go to a thread, which writes from now on."""
        files, self._files = self._files, None
        if files is not None and not files.closing and not files.killed:
            log.error(
                "file writer process exited: writing in a thread from now on", code=code, outstanding=len(self._sent)
            )
        if self._sent:
            outstanding = [self._sent[entry] for entry in sorted(self._sent)]
            self._sent.clear()
            # Entries it wrote but did not answer for are recognised (same bytes), not duplicated.
            self._to_thread(outstanding)

    def _write_queued(self) -> None:
        """The writer thread: files for everything queued, in order; the loop hears of them in batches
        (one wake-up for many files)."""
        assert self._loop is not None
        while True:
            batch = self._queue.get()
            if batch is None:
                return
            written = [(prepared, self._write_prepared(prepared)) for prepared in batch]
            if self.journal is not None:
                self.journal.done([prepared.entry for prepared, path in written if path and prepared.entry])
            try:
                self._loop.call_soon_threadsafe(self._written, written)
            except RuntimeError:  # the loop is closed: nobody is left to tell
                pass

    def _written(self, written: list[tuple[Prepared, str | None]]) -> None:
        for prepared, path in written:
            self._pending -= 1
            self._release(prepared.size)
            if prepared.done is not None:
                prepared.done(path)
        if not self._pending and self._idle is not None:
            self._idle.set()

    async def drain(self) -> None:
        """Wait for every scheduled write (at shutdown: nothing in flight is lost), with progress."""
        if self._pending:
            log.info("shutting down: writing queued recordings", queued=self._pending)
        left, progressed = self._pending, time.monotonic()
        while self._pending:
            self._idle = asyncio.Event()
            try:
                await asyncio.wait_for(self._idle.wait(), timeout=1.0)
            except TimeoutError:
                log.info("shutting down: writing queued recordings", left=self._pending)
            if self._pending != left:
                left, progressed = self._pending, time.monotonic()
            elif self._files is not None and time.monotonic() - progressed > self.stall_seconds:
                log.error(
                    "file writer process answered nothing while stopping: killed; writing the rest in a thread",
                    seconds=self.stall_seconds,
                    left=self._pending,
                )
                self._files.kill()
                progressed = time.monotonic()
        if self._files is not None:
            files = self._files
            code = await files.close(timeout=self.stall_seconds)
            if code is None:
                log.error("file writer process did not stop: killed", seconds=self.stall_seconds)
            elif code:
                log.warning("file writer process exited with an error", code=code)
        while self._pending:  # what a process that died at the end handed back to the thread
            self._idle = asyncio.Event()
            await self._idle.wait()
        if self._writer is not None:
            self._queue.put(None)
            await asyncio.get_running_loop().run_in_executor(None, self._writer.join)
            self._writer = None
        self._preparer.shutdown(wait=True)
        if self.journal is not None:
            left = self.journal.close()
            if left:
                log.error(
                    "recordings not written; kept in the journal for the next start or check --fix",
                    count=left,
                    journal=str(self.journal.path),
                )

    def write(self, exchange: Exchange, sequence: int = 1) -> Path | None:
        """Prepare and write in the calling thread (tools and tests)."""
        prepared = self.prepare(exchange, sequence)
        path = None if prepared is None else self._write_prepared(prepared)
        return None if path is None else Path(path)

    def _write_prepared(self, prepared: Prepared) -> str | None:
        """The writer thread's part: only I/O."""
        call = prepared.call
        try:
            if self.before_write is not None:
                self.before_write()
            path = write_new(self.store, prepared.target, prepared.data)
        except (OSError, StoreError) as exc:  # a full, read-only or vanished disk: one line, no traceback
            self._not_written(prepared, f"{type(exc).__name__}: {exc}")
            return None
        except Exception:  # a bug: its traceback helps
            self.outcome.note_not_recorded(NotRecorded.WRITE_FAILED)
            log.exception(
                "recording not written (kept in the journal)" if prepared.entry else "recording not written",
                route=call.route.name,
                path=call.path,
            )
            return None
        return self._note_written(prepared, path)

    def _note_written(self, prepared: Prepared, path: str) -> str:
        call = prepared.call
        key = call.scoped_key
        # GIL-atomic; a stale read elsewhere only costs one more FileExistsError.
        sequence = prepared.target.sequence
        if self._sequences.get(key, 0) < sequence:
            self._sequences[key] = sequence
        self.written.append(path)
        if debug_enabled():
            log.debug(
                "recorded",
                route=call.route.name,
                method=call.method,
                path=call.path,
                status=prepared.status,
                file=path,
                key=call.canonical.key[:16],
                scope=call.scope,
            )
        return path

    def _dropped(self, exchange: Exchange, reason: NotRecorded) -> None:
        self.outcome.note_not_recorded(reason)
        exchange.dropped = reason.value

    def _not_written(self, prepared: Prepared, error: str) -> None:
        self.outcome.note_not_recorded(NotRecorded.WRITE_FAILED)
        log.error(
            "recording not written (kept in the journal)" if prepared.entry else "recording not written",
            route=prepared.call.route.name,
            path=prepared.call.path,
            error=error,
        )

    def prepare(self, exchange: Exchange, sequence: int = 1) -> Prepared | None:
        """The recording in its final bytes, scanned for secrets, journaled (None: not recorded)."""
        call = exchange.call
        try:
            recording, captured, chunk_values = _build(exchange)
            if _truncated(exchange, recording, chunk_values):
                if not self.record_errors:
                    self._dropped(exchange, NotRecorded.TRUNCATED)
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
            values = call.credentials()
            findings = self.scanner.scan(document, data, values, _compact_pieces(document, captured))
            if findings and self.redact:
                document = self.scanner.redact(document, values)
                split = [str(finding) for finding in findings if finding.field.endswith(JOINED)]
                if split and not self.scanner.redact_joined(document, values):
                    # A chunk kept as its exact text holds its piece of the key there too.
                    log.warning(
                        "a credential split across stream chunks cannot be redacted: recording refused",
                        route=call.route.name,
                        path=call.path,
                        fields=split,
                        hint="a chunk holding a piece of it is kept as its exact text",
                    )
                    raise SecretFound("; ".join(split))
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
            model = recording.request.model  # call.model, worked out once
            target = Target(call.route.name, call.path, model, call.canonical.key, sequence, call.scope)
            # Only this, what passed the scan, is journaled: the journal never holds a credential.
            return Prepared(call, exchange.status, target, data)
        except SecretFound as exc:
            self._dropped(exchange, NotRecorded.SECRET)
            log.error(
                "recording refused: it would hold a credential",
                route=call.route.name,
                path=call.path,
                findings=str(exc),
                hint='set secrets = "redact" to record it with the value replaced, or list a test key in secret_allow',
            )
            return None
        except Exception:
            self._dropped(exchange, NotRecorded.WRITE_FAILED)
            log.exception("recording not written", route=call.route.name, path=call.path)
            return None


MAX_NAME_ATTEMPTS = 1000
# Exchanges up to this size (request and response bodies) are prepared on the event loop.
INLINE_PREPARE_BYTES = 64 * 1024
QUEUED_OVERHEAD = 8 * 1024


def _truncated(exchange: Exchange, recording: Recording, values: list[Any] | None = None) -> bool:
    """`values`: the JSON values of the response's chunks, when they are at hand."""
    if not exchange.complete:
        return True
    response = recording.response
    if not response.is_streaming:
        return False
    body = response.body
    chunks = values if values is not None and isinstance(body, list) else _chunk_values(body)
    return not exchange.call.route.provider.stream_complete(exchange.call.path, chunks, response.framing.get("end", ""))


def _compact_pieces(document: dict[str, Any], captured: CapturedBody) -> list[bytes] | None:
    """The document's compact JSON for the secret scan's quick pass, in pieces, without
    serialising the response body a second time: the capture has its values' compact text
    already (`captured.compact`). Every piece is cut next to a bracket, comma or colon, so that
    text holding none of those is in some piece exactly when it is in the whole (see
    `SecretScanner.scan`). None: no such text at hand (the scanner serialises the document)."""
    response = document.get("response")
    if captured.compact is None or not isinstance(response, dict) or response.get("body") is not captured.body:
        return None
    body = captured.body
    try:  # each item is typed(label, value) where a capture sets `compact`
        labels = set(map(itemgetter(TYPE_KEY), body if isinstance(body, list) else [body]))
    except (KeyError, TypeError):
        return None
    # What stands around each value in the body: `{"__type__":"<label>","__data__":` and `}`.
    around = orjson.dumps([TYPE_KEY, DATA_KEY, *sorted(labels)])
    rest = orjson.dumps({**document, "response": {**response, "body": None}})
    return [rest, around, captured.compact]


def capture_response(provider: Provider, path: str, codec: Codec, raw: bytes) -> CapturedBody:
    """Chunks and framing for a response body.

    Capture compares every event with its rendering as it goes and keeps the exact text of any
    that differ (`framing.verbatim`), so what is stored always renders back to the received bytes.
    """
    streaming = codec.streaming
    constant = provider.constant_label(path, streaming)
    # One call per chunk, unless the provider's label is the same for every value.
    labeler = ConstantLabel(constant) if constant is not None else functools.partial(provider.label, path, streaming)
    captured = codec.capture(raw, labeler)
    if captured.framing.get("format") == Format.JSON and "verbatim" not in captured.framing:
        value = provider.json_value(captured.body)
        packed = provider.pack_json(path, value)
        # Compared as bytes, not as values: key order must survive the packing too.
        if packed is not None and orjson.dumps(provider.json_value(packed)) == orjson.dumps(value):
            captured.body = packed
            captured.values = captured.compact = None
        elif codec is JSON and value is data_of(captured.body):
            # Rendering writes this very value in the style the codec proved spells `raw`
            # (plus the same end): the bytes are the received ones without a second rendering.
            captured.exact = True
    # The codecs promise this; checked here so a codec bug costs a readable file, never a byte
    # (unless the capture proved it already: a second rendering of a long stream costs a fifth).
    if captured.exact:
        return captured
    try:
        exact = b"".join(codec.render(captured.body, captured.framing, provider.json_value)) == raw
    except ValueError:
        exact = False
    if not exact:
        log.warning("body does not render back exactly; stored whole", path=path, codec=codec.name)
        return OPAQUE.capture(raw)
    return captured


def chunk_times(reads: list[tuple[int, float]], chunk_ends: list[int]) -> list[float]:
    """When each chunk had arrived: the time of the first read that brought its last byte (the
    last read's for a chunk past them all), in ms to one decimal.

    Reads are cumulative byte counts, so they grow; chunk ends (offsets from the codecs) grow
    too, and then the chunks one read brought are found by one bisection per read and share its
    time, rounded once (a read brings many chunks of a fast stream)."""
    last = len(reads) - 1
    if chunk_ends != sorted(chunk_ends):  # never from the codecs: each chunk looked up alone
        read_ends = [end for end, _ in reads]
        return [round(reads[min(bisect.bisect_left(read_ends, end), last)][1], 1) for end in chunk_ends]
    times: list[float] = []
    count = len(chunk_ends)
    for index, (read_end, read_ms) in enumerate(reads):
        upto = count if index == last else bisect.bisect_right(chunk_ends, read_end, len(times))
        if upto > len(times):
            times += [round(read_ms, 1)] * (upto - len(times))
            if len(times) == count:
                break
    return times


def _values(body: Any) -> list[Any]:
    """The JSON values of a stored body: its chunks, or the whole body as one."""
    return _chunk_values(body) if isinstance(body, list) else [data_of(body)]


def _chunk_values(chunks: list[Any]) -> list[Any]:
    """data_of of each chunk, inline: a stream has thousands."""
    return [item.get(DATA_KEY) if isinstance(item, dict) and TYPE_KEY in item else item for item in chunks]


_stamp: tuple[int, str] = (0, "")


def _recorded_at() -> str:
    """Now, to the second, in ISO form: formatted once a second, not once per recording."""
    global _stamp
    second = int(time.time())
    stamp = _stamp  # one read: the preparer thread may replace it meanwhile
    if stamp[0] != second:
        stamp = _stamp = (second, datetime.fromtimestamp(second, UTC).isoformat(timespec="seconds"))
    return stamp[1]


def build_recording(exchange: Exchange) -> Recording:
    return _build(exchange)[0]


def _build(exchange: Exchange) -> tuple[Recording, CapturedBody, list[Any]]:
    """The recording, the capture it was made of, and the JSON values of its response (the
    chunks', or the body's)."""
    call = exchange.call
    provider = call.route.provider
    content_type = next((v for k, v in exchange.headers if k.lower() == "content-type"), "")
    captured = capture_response(provider, call.path, codec_for_content_type(content_type), exchange.body)
    values = captured.values if captured.values is not None else _values(captured.body)
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
        scope=call.scope,
    )
    timing = None
    if captured.is_streaming and exchange.reads:
        chunk_ms = chunk_times(exchange.reads, captured.chunk_ends)
        timing = {"headers_ms": round(exchange.headers_ms, 1), "chunk_ms": chunk_ms}
    response = RecordedResponse(
        status=exchange.status,
        headers=recorded_response_headers(exchange.headers, provider.response_headers),
        body=captured.body,
        framing=captured.framing,
        timing=timing,
    )
    provenance = {
        "tool": TOOL_NAME,
        "version": __version__,
        "recorded_at": _recorded_at(),
        "response_model": provider.response_model(values),
        "client_user_agent": call.headers.get("user-agent", ""),
    }
    return Recording(request, response, provenance), captured, values
