"""pytest plugin (enabled by installing llmproxy): the test process talks to LLM APIs only
through a proxy.

    pytest --llmproxy-mode replay              # CI: strict, offline
    pytest --llmproxy-mode record-missing      # a developer adding a test
    pytest --llmproxy-mode record              # re-record everything

When a mode is set (on the command line, or `llmproxy_mode` in the ini file), the proxy starts
in `pytest_configure`, before any test module is imported, and OPENAI_BASE_URL,
ANTHROPIC_BASE_URL, OLLAMA_HOST, GOOGLE_GEMINI_BASE_URL (and placeholder keys in replay) point
at it: an SDK client created at import time uses it too. `--llmproxy-block-network` (on by
default in replay) makes any other outbound connection fail at once with the host named;
loopback and `--llmproxy-allow-host` hosts stay open. Under pytest-xdist each worker runs its
own proxy on the shared recordings directory; the controller sums their reports.

Without a mode, the `llmproxy` fixture (or `llmproxy_autouse = true`) starts a replay proxy the
first time a test asks for it, as before. A replay miss is an HTTP 404 the SDK raises, so the
test fails at once with the miss message (never a hang).

Each test's exchanges are its own (its scope is its node id): recorded under
`recordings/<module>/<test>/...` with `request.scope` in the file, repeats counted per test, so a
test gets the same answers whatever else runs (`-k`, xdist). A test with no recording of its own
is answered by the shared recordings (files recorded outside pytest; `scope_fallback`).
Re-recording a test (`--llmproxy-mode record -k name`) first removes that test's files only.
`@pytest.mark.llmproxy(mode=..., scope=...)` gives a test (class, module) its own mode, or a
scope: "test" (default; ini `llmproxy_scope`), "class", "module", "shared" or a name of yours.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest

from llmproxy.config import Mode, load_settings
from llmproxy.errors import LlmproxyError
from llmproxy.netblock import NetworkGuard
from llmproxy.pipeline import MODES as POLICIES
from llmproxy.server import ProxyServer
from llmproxy.tools.report import write_report
from llmproxy.tools.run import client_environment

MODES = tuple(mode.value for mode in Mode)
SCOPE_KINDS = ("test", "class", "module", "shared")  # any other scope is a name of the user's
MARK_ARGUMENTS = ("mode", "scope")
_PROXY = pytest.StashKey["SessionProxy"]()
_GUARD = pytest.StashKey[NetworkGuard]()
_WORKER_REPORTS = pytest.StashKey[list[dict[str, Any]]]()
_OPENED = pytest.StashKey[set[str]]()
_REPORT_KEY = "llmproxy_report"  # in xdist's workeroutput


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("llmproxy", "record and replay LLM API calls")
    group.addoption("--llmproxy-mode", choices=MODES, default=None, help="record, record-missing or replay")
    group.addoption("--llmproxy-recordings", default=None, help="recordings directory (default: recordings)")
    group.addoption("--llmproxy-config", default=None, help="llmproxy TOML config file")
    group.addoption("--llmproxy-upstream", default=None, help="upstream of the OpenAI route when recording")
    group.addoption("--llmproxy-report", default=None, help="write the session's usage report (JSON) here")
    group.addoption(
        "--llmproxy-block-network",
        action="store_true",
        dest="llmproxy_block_network",
        default=None,
        help="fail any outbound connection but to loopback and allowed hosts (default: on in replay)",
    )
    group.addoption(
        "--llmproxy-no-block-network",
        action="store_false",
        dest="llmproxy_block_network",
        help="leave the network open, also in replay",
    )
    group.addoption(
        "--llmproxy-allow-host",
        action="append",
        default=[],
        metavar="HOST",
        help="a host that stays reachable with --llmproxy-block-network (repeatable)",
    )
    parser.addini("llmproxy_mode", "the mode; set it to start the proxy before collection", default="")
    parser.addini("llmproxy_recordings", "default --llmproxy-recordings", default="recordings")
    parser.addini("llmproxy_autouse", "use the llmproxy fixture in every test", type="bool", default=False)
    parser.addini("llmproxy_block_network", "true/false: --llmproxy-block-network (default: on in replay)", default="")
    parser.addini("llmproxy_allow_hosts", "hosts that stay reachable when the network is blocked", type="linelist")
    parser.addini(
        "llmproxy_scope", "whose recordings a test uses: test (default), class, module, shared", default="test"
    )
    parser.addini(
        "llmproxy_scope_fallback", "true/false: a test with no recording of its own uses the shared ones", default=""
    )


def _chosen_mode(config: pytest.Config) -> str | None:
    return config.getoption("--llmproxy-mode") or config.getini("llmproxy_mode") or None


def _is_xdist_controller(config: pytest.Config) -> bool:
    """The xdist process that only hands tests to workers: it imports no test module."""
    return bool(getattr(config.option, "numprocesses", None)) and not hasattr(config, "workerinput")


class SessionProxy:
    """A proxy on its own event loop thread, serving the whole test session."""

    def __init__(self, config: pytest.Config, mode: str) -> None:
        option = config.getoption
        if mode not in MODES:
            raise pytest.UsageError(f"llmproxy mode must be one of {', '.join(MODES)}, not {mode!r}")
        self.mode = Mode(mode)
        recordings = option("--llmproxy-recordings") or config.getini("llmproxy_recordings")
        config_file = option("--llmproxy-config")
        report = option("--llmproxy-report")
        hint = ["pytest --llmproxy-mode record-missing"]
        if recordings != "recordings":
            hint.append(f"--llmproxy-recordings {recordings}")
        if config_file:
            hint.append(f"--llmproxy-config {config_file}")
        fallback = str(config.getini("llmproxy_scope_fallback")).strip().lower()
        try:
            self.settings = load_settings(
                Path(config_file) if config_file else None,
                {
                    "scope_fallback": fallback in ("1", "true", "yes", "on") if fallback else None,
                    "host": "127.0.0.1",
                    "port": 0,
                    "recordings": Path(config.rootpath, recordings),
                    "upstream": option("--llmproxy-upstream"),
                    # xdist workers report to the controller, which writes the one file.
                    "report": Path(report) if report and not hasattr(config, "workerinput") else None,
                    "record_hint": " ".join(hint),
                },
            )
        except LlmproxyError as exc:
            raise pytest.UsageError(f"llmproxy: {exc}") from None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="llmproxy", daemon=True)
        self.server: ProxyServer | None = None
        self.final_report: dict[str, Any] | None = None
        self._saved_env: dict[str, str | None] = {}
        self.current: str | None = None  # the node id of the test whose scope is set

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.port}"

    def upstream_hosts(self) -> set[str]:
        return {urlsplit(route.upstream).hostname or "" for route in self.settings.routes if route.upstream}

    def start(self) -> None:
        self._thread.start()

        async def start() -> ProxyServer:
            server = ProxyServer(self.settings, self.mode, switchable=True)
            await server.start()
            return server

        self.server = asyncio.run_coroutine_threadsafe(start(), self._loop).result(60)
        # A real key the user has stays (as under `run`): a test marked to record sends it.
        for name, value in client_environment(self.url, self.mode, dict(os.environ)).items():
            if os.environ.get(name) != value:
                self._saved_env[name] = os.environ.get(name)
                os.environ[name] = value

    def enter(self, nodeid: str, scope: str | None, mode: str | None) -> list[Path]:
        """The calls from now on are this test's (until leave()); its recordings are replaced
        when it records them all. Returns the files removed for that."""
        assert self.server is not None
        self.current = nodeid
        policy = POLICIES[mode] if mode is not None and mode != self.mode else None
        entered = self.server.pipeline.enter_scope(scope, policy)
        return asyncio.run_coroutine_threadsafe(entered, self._loop).result(60)

    def leave(self) -> None:
        if self.server is not None and self.final_report is None:
            self._loop.call_soon_threadsafe(self.server.pipeline.leave_scope)
        self.current = None

    def report(self) -> dict[str, Any]:
        if self.final_report is not None:
            return self.final_report
        assert self.server is not None
        return self.server.report()

    def stop(self) -> None:
        """Stop serving (writes finish, the report is written); the environment stays until restore()."""
        if self.server is None or self.final_report is not None:
            return
        asyncio.run_coroutine_threadsafe(self.server.stop(), self._loop).result(60)
        self.final_report = self.server.report()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def restore(self) -> None:
        for name, value in self._saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        self._saved_env.clear()


def _block_network(config: pytest.Config, proxy: SessionProxy) -> bool:
    chosen = config.getoption("llmproxy_block_network")
    if chosen is None:
        ini = str(config.getini("llmproxy_block_network")).strip().lower()
        chosen = ini in ("1", "true", "yes", "on") if ini else proxy.mode == Mode.REPLAY
    return bool(chosen)


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "llmproxy(mode=None, scope=None): this test's llmproxy mode (record, record-missing, replay) and "
        "whose recordings it uses: test, class, module, shared, or a name of yours",
    )
    mode = _chosen_mode(config)
    if mode is None:
        return
    if _is_xdist_controller(config):
        config.stash[_WORKER_REPORTS] = []
        return
    proxy = SessionProxy(config, mode)
    proxy.start()
    config.stash[_PROXY] = proxy
    if _block_network(config, proxy):
        allowed = [*config.getoption("--llmproxy-allow-host"), *config.getini("llmproxy_allow_hosts")]
        if proxy.mode != Mode.REPLAY:
            allowed.extend(proxy.upstream_hosts())  # the proxy's own upstream calls
        guard = NetworkGuard(allowed, hint=" (--llmproxy-block-network; allow a host with --llmproxy-allow-host)")
        guard.install()
        config.stash[_GUARD] = guard


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    proxy = session.config.stash.get(_PROXY, None)
    if proxy is None:
        return
    proxy.stop()
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None and proxy.final_report is not None:
        # execnet carries only plain values: the report as its JSON text would be read back.
        workeroutput[_REPORT_KEY] = orjson.loads(orjson.dumps(proxy.final_report, default=str))


def pytest_unconfigure(config: pytest.Config) -> None:
    guard = config.stash.get(_GUARD, None)
    if guard is not None:
        guard.uninstall()
    proxy = config.stash.get(_PROXY, None)
    if proxy is not None:
        proxy.stop()
        proxy.restore()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """xdist controller: keep each worker's report for the summary."""
    reports = node.config.stash.get(_WORKER_REPORTS, None)
    report = getattr(node, "workeroutput", {}).get(_REPORT_KEY)
    if reports is not None and report is not None:
        reports.append(report)


