"""Test helpers: an event loop in a thread (so sync SDK clients can call servers running on it),
and starting the real proxy or a fake upstream on an ephemeral 127.0.0.1 port."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from llmproxy.config import Settings, load_settings
from llmproxy.server import ProxyServer

T = TypeVar("T")
REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
SEED = REPO / "recordings" / "000_d47d48ba6900b1d1.txt"
CORPUS = SHARED / "corpus" / "llamastack"


class LoopThread:
    """An asyncio loop running in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


class RunningProxy:
    def __init__(self, loop: LoopThread, server: ProxyServer) -> None:
        self.loop = loop
        self.server = server

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    def stop(self) -> None:
        self.loop.run(self.server.stop())


def start_proxy(
    loop: LoopThread, mode: str, recordings: Path, config: Path | None = None, **overrides: Any
) -> RunningProxy:
    settings: Settings = load_settings(config, {"host": "127.0.0.1", "port": 0, "recordings": recordings, **overrides})

    async def start() -> ProxyServer:
        server = ProxyServer(settings, mode)
        await server.start()
        return server

    return RunningProxy(loop, loop.run(start()))


class RunningApp:
    """A plain aiohttp app (a fake upstream) on an ephemeral port."""

    def __init__(self, loop: LoopThread, app: web.Application) -> None:
        self.loop = loop
        self.app = app
        self.runner = web.AppRunner(app, access_log=None)
        self.port = 0

    def start(self) -> RunningApp:
        async def go() -> None:
            await self.runner.setup()
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            await site.start()
            self.port = self.runner.addresses[0][1]

        self.loop.run(go())
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.loop.run(self.runner.cleanup())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def files_under(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file())


def assert_no_secret(directory: Path, *secrets: str) -> None:
    for path in files_under(directory):
        text = path.read_text(errors="replace")
        for secret in secrets:
            assert secret not in text, f"{secret!r} leaked into {path}"


class CliProxy:
    """`python -m llmproxy ...` as a child process; the port is read from its JSON log."""

    def __init__(
        self, *args: str, cwd: Path = REPO, env: dict[str, str] | None = None, netguard: str | None = None
    ) -> None:
        launcher = ["-m", "tests.netguard", netguard] if netguard else ["-m", "llmproxy"]
        command = [sys.executable, *launcher, *args, "--log-json"]
        full_env = {**os.environ, **(env or {})}
        self.process = subprocess.Popen(
            command, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.lines: list[str] = []
        self.port = self._wait_for_port()

    def _wait_for_port(self, timeout: float = 20) -> int:
        deadline = time.monotonic() + timeout
        assert self.process.stderr is not None
        while time.monotonic() < deadline:
            line = self.process.stderr.readline()
            if not line:
                if self.process.poll() is not None:
                    raise RuntimeError(f"proxy exited early: {''.join(self.lines)}")
                continue
            self.lines.append(line)
            event = json.loads(line)
            if event.get("event") == "listening":
                return int(event["port"])
        raise TimeoutError("proxy did not report its port")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> list[dict[str, Any]]:
        """Stop with SIGTERM (as a user would) and return the log events, parsed."""
        self.process.terminate()
        # Read the rest through the same readers readline() used: communicate() reads the pipes
        # directly and would lose what _wait_for_port's reader had already buffered.
        rest: dict[str, str] = {}
        readers = [
            threading.Thread(target=lambda name=name, stream=stream: rest.update({name: stream.read()}), daemon=True)
            for name, stream in (("out", self.process.stdout), ("err", self.process.stderr))
        ]
        for reader in readers:
            reader.start()
        self.process.wait(timeout=15)
        for reader in readers:
            reader.join(15)
        self.lines.extend(rest.get("err", "").splitlines())
        events = []
        for line in self.lines:
            try:
                events.append(json.loads(line))
            except ValueError:
                continue  # not ours (e.g. a test tripwire); kept in self.lines
        return events


def sse_data(raw: bytes) -> list[Any]:
    """JSON payloads of an SSE body, parsed independently of llmproxy's own codecs."""
    events = re.split(r"\r\n\r\n|\n\n", raw.decode())
    values = []
    for event in events:
        data = [line[5:].lstrip() for line in re.split(r"\r\n|\n", event) if line.startswith("data:")]
        if data and data != ["[DONE]"]:
            values.append(json.loads("\n".join(data)))
    return values
