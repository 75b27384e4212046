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
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from llmproxy.config import Settings, load_settings
from llmproxy.server import ProxyServer
from llmproxy.store.dropped import NOTES_NAME

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

    def __init__(self, loop: LoopThread, app: web.Application, *, handler_cancellation: bool = False) -> None:
        self.loop = loop
        self.app = app
        # handler_cancellation: its handlers are cancelled when the proxy drops the connection,
        # so a test can see an upstream call closed while the upstream was silent.
        self.runner = web.AppRunner(app, access_log=None, handler_cancellation=handler_cancellation)
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


def wait_until(condition: Callable[[], object], what: str, timeout: float = 30) -> None:
    """Block until `condition()` holds. The timeout only turns a hang into a failure: the test
    never depends on how fast anything is."""
    changed = threading.Event()
    deadline = threading.Timer(timeout, changed.set)
    deadline.start()
    try:
        while not condition():
            if changed.wait(0.01):
                raise TimeoutError(f"still waiting for {what} after {timeout} s")
    finally:
        deadline.cancel()


async def async_wait_until(condition: Callable[[], object], what: str, timeout: float = 30) -> None:
    """`wait_until` for code on the event loop."""
    try:
        async with asyncio.timeout(timeout):
            while not condition():
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise TimeoutError(f"still waiting for {what} after {timeout} s") from None


def children_of(pid: int) -> list[int]:
    """The live child processes of `pid` (llmproxy's file writer)."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            children += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            continue
    return children


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def files_under(directory: Path) -> list[Path]:
    """Every file under `directory` but the notes of exchanges not recorded (store/dropped.py)."""
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != NOTES_NAME)


def assert_no_secret(directory: Path, *secrets: str) -> None:
    for path in files_under(directory):
        text = path.read_text(errors="replace")
        for secret in secrets:
            assert secret not in text, f"{secret!r} leaked into {path}"


class CliProxy:
    """`python -m llmproxy ...` as a child process; the port is read from its JSON log.

    One thread reads stderr to its end and keeps every line: nothing else touches the pipe, so
    no line is lost between a buffered reader and `communicate()`.
    """

    def __init__(
        self,
        *args: str,
        cwd: Path = REPO,
        env: dict[str, str] | None = None,
        netguard: str | None = None,
        slowdisk: str | None = None,
        new_session: bool = False,
        python_flags: tuple[str, ...] = (),
    ) -> None:
        launcher = ["-m", "tests.netguard", netguard] if netguard else ["-m", "llmproxy"]
        if slowdisk is not None:  # tests/slowdisk.py: seconds per recording file, or "stuck"
            launcher = ["-m", "tests.slowdisk", slowdisk]
        command = [sys.executable, *python_flags, *launcher, *args, "--log-json"]
        full_env = {**os.environ, **(env or {})}
        self.process = subprocess.Popen(
            command,
            cwd=cwd,
            env=full_env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=new_session,  # its own process group, as a terminal would give it
        )
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._ended = False
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()
        listening = self.wait_for_event("listening")
        self.port = int(listening["port"])

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    def events(self) -> list[dict[str, Any]]:
        with self._changed:
            lines = list(self.lines)
        parsed = []
        for line in lines:
            try:
                parsed.append(json.loads(line))
            except ValueError:
                continue  # not ours (e.g. a test tripwire); kept in self.lines
        return parsed

    def wait_for_event(self, name: str, count: int = 1, timeout: float = 30) -> dict[str, Any]:
        """The `count`th log event called `name`, once it was logged (the timeout only guards a hang)."""

        def found() -> dict[str, Any] | None:
            matching = [e for e in self.events() if e.get("event") == name]
            return matching[count - 1] if len(matching) >= count else None

        with self._changed:
            if not self._changed.wait_for(lambda: found() is not None or self._ended, timeout):
                raise TimeoutError(f"the proxy did not log {name!r}: {''.join(self.lines)}")
        event = found()
        if event is None:
            raise RuntimeError(f"proxy exited before logging {name!r}: {''.join(self.lines)}")
        return event

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> list[dict[str, Any]]:
        """Stop with SIGTERM (as a user would) and return the log events, parsed."""
        self.process.terminate()
        self.process.wait(timeout=15)
        self._reader.join(15)
        return self.events()


def sse_data(raw: bytes) -> list[Any]:
    """JSON payloads of an SSE body, parsed independently of llmproxy's own codecs."""
    events = re.split(r"\r\n\r\n|\n\n", raw.decode())
    values = []
    for event in events:
        data = [line[5:].lstrip() for line in re.split(r"\r\n|\n", event) if line.startswith("data:")]
        if data and data != ["[DONE]"]:
            values.append(json.loads("\n".join(data)))
    return values
