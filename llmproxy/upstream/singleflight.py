"""Identical calls in flight at the same moment go upstream once, across processes too.

Parallel test workers each run their own proxy on one recordings directory. The first to send
a request takes a lock named after the directory and the request's key; the others wait for it
to go and then serve the recording it wrote. The lock is a Unix socket bound in Linux's abstract
namespace: taking it is one bind() (no file, no disk), only one process can hold a name, and the
kernel frees it when its holder exits, so a crashed proxy never leaves a stale lock behind.
Elsewhere than Linux there is no such namespace, and only calls within one proxy are shared.

A proxy alone on its directory takes no lock at all (a bind and a close per call were ~5% of a
small call's CPU): before its first lock, each proxy listens on a presence socket, the lowest free
of MAX_RECORDERS numbered names per directory (abstract too: no file, gone with its process),
then connects to every other one. A proxy greeted that way binds the locks of the calls it has in
flight before it answers, and the newcomer takes no lock before every answer is in, so a call
made in both at once is still made once. Each pair keeps its connection open: while a proxy has
one, it takes every lock; when the last one closes (the other proxy exited, even killed), it is
alone again. Remaining windows, all falling back to two upstream calls (as with share_inflight
= false), never to a wrong answer: a peer whose loop does not answer within HELLO_TIMEOUT; calls
beyond the pipeline's MAX_HELD_LOCKS; a proxy that found all MAX_RECORDERS names taken (it then
takes every lock, but later newcomers do not see it).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import os
import socket
import sys
from dataclasses import dataclass

import structlog

SUPPORTED = sys.platform.startswith("linux")
MAX_RECORDERS = 1024  # presence names probed once per proxy (~5 ms for all)
HELLO_TIMEOUT = 5.0  # seconds a newcomer waits for a peer's answer before going on regardless
_ACK = b"\x01"

log = structlog.get_logger("llmproxy.singleflight")


@dataclass(slots=True, eq=False)
class Lock:
    sock: socket.socket | None  # None: taken alone, nothing bound (yet)
    address: bytes = b""
    pending: set[Lock] | None = None  # its owner's unbound locks, bound when another proxy comes


class InFlight:
    def __init__(self, root: os.PathLike[str] | str, *, poll: float = 0.02) -> None:
        directory = os.path.realpath(root).encode()
        digest = hashlib.sha256(directory).hexdigest()[:24].encode()
        self._prefix = b"\0llmproxy-inflight/" + digest + b"/"
        self._presence = b"\0llmproxy-recorders/" + digest + b"/"
        self.poll = poll
        self._ready = False  # announced, and every other proxy answered
        self._joining: asyncio.Future[None] | None = None  # the answers of the others, awaited once
        self._waiting: set[str] = set()  # keys of calls waiting for those answers
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listener: socket.socket | None = None
        self._peers: set[socket.socket] = set()  # one connection per other proxy on the directory
        self._crowded = False  # no presence name free (or a peer not greeted): take every lock
        self._unbound: set[Lock] = set()  # locks handed out while alone, of calls still in flight

    def _address(self, key: str) -> bytes:
        return self._prefix + key[:48].encode()

    @property
    def alone(self) -> bool:
        """No other proxy records into this directory: calls take no lock."""
        return not self._peers and not self._crowded

    def try_acquire(self, key: str) -> Lock | None | bool:
        """The lock for `key`; None when another process holds it; False when no lock can be
        had at all (out of file descriptors): the call then goes ahead unshared."""
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError:
            return False
        try:
            sock.bind(self._address(key))
        except OSError:
            sock.close()
            return None
        return Lock(sock)

    async def acquire(self, key: str) -> Lock | None | bool:
        if not self._ready:
            if self._joining is None:
                self._announce()
            if self._joining is not None:  # other proxies are answering: calls wait for them
                if key in self._waiting:
                    # The same call twice before the answers: the first takes the lock, and the
                    # second goes the way of a call held elsewhere (waits for it, or joins it).
                    await asyncio.shield(self._joining)
                    return None
                self._waiting.add(key)
                try:
                    await asyncio.shield(self._joining)
                finally:
                    self._waiting.discard(key)
        if self._peers or self._crowded:
            return self.try_acquire(key)
        lock = Lock(None, self._address(key), self._unbound)
        self._unbound.add(lock)
        return lock

    @staticmethod
    def release(lock: Lock) -> None:
        if lock.pending is not None:
            lock.pending.discard(lock)
            lock.pending = None
        if lock.sock is not None:
            lock.sock.close()
            lock.sock = None

    async def aclose(self) -> None:
        if self._joining is not None and not self._joining.done():
            self._joining.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._joining
        loop = self._loop
        for sock in [*self._peers, *([self._listener] if self._listener is not None else [])]:
            if loop is not None and sock.fileno() >= 0:
                loop.remove_reader(sock.fileno())
            sock.close()
        self._peers.clear()
        self._listener = None
        self._ready = False
        self._joining = None

    async def wait(self, key: str, timeout: float) -> bool:
        """Wait until nobody holds `key` (True), or give up after `timeout` seconds (False)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            lock = self.try_acquire(key)
            if isinstance(lock, Lock):
                self.release(lock)
                return True
            if lock is False:
                return False
            await asyncio.sleep(self.poll)
        return False

    # -- presence -------------------------------------------------------------------------

    def _announce(self) -> None:
        """Listen, then look for the others (at once: a few ms, once); wait for their answers
        in `_joining` only when there are some."""
        loop = self._loop = asyncio.get_running_loop()
        # Listen first, then look: of two proxies starting at once, at least one finds the other.
        try:
            listener = _stream_socket()
        except OSError:  # out of file descriptors: unseen, so share what can be shared
            self._crowded = self._ready = True
            return
        mine = -1
        for number in range(MAX_RECORDERS):
            try:
                listener.bind(self._presence + b"%d" % number)
            except OSError:
                continue
            mine = number
            break
        if mine < 0:
            listener.close()
            self._crowded = True
            log.warning("more proxies on this directory than presence names: every call takes its lock")
        else:
            listener.listen(128)
            self._listener = listener
            # Outside any request's context: its log lines are not that request's.
            contextvars.Context().run(loop.add_reader, listener.fileno(), self._greeted)
        greeting: list[socket.socket] = []
        probe: socket.socket | None = None
        for number in range(MAX_RECORDERS):
            if number == mine:
                continue
            if probe is None:
                try:
                    probe = _stream_socket()
                except OSError:
                    self._crowded = True
                    break
            try:
                probe.connect(self._presence + b"%d" % number)
            except (ConnectionRefusedError, FileNotFoundError):
                continue  # nobody there (a refused connect leaves the socket reusable)
            except OSError:
                self._crowded = True  # someone there we cannot greet (its backlog is full)
                probe.close()
                probe = None
                continue
            greeting.append(probe)
            probe = None
        if probe is not None:
            probe.close()
        if greeting:
            self._joining = asyncio.ensure_future(self._answers(loop, greeting))
        else:
            self._ready = True

    async def _answers(self, loop: asyncio.AbstractEventLoop, greeting: list[socket.socket]) -> None:
        await asyncio.gather(*(self._hello(loop, sock) for sock in greeting))
        self._ready = True
        log.info("other proxies record into this directory: sharing in-flight calls", proxies=len(self._peers))

    async def _hello(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        """Wait for a peer to have bound its in-flight calls' locks (its answer), then keep the line."""
        try:
            answer = await asyncio.wait_for(loop.sock_recv(sock, 1), HELLO_TIMEOUT)
        except TimeoutError:
            answer = _ACK  # alive but slow: share from now on anyway (the window stated above)
            log.warning("a proxy on this directory did not answer in time; sharing with it regardless")
        except OSError:
            answer = b""
        except asyncio.CancelledError:
            sock.close()
            raise
        if answer != _ACK:
            sock.close()  # it exited meanwhile
            return
        self._keep(sock)

    def _greeted(self) -> None:
        """A newcomer: bind the locks of the calls in flight here, then answer it."""
        listener = self._listener
        if listener is None:
            return  # closed meanwhile
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:  # none left to accept (or out of descriptors)
                return
            self._bind_unbound()
            try:
                conn.send(_ACK)
            except OSError:
                conn.close()
                continue
            if self.alone:
                log.info("another proxy records into this directory: sharing in-flight calls")
            self._keep(conn)

    def _bind_unbound(self) -> None:
        for lock in list(self._unbound):
            lock.pending = None
            try:
                sock = _stream_socket(blocking=True)
            except OSError:
                continue  # out of file descriptors: this call stays unshared
            try:
                sock.bind(lock.address)
            except OSError:
                sock.close()  # another holds it already: this call stays unshared
            else:
                lock.sock = sock
        self._unbound.clear()

    def _keep(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._peers.add(sock)
        assert self._loop is not None
        contextvars.Context().run(self._loop.add_reader, sock.fileno(), self._peer_readable, sock)

    def _peer_readable(self, sock: socket.socket) -> None:
        if sock.fileno() < 0:
            return  # closed meanwhile (aclose)
        try:
            data = sock.recv(16)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if data:
            return  # peers send nothing after their answer; ignore anything else
        assert self._loop is not None
        self._loop.remove_reader(sock.fileno())
        sock.close()
        self._peers.discard(sock)
        if self.alone:
            log.info("no other proxy records into this directory any more: calls take no lock")


def _stream_socket(*, blocking: bool = False) -> socket.socket:
    kind = socket.SOCK_STREAM | socket.SOCK_CLOEXEC | (0 if blocking else socket.SOCK_NONBLOCK)
    return socket.socket(socket.AF_UNIX, kind)
