"""The pytest plugin, used the way a project would: a test suite run under pytest, recording
against an upstream, then replaying offline, then failing clearly on a miss."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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


def run_pytest(project: Path, *args: str, env_key: bool = True) -> subprocess.CompletedProcess[str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "PYTEST_"))}
    if env_key:
        env["OPENAI_API_KEY"] = "sk-test-plugin-key-000000000000000000"
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args],
        cwd=project,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
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
