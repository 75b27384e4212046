"""The file writer process: creates a recorder's files outside the proxy's process.

Creating a file is a handful of system calls; each one releases and retakes the GIL, and while a
writer thread waits to get it back the event loop's thread pays the handoff. Measured on small
JSON at 16 connections, the loop thread spent ~170 to 260 µs less per request with the writes in
a process of their own (see README, Benchmark). The recorder still prepares, scans and journals
each recording on the loop, before its client gets the end of its answer: this process only
writes bytes already final.

The feed is the journal's framing (`journal.frame_entries`) on the child's stdin; the child
answers on its stdout one JSON line per batch it read (at least once a second within a long
one), an array with per entry `[id, "path"]` or `[id, null, "error"]`; after a batch it lets the
next one gather in the pipe for GATHER_SECONDS (fewer wake-ups under load). It runs in a process
group of its own and ignores SIGINT and SIGTERM (the proxy decides when writing stops). It
exits at the feed's end frame, when its stdin closes, or when its proxy is gone (re-parented),
after writing every entry it received complete: a proxy killed with SIGKILL still gets what it
had handed over written, and the next start writes the rest from the journal (create-only: an
entry written twice is recognised, never duplicated).

    python -m llmproxy.store.fileproc ROOT [--durable]
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import select
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import structlog

import llmproxy
from llmproxy.store.directory import RecordingStore
from llmproxy.store.journal import read_frames, write_new

log = structlog.get_logger("llmproxy.record")

READ_BYTES = 1024 * 1024
PARENT_CHECK_SECONDS = 1.0  # how often an idle writer checks that its proxy is still there
ANSWER_SECONDS = 1.0  # within a long batch, answers go out at least this often
# The proxy's last frame: write what came before, then exit (its pipe may stay open elsewhere).
END_OF_FEED = -1
END_FRAME = b'{"end":true}\n'
# After a batch, the writer waits this long before reading the next (see main).
GATHER_SECONDS = 0.005
# The feed pipe's size (Linux), so that what gathers meanwhile fits without partial writes.
PIPE_BYTES = 1024 * 1024
# A writer that answers nothing for this long while the proxy waits to stop is killed; the
# proxy's thread writes the rest.
STALL_SECONDS = 10.0
# Per entry, in order: [id, the file written] or [id, None, why not]; one line per batch.
Results = list[list[Any]]


class FileWriterProcess:
    """The proxy's side: start the child, feed it frames, hear what it wrote.

    Plain non-blocking pipes watched by the event loop (no stream objects or reader task): one
    write per batch, one read and one callback per batch of answers."""

    def __init__(
        self,
        root: Path,
        *,
        durable: bool,
        on_results: Callable[[Results], None],
        on_exit: Callable[[int | None], None],
    ) -> None:
        self.root = root
        self.durable = durable
        self._on_results = on_results
        self._on_exit = on_exit
        self._process: subprocess.Popen[bytes] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._unsent: deque[memoryview] = deque()  # what the pipe did not take yet, in order
        self._answers = b""  # an incomplete answer line
        self._exited: asyncio.Future[int | None] | None = None
        self._ended = False  # its answers ended: it exited (or is about to)
        self.closing = False
        self.killed = False  # by the proxy (stuck): its exit is no news

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def alive(self) -> bool:
        return self._process is not None and not self._ended and not self.closing

    async def start(self) -> None:
        # The child imports this very llmproxy, wherever it was imported from (a checkout, a venv).
        package_parent = str(Path(llmproxy.__file__).resolve().parent.parent)
        paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != package_parent]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([package_parent, *paths])}
        # -P: the working directory (another checkout, say) is not put ahead of that package.
        args = [sys.executable, "-P", "-m", "llmproxy.store.fileproc", str(self.root)]
        self._loop = asyncio.get_running_loop()
        self._process = subprocess.Popen(
            [*args, *(["--durable"] if self.durable else [])],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            # Its own process group: a terminal's Ctrl-C (sent to the proxy's group) is the proxy's
            # to handle; the writer stops when its feed is closed.
            start_new_session=True,
        )
        assert self._process.stdin is not None and self._process.stdout is not None
        if hasattr(fcntl, "F_SETPIPE_SZ"):
            try:
                fcntl.fcntl(self._process.stdin.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)
            except OSError:
                pass  # over the system's pipe-max-size: the default size works, with more partial writes
        os.set_blocking(self._process.stdin.fileno(), False)
        os.set_blocking(self._process.stdout.fileno(), False)
        self._exited = self._loop.create_future()
        self._loop.add_reader(self._process.stdout.fileno(), self._readable)

    def send(self, frames: bytes) -> bool:
        """Hand framed entries to the child (never blocks: what the pipe does not take now is
        kept, in order, until it does); False if the child is gone."""
        if not self.alive:
            return False
        return self._write(frames)

    def _write(self, frames: bytes) -> bool:
        if self._unsent:
            self._unsent.append(memoryview(frames))
            return True
        assert self._process is not None and self._process.stdin is not None and self._loop is not None
        try:
            written = os.write(self._process.stdin.fileno(), frames)
        except BlockingIOError:
            written = 0
        except OSError:
            return False  # it died: its answers end, and _readable reports it
        if written < len(frames):
            self._unsent.append(memoryview(frames)[written:])
            self._loop.add_writer(self._process.stdin.fileno(), self._writable)
        return True

    def kill(self) -> None:
        """Stop it now (stuck or stopped): its answers end, and the recorder takes its work back."""
        if self._process is not None and not self._ended:
            self.killed = True
            self._process.kill()

    def _writable(self) -> None:
        assert self._process is not None and self._process.stdin is not None and self._loop is not None
        fd = self._process.stdin.fileno()
        while self._unsent:
            try:
                written = os.write(fd, self._unsent[0])
            except BlockingIOError:
                return
            except OSError:
                self._unsent.clear()  # it died: _readable reports it, the recorder takes these back
                break
            if written < len(self._unsent[0]):
                self._unsent[0] = self._unsent[0][written:]
                return
            self._unsent.popleft()
        self._loop.remove_writer(fd)
        if self.closing:
            self._process.stdin.close()

    def _readable(self) -> None:
        assert self._process is not None and self._process.stdout is not None and self._loop is not None
        try:
            chunk = os.read(self._process.stdout.fileno(), READ_BYTES)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._ended = True
            self._loop.remove_reader(self._process.stdout.fileno())
            self._loop.create_task(self._reap())
            return
        *lines, self._answers = (self._answers + chunk).split(b"\n")
        for line in lines:
            self._on_results(orjson.loads(line))

    async def _reap(self) -> None:
        assert self._process is not None and self._loop is not None and self._exited is not None
        if self._process.stdin is not None and not self._process.stdin.closed:
            if self._unsent:
                self._loop.remove_writer(self._process.stdin.fileno())
                self._unsent.clear()
            self._process.stdin.close()
        code = await self._loop.run_in_executor(None, self._process.wait)
        self._process.stdout.close()  # type: ignore[union-attr]
        self._exited.set_result(code)
        self._on_exit(code)

    async def close(self, timeout: float = 30.0) -> int | None:
        """No more entries: let the child write what it has and exit. Its exit code (None if it
        had to be killed after `timeout`)."""
        self.closing = True
        process = self._process
        if process is None or self._exited is None:
            return 0
        if not self._ended and process.stdin is not None and not process.stdin.closed:
            # The end frame, not only the pipe's close: a process forked from the proxy (a test's
            # multiprocessing child) may hold the pipe open for ever.
            self._write(END_FRAME)
            if not self._unsent:
                process.stdin.close()  # else _writable closes it once everything is sent
        try:
            return await asyncio.wait_for(asyncio.shield(self._exited), timeout)
        except TimeoutError:
            self.kill()
            await asyncio.shield(self._exited)
            return None


def main(argv: list[str]) -> int:
    # Stopping is the proxy's decision, told by the end of the feed; a signal to the process group
    # must not cut a write short.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    store = RecordingStore(Path(argv[0]), durable="--durable" in argv[1:])
    proxy = os.getppid()
    answering = True  # until the proxy is gone: then write on, answer nobody
    buffer = bytearray()  # appended to and consumed from the front: no quadratic copies
    while True:
        # A process the proxy forked (a test's multiprocessing child) may hold our stdin open after
        # the proxy died: then the proxy's going (we are re-parented) ends the feed.
        if not select.select([0], [], [], PARENT_CHECK_SECONDS)[0]:
            if os.getppid() != proxy:
                return 0
            continue
        chunk = os.read(0, READ_BYTES)
        if not chunk:
            return 0  # the proxy closed the feed (or died): everything complete was written
        buffer += chunk
        frames, used = read_frames(buffer)
        del buffer[:used]
        replies: list[list[Any]] = []
        ended = False
        answered = time.monotonic()
        for entry, target, data in frames:
            if target is None:
                ended = ended or entry == END_OF_FEED
                continue
            try:
                replies.append([entry, write_new(store, target, data)])
            except Exception as exc:  # noqa: BLE001 - told to the proxy, which logs it
                replies.append([entry, None, f"{type(exc).__name__}: {exc}"])
            if time.monotonic() - answered > ANSWER_SECONDS:
                # A long batch on a slow disk: answer what is done, so the proxy sees progress.
                answering = _answer(replies, answering)
                answered = time.monotonic()
        answering = _answer(replies, answering)
        if ended:
            return 0
        if frames and len(chunk) < READ_BYTES:
            # Under load, let the next entries gather in the pipe: each read we block in is a
            # wake-up that costs the proxy's loop (its write) and this process system calls.
            # What is in the pipe is ours however the proxy ends: this delays files, not clients.
            time.sleep(GATHER_SECONDS)


def _answer(replies: list[list[Any]], answering: bool) -> bool:
    """Send the answers gathered, in one line (and forget them); False once the proxy is gone
    (killed): what it handed over is still written, nobody is told."""
    if replies and answering:
        try:
            _write_all(1, orjson.dumps(replies) + b"\n")
        except OSError:
            answering = False
    replies.clear()
    return answering


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except Exception as exc:  # noqa: BLE001 - one line, never a traceback; the proxy notices the exit
        print(f"llmproxy file writer: {type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(1)
