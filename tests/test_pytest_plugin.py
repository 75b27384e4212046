"""The pytest plugin, used the way a project would: a test suite run under pytest, recording
against an upstream, then replaying offline, then failing clearly on a miss."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from aiohttp import web

from tests.support import LoopThread, RunningApp, files_under
from tests.upstreams.openai_wire import OpenAIWire

SUITE = """
import openai
import pytest

pytestmark = pytest.mark.usefixtures("llmproxy")


def ask(text):
    client = openai.OpenAI(max_retries=0)  # base URL and (in replay) key come from the plugin
    return client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": text}])


def test_one():
    assert ask("plugin one").choices[0].message.content == "ECHO: PLUGIN ONE"


def test_two():
    assert ask("plugin two").choices[0].message.content == "ECHO: PLUGIN TWO"
"""

MISSING = """
import openai
import pytest


@pytest.mark.usefixtures("llmproxy")
def test_not_recorded():
    openai.OpenAI(max_retries=0).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "new"}])
"""


def run_pytest(
    project: Path, *args: str, env_key: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    import os

    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "PYTEST_"))}
    if env_key:
        full_env["OPENAI_API_KEY"] = "sk-test-plugin-key-000000000000000000"
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args],
        cwd=project,
        capture_output=True,
        text=True,
        env=full_env,
        timeout=180,
    )


def test_plugin_records_replays_and_fails_clearly_on_a_miss(loop_thread: LoopThread, tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "test_suite.py").write_text(SUITE)
    wire = OpenAIWire()
    app = RunningApp(loop_thread, wire.app()).start()
    try:
        recorded = run_pytest(project, "--llmproxy-mode", "record", "--llmproxy-upstream", app.url)
    finally:
        app.stop()
    assert recorded.returncode == 0, recorded.stdout + recorded.stderr
    assert len(wire.requests) == 2
    assert len(files_under(project / "recordings")) == 2
    assert "mode record: 0 hit(s), 0 miss(es), 2 recorded" in recorded.stdout

    report = tmp_path / "usage.json"
    replayed = run_pytest(project, "--llmproxy-report", str(report), env_key=False)  # replay is the default
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    assert "2 passed" in replayed.stdout
    assert "mode replay: 2 hit(s), 0 miss(es), 0 recorded, 0 unused" in replayed.stdout
    usage = json.loads(report.read_text())
    assert usage["hits"] == 2 and usage["misses"] == [] and usage["unused"] == []

    (project / "test_missing.py").write_text(MISSING)
    missed = run_pytest(project, "test_missing.py", env_key=False)
    assert missed.returncode == 1
    assert "NotFoundError" in missed.stdout
    assert "llmproxy has no recording for POST /v1/chat/completions" in missed.stdout
    assert 'messages[0].content: "new" != ' in missed.stdout
    assert "missed POST /v1/chat/completions" in missed.stdout


CONTAINED = """
import asyncio
import os
import urllib.request

import openai

# Created at import time, before any fixture could run: it must still talk to the proxy.
client = openai.OpenAI(max_retries=0)


def ask(text):
    return client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": text}])


def test_recorded():
    assert ask("contained").choices[0].message.content == "ECHO: CONTAINED"


def test_not_recorded():
    ask("never recorded")


def test_name_blocked():
    urllib.request.urlopen("http://example.invalid/", timeout=5)


def test_address_blocked():
    urllib.request.urlopen("http://10.255.255.1/", timeout=5)


def test_asyncio_blocked():
    asyncio.run(asyncio.wait_for(asyncio.open_connection("10.255.255.1", 80), 5))


def test_loopback_open():
    assert urllib.request.urlopen(os.environ["OTHER_LOCAL_URL"] + "/ping", timeout=5).read() == b"pong"