def merge_reports(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One report for several workers: counts add up; a recording is unused if no worker used it."""
    merged = dict(reports[0])
    merged["hits"] = sum(r["hits"] for r in reports)
    merged["errors"] = sum(r["errors"] for r in reports)
    merged["refused"] = sum(r["refused"] for r in reports)
    merged["misses"] = [miss for r in reports for miss in r["misses"]]
    merged["recorded"] = sorted({path for r in reports for path in r["recorded"]})
    unused = [set(r["unused"]) for r in reports if r["unused"] is not None]
    merged["unused"] = sorted(set.intersection(*unused)) if unused else None
    return merged


@pytest.fixture(scope="session")
def llmproxy(request: pytest.FixtureRequest) -> Iterator[SessionProxy]:
    """The session's proxy; SDK base URLs point at it while the session runs."""
    proxy = request.config.stash.get(_PROXY, None)
    if proxy is not None:
        yield proxy
        return
    # No mode was set: start a replay proxy now, for the tests that ask for it.
    proxy = SessionProxy(request.config, "replay")
    proxy.start()
    request.config.stash[_PROXY] = proxy
    try:
        yield proxy
    finally:
        proxy.stop()
        proxy.restore()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    _scope_kind(config, None)  # a wrong ini value is a usage error before anything runs
    for item in items:
        for mark in item.iter_markers("llmproxy"):
            _check_mark(item, mark)
    if config.getini("llmproxy_autouse"):
        for item in items:
            item.fixturenames.insert(0, "llmproxy")  # type: ignore[attr-defined]


def _check_mark(item: pytest.Item, mark: pytest.Mark) -> None:
    unknown = set(mark.kwargs) - set(MARK_ARGUMENTS)
    if mark.args or unknown:
        raise pytest.UsageError(
            f"{item.nodeid}: @pytest.mark.llmproxy takes only keywords {', '.join(MARK_ARGUMENTS)}, "
            f"not {', '.join(sorted(unknown)) or repr(mark.args)}"
        )
    mode = mark.kwargs.get("mode")
    if mode is not None and mode not in MODES:
        raise pytest.UsageError(f"{item.nodeid}: llmproxy mode must be one of {', '.join(MODES)}, not {mode!r}")
    scope = mark.kwargs.get("scope")
    if scope is not None and (not isinstance(scope, str) or not scope.strip()):
        raise pytest.UsageError(f"{item.nodeid}: llmproxy scope must be {', '.join(SCOPE_KINDS)} or a name")


def _scope_kind(config: pytest.Config, mark: pytest.Mark | None) -> str | None:
    if mark is not None and "scope" in mark.kwargs:
        return mark.kwargs["scope"]
    kind = str(config.getini("llmproxy_scope")).strip() or "test"
    if kind not in SCOPE_KINDS:
        raise pytest.UsageError(f"llmproxy_scope must be one of {', '.join(SCOPE_KINDS)}, not {kind!r}")
    return kind


def scope_of(item: pytest.Item) -> str | None:
    """Whose recordings a test uses: its node id (by default), its class's, its module's, the
    shared ones (None), or a scope named in its mark."""
    mark = item.get_closest_marker("llmproxy")
    kind = _scope_kind(item.config, mark)
    module = item.nodeid.split("::", 1)[0]
    if kind is None or kind == "shared":
        return None
    if kind == "test":
        return item.nodeid
    if kind == "module":
        return module
    if kind == "class":
        parent = item.getparent(pytest.Class)
        return parent.nodeid if parent is not None else module
    return kind


def _enter(item: pytest.Item, proxy: SessionProxy) -> None:
    mark = item.get_closest_marker("llmproxy")
    mode = mark.kwargs.get("mode") if mark is not None else None
    guard = item.config.stash.get(_GUARD, None)
    if guard is not None and mode not in (None, Mode.REPLAY.value) and proxy.mode == Mode.REPLAY:
        # A test that records in a blocked replay session: its proxy's upstreams open meanwhile.
        opened = proxy.upstream_hosts() - guard.allowed
        guard.allowed |= opened
        item.stash[_OPENED] = opened
    proxy.enter(item.nodeid, scope_of(item), mode)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    proxy = item.config.stash.get(_PROXY, None)
    if proxy is not None and proxy.server is not None:
        _enter(item, proxy)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> None:
    proxy = item.config.stash.get(_PROXY, None)
    if proxy is not None and proxy.server is not None and proxy.current != item.nodeid:
        _enter(item, proxy)  # the proxy was started by this test's own fixture


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Iterator[None]:
    yield  # the test's own fixtures tear down (and may still call) within its scope
    proxy = item.config.stash.get(_PROXY, None)
    if proxy is not None and proxy.current == item.nodeid:
        proxy.leave()
    guard = item.config.stash.get(_GUARD, None)
    opened = item.stash.get(_OPENED, None)
    if guard is not None and opened:
        guard.allowed -= opened


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    proxy = config.stash.get(_PROXY, None)
    workers = config.stash.get(_WORKER_REPORTS, None)
    if proxy is not None and proxy.server is not None:
        report, mode, path = proxy.report(), proxy.mode.value, proxy.settings.report
    elif workers:
        report, mode = merge_reports(workers), workers[0]["mode"]
        chosen = config.getoption("--llmproxy-report")
        path = Path(chosen) if chosen else None
        if path is not None:
            write_report(path, report)
    else:
        return
    unused = report["unused"]
    terminalreporter.write_sep("-", "llmproxy")
    terminalreporter.write_line(
        f"mode {mode}: {report['hits']} hit(s), {len(report['misses'])} miss(es), "
        f"{len(report['recorded'])} recorded, {'-' if unused is None else len(unused)} unused recording(s)"
    )
    for miss in report["misses"]:
        where = f" in {miss['scope']}" if miss.get("scope") else ""
        terminalreporter.write_line(
            f"  missed {miss['method']} {miss['path']} (model {miss['model']}, key {miss['key'][:16]}){where}"
        )
    if path is not None:
        terminalreporter.write_line(f"usage report: {path}")
