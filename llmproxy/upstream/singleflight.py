"""Identical calls in flight at the same moment go upstream once, across processes too.

Parallel test workers each run their own proxy on one recordings directory. The first to send
a request takes a lock named after the directory and the request's key; the others wait for it
to go and then serve the recording it wrote. The lock is a Unix socket bound in Linux's abstract
namespace: taking it is one bind() (no file, no disk), only one process can hold a name, and the
kernel frees it when its holder exits, so a crashed proxy never leaves a stale lock behind.
Elsewhere than Linux there is no such namespace, and only calls within one proxy are shared.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

SUPPORTED = sys.platform.startswith("linux")


@dataclass(slots=True)
class Lock:
    sock: socket.socket


class InFlight:
    def __init__(self, root: Path, *, poll: float = 0.02) -> None:
        directory = os.path.realpath(root).encode()
        self._prefix = b"\0llmproxy-inflight/" + hashlib.sha256(directory).hexdigest()[:24].encode() + b"/"
        self.poll = poll

    def _address(self, key: str) -> bytes:
        return self._prefix + key[:48].encode()

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
        return self.try_acquire(key)

    @staticmethod
    def release(lock: Lock) -> None:
        lock.sock.close()

    async def aclose(self) -> None:
        pass

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
