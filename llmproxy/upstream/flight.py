"""One upstream call, read once, fed to every client that asked for it, as it arrives.

A flight reads its upstream response in its own task, so no client's pace or departure decides
what the others (or the recording) get. Each client is a reader: it gets every chunk from the
first, as soon as it was received; an identical call that arrives while the flight is under way
joins it as one more reader, with the same time to first byte as the first one.

Memory is bounded: the body is kept whole only while it is wanted for the recording and under
`keep_bytes`; past that (or when nothing is recorded) only what the slowest reader has not yet
taken is kept, and reading the upstream waits while that exceeds `window` bytes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from llmproxy.call import Call
from llmproxy.lastresort import report_unexpected
from llmproxy.upstream.base import Upstream, UpstreamBroken, UpstreamFailure, UpstreamResponse

DEFAULT_WINDOW = 1024 * 1024


class Flight:
    def __init__(
        self,
        call: Call,
        upstream: Upstream,
        *,
        keep_bytes: int | None,
        persist: bool,
        window: int = DEFAULT_WINDOW,
        journal: bool = False,
        land: Callable[[Flight], Awaitable[None]] | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.call = call
        self._upstream = upstream
        # None keeps nothing beyond what readers still need (a live call that is not recorded).
        self.keep_bytes = keep_bytes
        # Read to the end even when every reader left (to record it whole).
        self.persist = persist
        self.window = window
        self.response: UpstreamResponse | None = None
        self.failure: UpstreamFailure | None = None
        self.broken: str | None = None  # why the body was cut short
        self.abandoned = False  # every reader left and nothing was worth reading on for
        self.over_limit = False  # the body outgrew keep_bytes: not kept whole
        self.received = 0
        self.reads: list[tuple[int, float]] = []  # (bytes so far, ms since sent) after each read
        self.done = False
        # With `journal`, readers get the end of the body only once `mark_journaled` was called.
        self.journaled = not journal
        self._chunks: list[bytes] = []
        self._first = 0  # index (in the whole body) of _chunks[0]; > 0 once chunks were dropped
        self._buffered = 0  # bytes in _chunks
        self._readers: dict[int, int] = {}  # reader id -> index of the next chunk it takes
        self._next_reader = 0
        # One future per task waiting for a change (never shared: a waiter's cancellation
        # cancels only its own); all are woken at each change and look again.
        self._waiters: list[asyncio.Future[None]] = []
        self._pumping = False  # the task is between its first step and the flight's end
        self._land = land
        # Cached: on Python 3.11 each get_running_loop() is a getpid() system call.
        self._loop = loop if loop is not None else asyncio.get_running_loop()
        self._started = time.monotonic()
        self.task = self._loop.create_task(self._run(), name=f"flight {call.method} {call.path}")

    # -- the flight's side ------------------------------------------------------------------

    @property
    def keeping(self) -> bool:
        return self.keep_bytes is not None and not self.over_limit

    @property
    def joinable(self) -> bool:
        """A newcomer can still get the whole body from the first byte."""
        return not self.done and self._first == 0 and (self.keeping or not self.received)

    @property
    def complete(self) -> bool:
        return self.done and self.response is not None and self.broken is None and not self.abandoned

    def body(self) -> bytes | None:
        """The whole body, if it was kept whole."""
        if self._first or not self.keeping:
            return None
        return b"".join(self._chunks)

    async def finished(self) -> None:
        """Wait for the end of the flight (never raises: the outcome is in the attributes)."""
        while not self.done:
            await self._wait()

    def abandon(self) -> None:
        self.abandoned = True
        if self._pumping:  # else it has not begun (and will not), or it ended: its landing goes on
            self.task.cancel()

    def mark_journaled(self) -> None:
        """The flight's recording is journaled (or will not be): readers may end."""
        if not self.journaled:
            self.journaled = True
            self._notify()

    async def _run(self) -> None:
        """Read the upstream, then land (in the same task: no second task per call)."""
        await self._pump()
        if self._land is not None:
            await self._land(self)

    async def _pump(self) -> None:
        response = None
        try:
            if self.abandoned:
                return  # every reader left before it began
            self._pumping = True
            try:
                response = await self._upstream.send(self.call)
            except UpstreamFailure as failure:
                self.failure = failure
                return
            self.response = response
            self._notify()
            chunks = self._chunks
            async for data in response.chunks():
                if not data:
                    continue
                size = len(data)
                self.received += size
                self.reads.append((self.received, (time.monotonic() - self._started) * 1000))
                chunks.append(data)
                self._buffered += size
                if self.keep_bytes is not None and not self.over_limit and self.received > self.keep_bytes:
                    self.over_limit = True
                self._trim()
                self._notify()
                if not self._readers and not (self.persist and self.keeping):
                    self.abandoned = True  # nobody to serve and nothing to record
                    return
                if not self.keeping:
                    # Pass-through pace is the slowest reader's: memory stays at the window.
                    while self._readers and self._unread() > self.window:
                        await self._wait()
        except UpstreamBroken as exc:
            self.broken = str(exc)
        except asyncio.CancelledError:
            self.abandoned = True
            self.task.uncancel()  # handled: the landing that follows runs uncancelled
        except Exception as exc:  # noqa: BLE001 - a bug must not die unseen in this task
            error_id = report_unexpected(
                exc, self.call.headers, self.call.query, method=self.call.method, path=self.call.path
            )
            if self.response is None:
                message = f"llmproxy failed calling upstream {self.call.route.name} (error id {error_id})"
                self.failure = UpstreamFailure(502, "internal_error", message)
            else:
                self.broken = f"internal error {error_id}"
        finally:
            self._pumping = False
            if response is not None:
                response.close()
            self.done = True
            self._notify()

    def _notify(self) -> None:
        waiters = self._waiters
        if waiters:
            self._waiters = []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    async def _wait(self) -> None:
        """Until the next change (the caller looks again)."""
        waiter = self._loop.create_future()
        self._waiters.append(waiter)
        await waiter

    def _unread(self) -> int:
        if not self._readers:
            return 0
        slowest = min(self._readers.values())
        return sum(len(chunk) for chunk in self._chunks[slowest - self._first :])

    def _trim(self) -> None:
        """Drop chunks every reader has taken, unless the body is kept whole for the recording."""
        if self.keeping:
            return
        upto = min(self._readers.values()) if self._readers else self._first + len(self._chunks)
        drop = upto - self._first
        if drop > 0:
            self._buffered -= sum(len(chunk) for chunk in self._chunks[:drop])
            del self._chunks[:drop]
            self._first = upto

    # -- the readers' side ------------------------------------------------------------------

    def join(self) -> int:
        reader = self._next_reader
        self._next_reader += 1
        self._readers[reader] = self._first
        return reader

    def leave(self, reader: int) -> None:
        """A reader is done (or its client left); with nobody left, stop unless persisting."""
        if self._readers.pop(reader, None) is None:
            return
        if not self._readers and not self.done and not (self.persist and self.keeping):
            self.abandon()
        elif not self.done:
            self._trim()
            self._notify()

    async def headers(self) -> UpstreamResponse | UpstreamFailure:
        """The upstream's response (status and headers), or why there is none."""
        while self.response is None and self.failure is None and not self.done:
            await self._wait()
        if self.response is not None:
            return self.response
        if self.failure is not None:
            return self.failure
        return UpstreamFailure(502, "upstream_unreachable", f"the call to upstream {self.call.route.name} was dropped")

    async def journaled_end(self) -> None:
        """Wait until the recording is journaled (or will not be): then a reader may end."""
        while not self.journaled:
            await self._wait()

    def take(self, reader: int) -> list[bytes] | None:
        """The chunks the reader has not taken yet, now ([] when none came since: wait for
        `changed`), or None once it has taken the whole body (or left)."""
        position = self._readers.get(reader)
        if position is None:
            return None
        end = self._first + len(self._chunks)
        if position >= end:
            return None if self.done else []
        batch = self._chunks[position - self._first :]
        self._readers[reader] = end
        if not self.keeping:
            self._trim()
            self._notify()  # the pump may be waiting for room
        return batch

    async def changed(self) -> None:
        """Until the flight changes (a chunk, its end, a reader leaving): then look again."""
        await self._wait()

    async def chunks(self, reader: int) -> AsyncIterator[bytes]:
        """Every chunk of the body from the first, as the flight receives them."""
        while (batch := self.take(reader)) is not None:
            if not batch:
                await self._wait()
                continue
            for chunk in batch:
                yield chunk
