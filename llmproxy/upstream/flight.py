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
from collections.abc import AsyncIterator

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
        self._chunks: list[bytes] = []
        self._first = 0  # index (in the whole body) of _chunks[0]; > 0 once chunks were dropped
        self._buffered = 0  # bytes in _chunks
        self._readers: dict[int, int] = {}  # reader id -> index of the next chunk it takes
        self._next_reader = 0
        self._changed = asyncio.Condition()
        self._headers = asyncio.get_running_loop().create_future()
        self._started = time.monotonic()
        self._task = asyncio.create_task(self._pump(), name=f"flight {call.method} {call.path}")

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
        await asyncio.wait([self._task])

    def abandon(self) -> None:
        self.abandoned = True
        self._task.cancel()

    async def _pump(self) -> None:
        response = None
        try:
            try:
                response = await self._upstream.send(self.call)
            except UpstreamFailure as failure:
                self.failure = failure
                self._headers.set_result(None)
                return
            self.response = response
            self._headers.set_result(None)
            async for data in response.chunks():
                if not data:
                    continue
                self.received += len(data)
                self.reads.append((self.received, (time.monotonic() - self._started) * 1000))
                async with self._changed:
                    self._chunks.append(data)
                    self._buffered += len(data)
                    if self.keeping and self.received > self.keep_bytes:  # type: ignore[operator]
                        self.over_limit = True
                    self._trim()
                    self._changed.notify_all()
                    if not self._readers and not (self.persist and self.keeping):
                        self.abandoned = True  # nobody to serve and nothing to record
                        return
                    if not self.keeping:
                        # Pass-through pace is the slowest reader's: memory stays at the window.
                        await self._changed.wait_for(lambda: not self._readers or self._unread() <= self.window)
        except UpstreamBroken as exc:
            self.broken = str(exc)
        except asyncio.CancelledError:
            self.abandoned = True
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
            if not self._headers.done():
                self._headers.set_result(None)
            if response is not None:
                response.close()
            async with self._changed:
                self.done = True
                self._changed.notify_all()

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
            asyncio.get_running_loop().create_task(self._wake())

    async def _wake(self) -> None:
        async with self._changed:
            self._trim()
            self._changed.notify_all()

    async def headers(self) -> UpstreamResponse | UpstreamFailure:
        """The upstream's response (status and headers), or why there is none."""
        await asyncio.shield(self._headers)
        if self.response is not None:
            return self.response
        if self.failure is not None:
            return self.failure
        return UpstreamFailure(502, "upstream_unreachable", f"the call to upstream {self.call.route.name} was dropped")

    async def chunks(self, reader: int) -> AsyncIterator[bytes]:
        """Every chunk of the body from the first, as the flight receives them."""
        while True:
            async with self._changed:
                await self._changed.wait_for(
                    lambda: self._readers.get(reader, 0) < self._first + len(self._chunks) or self.done
                )
                position = self._readers.get(reader)
                if position is None:
                    return
                end = self._first + len(self._chunks)
                batch = self._chunks[position - self._first :]
                self._readers[reader] = end
                if batch and not self.keeping:
                    self._trim()
                    self._changed.notify_all()
            if not batch:
                return  # done, and everything taken
            for chunk in batch:
                yield chunk
