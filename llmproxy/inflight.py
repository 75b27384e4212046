"""Identical calls in flight at the same moment go upstream once, across processes too.

Parallel test workers each run their own proxy on one recordings directory. The first to send
a request takes a lock file for its key (`.inflight/<key>.lock`, created with O_EXCL, naming
the file the recording will have); the others wait for the lock to go and then serve that
recording. A lock whose owner died (kill -9) is noticed by its pid, or by its age.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import orjson
import structlog

log = structlog.get_logger("llmproxy.inflight")

LOCK_DIR = ".inflight"
_HOST = socket.gethostname()


@dataclass(frozen=True, slots=True)
class Lock:
    path: Path
    target: Path  # the recording this call will write, relative to the recordings directory


class InFlight:
    def __init__(self, root: Path, *, stale_after: float = 660.0, poll: float = 0.02) -> None:
        self.directory = Path(root) / LOCK_DIR
        self.stale_after = stale_after
        self.poll = poll
        self._made = False

    def try_acquire(self, key: str, target: Path) -> Lock | None:
        """The lock for `key`, or None when another call (in any process) holds it."""
        if not self._made:
            self.directory.mkdir(parents=True, exist_ok=True)
            # Locks live beside the recordings, which live in git: never commit them.
            ignore = self.directory / ".gitignore"
            if not ignore.exists():
                ignore.write_text("*\n")
            self._made = True
        path = self.directory / f"{key}.lock"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return None
        try:
            os.write(fd, orjson.dumps({"pid": os.getpid(), "host": _HOST, "target": str(target)}))
        finally:
            os.close(fd)
        return Lock(path, target)

    @staticmethod
    def release(lock: Lock) -> None:
        lock.path.unlink(missing_ok=True)

    async def wait(self, key: str) -> Path | None:
        """Wait for the holder of `key` to finish; the recording it wrote, or None."""
        path = self.directory / f"{key}.lock"
        try:
            holder = orjson.loads(path.read_bytes())
            since = path.stat().st_mtime
        except (OSError, orjson.JSONDecodeError):
            return None  # released meanwhile, or half-written: the caller goes upstream itself
        while path.exists():
            if self._stale(holder, since):
                log.warning("removing a stale in-flight lock", lock=str(path), pid=holder.get("pid"))
                path.unlink(missing_ok=True)
                return None
            await asyncio.sleep(self.poll)
        target = Path(str(holder.get("target", "")))
        return target if target.name else None

    def _stale(self, holder: dict[str, object], since: float) -> bool:
        if time.time() - since > self.stale_after:
            return True
        pid = holder.get("pid")
        if holder.get("host") != _HOST or not isinstance(pid, int):
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False