"""


def _outcomes(junit: Path) -> dict[str, str]:
    """Each test's outcome: "passed", or its failure message and text (from pytest's JUnit XML)."""
    import xml.etree.ElementTree as ET

    outcomes = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        failure = case.find("failure")
        outcomes[case.get("name", "")] = (
            "passed" if failure is None else f"{failure.get('message', '')}\n{failure.text or ''}"
        )
    return outcomes


def _contained_project(tmp_path: Path) -> Path:
    project = tmp_path / "project"
    project.mkdir()
    (project / "test_app.py").write_text(CONTAINED)
    return project


def _ping_app() -> web.Application:
    async def ping(_: web.Request) -> web.Response:
        return web.Response(text="pong")

    app = web.Application()
    app.router.add_get("/ping", ping)
    return app


@pytest.mark.parametrize("workers", [None, "2"], ids=["one-process", "xdist"])
def test_a_mode_contains_the_test_process_before_collection(
    loop_thread: LoopThread, tmp_path: Path, workers: str | None
) -> None:
    """A module-level client and a live upstream in the environment: replay never reaches it,
    a missing recording fails with the miss message, other hosts fail at once, named."""
    project = _contained_project(tmp_path)
    wire = OpenAIWire()
    upstream = RunningApp(loop_thread, wire.app()).start()
    other = RunningApp(loop_thread, _ping_app()).start()
    # The user's environment points the SDK at the live API with a real key, as it would.
    live = {"OPENAI_BASE_URL": upstream.url + "/v1", "OTHER_LOCAL_URL": other.url}
    xdist = ["-n", workers, "-p", "xdist"] if workers else ["-p", "no:xdist"]
    try:
        recorded = run_pytest(
            project, "--llmproxy-mode", "record", "--llmproxy-upstream", upstream.url, "-k", "test_recorded", env=live
        )
        assert recorded.returncode == 0, recorded.stdout + recorded.stderr
        assert len(wire.requests) == 1
        wire.requests.clear()

        junit = tmp_path / "junit.xml"
        replayed = run_pytest(project, "--llmproxy-mode", "replay", f"--junitxml={junit}", *xdist, env=live)
    finally:
        upstream.stop()
        other.stop()
    assert replayed.returncode == 1, replayed.stdout + replayed.stderr
    assert wire.requests == []  # the import-time client went through the proxy, not to the live upstream
    outcomes = _outcomes(junit)
    assert outcomes["test_recorded"] == "passed"
    assert outcomes["test_loopback_open"] == "passed"
    miss = outcomes["test_not_recorded"]
    assert "llmproxy has no recording for POST /v1/chat/completions" in miss
    assert "pytest --llmproxy-mode record-missing" in miss  # the command that fits, not the CLI's
    assert (
        "NetworkBlockedError: llmproxy blocked a network connection to example.invalid:80"
        in outcomes["test_name_blocked"]
    )
    assert (
        "NetworkBlockedError: llmproxy blocked a network connection to 10.255.255.1:80"
        in outcomes["test_address_blocked"]
    )
    assert "llmproxy blocked a network connection to 10.255.255.1:80" in outcomes["test_asyncio_blocked"]
    assert "mode replay: 1 hit(s), 1 miss(es), 0 recorded, 0 unused" in replayed.stdout


def test_block_network_can_be_turned_off_and_allows_listed_hosts(tmp_path: Path) -> None:
    from llmproxy.netblock import NetworkGuard

    guard = NetworkGuard(["api.internal.example", "10.1.2.3"])
    assert guard.allows("127.0.0.1") and guard.allows("::1") and guard.allows("localhost")
    assert guard.allows("api.internal.example") and guard.allows("10.1.2.3")
    assert not guard.allows("example.invalid") and not guard.allows("10.255.255.1")

    project = tmp_path / "project"
    project.mkdir()
    (project / "test_open.py").write_text(
        "import socket\n\n"
        "def test_resolution_is_not_refused():\n"
        "    try:\n"
        "        socket.getaddrinfo('example.invalid', 80)\n"
        "    except socket.gaierror:\n"
        "        pass  # refused by the resolver, not by llmproxy\n"
    )
    (project / "recordings").mkdir()
    opened = run_pytest(project, "--llmproxy-mode", "replay", "--llmproxy-no-block-network")
    assert opened.returncode == 0, opened.stdout + opened.stderr


def test_the_ini_mode_also_starts_the_proxy_before_collection(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "pytest.ini").write_text("[pytest]\nllmproxy_mode = replay\n")
    (project / "recordings").mkdir()
    (project / "test_env.py").write_text(
        "import os\n\n"
        "AT_IMPORT = os.environ.get('OPENAI_BASE_URL', '')  # read while the module is collected\n\n\n"
        "def test_the_proxy_was_there_at_import():\n"
        "    assert AT_IMPORT.startswith('http://127.0.0.1:') and AT_IMPORT.endswith('/v1'), AT_IMPORT\n"
        "    assert AT_IMPORT == os.environ['OPENAI_BASE_URL']\n"
    )
    result = run_pytest(project, "-p", "no:xdist", env={"OPENAI_BASE_URL": "https://api.openai.com/v1"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "mode replay: 0 hit(s), 0 miss(es)" in result.stdout


MARKED_RECORD = """
import openai
import pytest


@pytest.mark.llmproxy(mode="record")
def test_recorded_in_a_replay_run():
    client = openai.OpenAI(max_retries=0)
    assert client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "marked"}]
    ).choices[0].message.content == "ECHO: MARKED"
"""


def test_a_test_marked_to_record_in_a_replay_run_sends_the_users_real_key(
    loop_thread: LoopThread, tmp_path: Path
) -> None:
    """Replay sets placeholder keys only where the user has none: a real one stays for the
    tests that record."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "test_marked.py").write_text(MARKED_RECORD)
    wire = OpenAIWire()
    app = RunningApp(loop_thread, wire.app()).start()
    try:
        result = run_pytest(project, "--llmproxy-mode", "replay", "--llmproxy-upstream", app.url)
    finally:
        app.stop()
    assert result.returncode == 0, result.stdout + result.stderr
    (request,) = wire.requests
    assert request["headers"]["Authorization"] == "Bearer sk-test-plugin-key-000000000000000000"
    assert len(files_under(project / "recordings")) == 1
