"""Identical calls in flight at once go upstream once across machines, through Redis.

The Unix-socket lock (singleflight.py) only reaches the processes of one host. Replicas on many
machines sharing one bucket take the same per-key lock in Redis instead: `SET key token NX PX`,
extended while the upstream streams, released on completion by a compare-and-delete on the
token (so a lock that expired and was taken by another proxy is never released by us).
Followers wait for the key to go, then serve the leader's recording from the store.

The lock is an optimisation, never a condition of correctness: Redis down, slow or the lock
lost (expired during a long stall) all mean the call simply goes upstream itself, recorded
under its own create-only name, so nothing is torn or lost, at worst made twice.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from dataclasses import dataclass, field

import structlog

from llmproxy.errors import ConfigError

log = structlog.get_logger("llmproxy.upstream.redislock")

# The lock outlives a crashed holder by at most this long; a live holder extends it every third.
DEFAULT_TTL = 30.0
# After a Redis error, calls go unshared for this long before Redis is tried again.
RETRY_AFTER = 1.0

_EXTEND = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


@dataclass(slots=True)
class RedisLock:
    name: str
    token: str
    keeper: asyncio.Task[None] | None = field(default=None, repr=False)


class RedisInFlight:
    def __init__(self, url: str, namespace: str, *, ttl: float = DEFAULT_TTL, poll: float = 0.05) -> None:
        try:
            import redis.asyncio as redis
        except ImportError:
            raise ConfigError("redis_url needs the redis extra: pip install 'llmproxy[redis]'") from None
        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError, asyncio.TimeoutError)
        # Short timeouts: a Redis that is away must cost a call milliseconds, not seconds.
        self._redis = redis.Redis.from_url(url, socket_connect_timeout=1.0, socket_timeout=2.0)
        self._prefix = "llmproxy:inflight:" + hashlib.sha256(namespace.encode()).hexdigest()[:24] + ":"
        self.ttl = ttl
        self.poll = poll
        self._down_until = 0.0
        self._releasing: set[asyncio.Task[None]] = set()

    def _name(self, key: str) -> str:
        return self._prefix + key[:48]

    def _down(self, exc: BaseException) -> None:
        loop = asyncio.get_running_loop()
        if loop.time() >= self._down_until:
            log.warning("redis unavailable: identical calls across proxies go upstream unshared", error=str(exc))
        self._down_until = loop.time() + RETRY_AFTER

    def _available(self) -> bool:
        return asyncio.get_running_loop().time() >= self._down_until

    async def acquire(self, key: str) -> RedisLock | None | bool:
        """The lock; None when another proxy holds it; False when Redis cannot be reached
        (the call then goes ahead unshared)."""
        if not self._available():
            return False
        lock = RedisLock(self._name(key), secrets.token_hex(16))
        try:
            taken = await self._redis.set(lock.name, lock.token, nx=True, px=int(self.ttl * 1000))
        except self._errors as exc:
            self._down(exc)
            return False
        if not taken:
            return None
        lock.keeper = asyncio.create_task(self._keep(lock))
        return lock

    async def _keep(self, lock: RedisLock) -> None:
        """Extend the lock while the call streams; a lost lock is logged, the call goes on."""
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                kept = await self._redis.eval(_EXTEND, 1, lock.name, lock.token, int(self.ttl * 1000))
            except self._errors as exc:
                self._down(exc)
                return
            if not kept:
                log.warning("redis lock lost: an identical call elsewhere may go upstream too", key=lock.name[-48:])
                return

    def release(self, lock: RedisLock) -> None:
        if lock.keeper is not None:
            lock.keeper.cancel()
        task = asyncio.get_running_loop().create_task(self._release(lock))
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    async def _release(self, lock: RedisLock) -> None:
        try:
            await self._redis.eval(_RELEASE, 1, lock.name, lock.token)
        except self._errors as exc:
            self._down(exc)  # it expires by itself within the TTL

    async def wait(self, key: str, timeout: float) -> bool:
        """Wait until nobody holds `key` (True), or give up after `timeout` seconds or when Redis
        goes away (False)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        name = self._name(key)
        while loop.time() < deadline:
            try:
                if not await self._redis.exists(name):
                    return True
            except self._errors as exc:
                self._down(exc)
                return False
            await asyncio.sleep(self.poll)
        return False

    async def aclose(self) -> None:
        if self._releasing:
            await asyncio.wait(list(self._releasing), timeout=2.0)
        try:
            await self._redis.aclose()
        except self._errors:
            pass

    def __repr__(self) -> str:  # never the URL: it may hold a password
        return f"RedisInFlight(prefix={self._prefix!r})"
