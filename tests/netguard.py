"""Run `llmproxy` with the process's outbound network replaced by a tripwire.

    python -m tests.netguard no-outbound replay --port 0 ...   # any outbound connect fails loudly
    python -m tests.netguard no-dns record --upstream http://x.invalid ...   # names do not resolve

This changes the environment llmproxy runs in (the OS's sockets and resolver), not llmproxy:
the proxy runs unmodified on top of it.
"""

from __future__ import annotations

import socket
import sys

TRIPWIRE = "NETGUARD: outbound connection attempted"


def _is_loopback(address: object) -> bool:
    host = address[0] if isinstance(address, tuple) else address
    return isinstance(host, str) and (host.startswith("127.") or host in ("::1", "localhost"))


def install(mode: str) -> None:
    real_getaddrinfo = socket.getaddrinfo
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex

    def guarded_getaddrinfo(host, *args, **kwargs):  # type: ignore[no-untyped-def]
        if mode == "no-dns" and isinstance(host, str) and not _is_loopback(host) and not host[:1].isdigit():
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known (netguard)")
        if mode == "no-outbound" and not _is_loopback(host) and host not in (None, "0.0.0.0"):
            print(f"{TRIPWIRE}: getaddrinfo({host!r})", file=sys.stderr, flush=True)
            raise OSError(f"{TRIPWIRE}: {host}")
        return real_getaddrinfo(host, *args, **kwargs)

    def guarded_connect(self, address):  # type: ignore[no-untyped-def]
        if mode == "no-outbound" and self.family in (socket.AF_INET, socket.AF_INET6):
            print(f"{TRIPWIRE}: connect({address!r})", file=sys.stderr, flush=True)
            raise OSError(f"{TRIPWIRE}: {address}")
        return real_connect(self, address)

    def guarded_connect_ex(self, address):  # type: ignore[no-untyped-def]
        if mode == "no-outbound" and self.family in (socket.AF_INET, socket.AF_INET6):
            print(f"{TRIPWIRE}: connect_ex({address!r})", file=sys.stderr, flush=True)
            raise OSError(f"{TRIPWIRE}: {address}")
        return real_connect_ex(self, address)

    socket.getaddrinfo = guarded_getaddrinfo  # type: ignore[assignment]
    socket.socket.connect = guarded_connect  # type: ignore[method-assign]
    socket.socket.connect_ex = guarded_connect_ex  # type: ignore[method-assign]
    # uvloop makes its own system calls, past these Python-level guards: keep the stdlib loop.
    sys.modules["uvloop"] = None  # type: ignore[assignment]


if __name__ == "__main__":
    install(sys.argv[1])
    from llmproxy.cli import main

    sys.argv = ["llmproxy", *sys.argv[2:]]
    main()
