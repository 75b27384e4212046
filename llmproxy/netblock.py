"""Refuse outbound network connections from this process, except to loopback and allowed hosts.

Used by the pytest plugin (`--llmproxy-block-network`, on by default in replay) so that a test
which bypasses the proxy fails at once with the host named, instead of silently calling a real
API. The guard sits where every Python client ends up: name resolution (`socket.getaddrinfo`,
so no DNS query leaves either) and `socket.socket.connect`/`connect_ex` (which asyncio's loops,
`socket.create_connection`, urllib, httpx and aiohttp all use). Event loops that make their
own system calls (uvloop) are not covered.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from collections.abc import Iterable
from typing import Any

from llmproxy.errors import LlmproxyError

_INET = (socket.AF_INET, socket.AF_INET6)


class NetworkBlockedError(LlmproxyError, RuntimeError):
    """An outbound connection the guard refused. Not an OSError on purpose: clients retry or
    swallow OSErrors (trying the next address, wrapping it in "connection error"); this one
    reaches the test as it is, with the host in its message."""


def _is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


class NetworkGuard:
    """Install with `install()`, remove with `uninstall()`; `allowed` hosts stay reachable."""

    def __init__(self, allowed: Iterable[str] = (), *, hint: str = "") -> None:
        self.allowed = {host.lower().strip("[]") for host in allowed if host}
        self.hint = hint
        self._installed = False
        self._lock = threading.Lock()
        self._saved: dict[str, Any] = {}

    def allows(self, host: object) -> bool:
        if host is None or not isinstance(host, str | bytes):
            return True  # getaddrinfo(None, port): a local wildcard address, no network
        text = (host.decode() if isinstance(host, bytes) else host).lower().strip("[]")
        return text in ("", "0.0.0.0", "::") or _is_loopback(text) or text in self.allowed

    def _refuse(self, host: object, port: object = None) -> NetworkBlockedError:
        where = f"{host}:{port}" if port not in (None, 0) else str(host)
        message = f"llmproxy blocked a network connection to {where}: only loopback and allowed hosts are open"
        return NetworkBlockedError(f"{message}{self.hint}")

    def install(self) -> None:
        with self._lock:
            if self._installed:
                return
            guard = self
            real_getaddrinfo = socket.getaddrinfo
            real_connect = socket.socket.connect
            real_connect_ex = socket.socket.connect_ex
            self._saved = {"getaddrinfo": real_getaddrinfo, "connect": real_connect, "connect_ex": real_connect_ex}

            def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
                # An IP literal resolves without the network; its connect is checked below.
                text = host.decode() if isinstance(host, bytes) else host
                if not guard.allows(text) and not (isinstance(text, str) and _is_ip(text.strip("[]"))):
                    raise guard._refuse(text, port)
                return real_getaddrinfo(host, port, *args, **kwargs)

            def check(sock: socket.socket, address: Any) -> None:
                if sock.family in _INET and isinstance(address, tuple) and not guard.allows(address[0]):
                    raise guard._refuse(address[0], address[1] if len(address) > 1 else None)

            def connect(sock: socket.socket, address: Any) -> None:
                check(sock, address)
                return real_connect(sock, address)

            def connect_ex(sock: socket.socket, address: Any) -> int:
                check(sock, address)
                return real_connect_ex(sock, address)

            socket.getaddrinfo = getaddrinfo  # type: ignore[assignment]
            socket.socket.connect = connect  # type: ignore[method-assign,assignment]
            socket.socket.connect_ex = connect_ex  # type: ignore[method-assign]
            self._installed = True

    def uninstall(self) -> None:
        with self._lock:
            if not self._installed:
                return
            socket.getaddrinfo = self._saved["getaddrinfo"]
            socket.socket.connect = self._saved["connect"]  # type: ignore[method-assign]
            socket.socket.connect_ex = self._saved["connect_ex"]  # type: ignore[method-assign]
            self._installed = False
