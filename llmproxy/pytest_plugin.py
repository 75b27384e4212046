"""pytest plugin (enabled by installing llmproxy): a session-wide proxy for a test suite.

    pytest --llmproxy-mode replay              # CI: strict, offline
    pytest --llmproxy-mode record-missing      # a developer adding a test
    pytest --llmproxy-mode record              # re-record everything

Tests ask for the `llmproxy` fixture (or use `@pytest.mark.usefixtures("llmproxy")`, or set
`llmproxy_autouse = true` in the ini file); SDKs then find the proxy through the variables each
registered provider names (OPENAI_BASE_URL, ANTHROPIC_BASE_URL, OLLAMA_HOST, GOOGLE_GEMINI_BASE_URL,
...), each pointing at its provider's prefix (http://127.0.0.1:PORT/anthropic). A replay miss is an HTTP 404 the
SDK raises, so the test fails at once with the miss message (never a hang). The plugin does
nothing for a session that does not use the fixture.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llmproxy.config import load_settings
from llmproxy.server import ProxyServer
from llmproxy.tools.run import client_environment

MODES = ("record", "record-missing", "replay")
_STASH_KEY = pytest.StashKey["SessionProxy"]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("llmproxy", "record and replay LLM API calls")
    group.addoption("--llmproxy-mode", choices=MODES, default=None, help="record, record-missing or replay (default)")
    group.addoption("--llmproxy-recordings", default=None, help="recordings directory (default: recordings)")
    group.addoption("--llmproxy-config", default=None, help="llmproxy TOML config file")
    group.addoption("--llmproxy-upstream", default=None, help="upstream of the OpenAI route when recording")
    group.addoption("--llmproxy-report", default=None, help="write the session's usage report (JSON) here")
    parser.addini("llmproxy_mode", "default --llmproxy-mode", default="replay")
    parser.addini("llmproxy_recordings", "default --llmproxy-recordings", default="recordings")
    parser.addini("llmproxy_autouse", "use the llmproxy fixture in every test", type="bool", default=False)


class SessionProxy:
    """A proxy on its own event loop thread, serving the whole test session."""

    def __init__(self, config: pytest.Config) -> None:
        option = config.getoption
        self.mode: str = option("--llmproxy-mode") or config.getini("llmproxy_mode")
        if self.mode not in MODES:
            raise pytest.UsageError(f"llmproxy mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        recordings = option("--llmproxy-recordings") or config.getini("llmproxy_recordings")
        config_file = option("--llmproxy-config")
        report = option("--llmproxy-report")
        self.settings = load_settings(
            Path(config_file) if config_file else None,
            {
                "host": "127.0.0.1",
                "port": 0,
                "recordings": Path(config.rootpath, recordings),
                "upstream": option("--llmproxy-upstream"),
                "report": Path(report) if report else None,
            },
        )
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="llmproxy", daemon=True)
        self.server: ProxyServer | None = None
        self._saved_env: dict[str, str | None] = {}

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.port}"

    def start(self) -> None:
        self._thread.start()

        async def start() -> ProxyServer:
            server = ProxyServer(self.settings, self.mode)
            await server.start()
            return server

        self.server = asyncio.run_coroutine_threadsafe(start(), self._loop).result(60)
        for name, value in client_environment(self.url, self.mode, {}).items():
            self._saved_env[name] = os.environ.get(name)
            os.environ[name] = value

    def stop(self) -> None:
        assert self.server is not None
        asyncio.run_coroutine_threadsafe(self.server.stop(), self._loop).result(60)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        for name, value in self._saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="session")
def llmproxy(request: pytest.FixtureRequest) -> Iterator[SessionProxy]:
    """The session's proxy; SDK base URLs point at it while the session runs."""
    proxy = SessionProxy(request.config)
    proxy.start()
    request.config.stash[_STASH_KEY] = proxy
    try:
        yield proxy
    finally:
        proxy.stop()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getini("llmproxy_autouse"):
        for item in items:
            item.fixturenames.insert(0, "llmproxy")  # type: ignore[attr-defined]


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    proxy = config.stash.get(_STASH_KEY, None)
    if proxy is None or proxy.server is None:
        return
    report = proxy.server.report()
    unused = report["unused"]
    terminalreporter.write_sep("-", "llmproxy")
    terminalreporter.write_line(
        f"mode {proxy.mode}: {report['hits']} hit(s), {len(report['misses'])} miss(es), "
        f"{len(report['recorded'])} recorded, {'-' if unused is None else len(unused)} unused recording(s)"
    )
    for miss in report["misses"]:
        terminalreporter.write_line(
            f"  missed {miss['method']} {miss['path']} (model {miss['model']}, key {miss['key'][:16]})"
        )
    if proxy.settings.report is not None:
        terminalreporter.write_line(f"usage report: {proxy.settings.report}")
