"""The maintenance commands as a user runs them: check, explain, ls, show, run -- CMD."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import openai
import pytest

from tests.support import SEED, LoopThread, RunningApp, files_under, start_proxy
from tests.upstreams.openai_wire import OpenAIWire


def llmproxy(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llmproxy", *args], capture_output=True, text=True, cwd=cwd, timeout=60
    )


@pytest.fixture
def recorded(loop_thread: LoopThread, tmp_path: Path) -> Path:
    """A small recordings directory made by a real recording run."""
    wire = OpenAIWire()
    app = RunningApp(loop_thread, wire.app()).start()
    recordings = tmp_path / "recordings"
    proxy = start_proxy(loop_thread, "record", recordings, upstream=app.url)
    try:
        client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk-test-commands-0000000000000000", max_retries=0)
        client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "what is 2+2"}], temperature=0.5
        )
        client.embeddings.create(model="text-embedding-3-small", input="vector")
    finally:
        proxy.stop()
        app.stop()
    shutil.copy(SEED, recordings / SEED.name)
    return recordings


def test_check_passes_a_clean_directory_and_fails_on_secret_corrupt_and_misnamed(recorded: Path) -> None:
    clean = llmproxy("check", str(recorded))
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "0 problem(s) in 3 file(s)" in clean.stdout

    chat = next(p for p in files_under(recorded) if p.name.startswith("chat-completions"))
    document = json.loads(chat.read_text())
    document["request"]["body"]["messages"][0]["content"] = "token sk-ant-api03-PLANTEDsecret0123456789abcdef"
    chat.write_text(json.dumps(document, indent=2))  # the content changed, so its key did too
    (recorded / "corrupt.json").write_text('{"request": ')
    (recorded / ".half-written.json.x1y2.tmp").write_text("{")

    failed = llmproxy("check", str(recorded))
    assert failed.returncode == 1
    report = failed.stdout
    assert f"{chat}: secret: anthropic key in request.body.messages[0].content" in report
    assert f"{chat}: misnamed:" in report
    assert f"{recorded / 'corrupt.json'}: invalid: not valid JSON" in report
    assert "leftover" in report and "Traceback" not in failed.stderr
    assert "PLANTEDsecret" not in report  # the report names the field, not the secret

    copy = recorded / "copy-of-embeddings.json"
    shutil.copy(next(p for p in files_under(recorded) if p.name.startswith("embeddings")), copy)
    assert "duplicate: same request and sequence 1" in llmproxy("check", str(recorded)).stdout

    fixed = llmproxy("check", str(recorded), "--fix")
    assert "deleted the temp file of an unfinished write" in fixed.stdout
    assert not (recorded / ".half-written.json.x1y2.tmp").exists()


def test_explain_names_key_rules_hit_and_nearest(recorded: Path, tmp_path: Path) -> None:
    request = tmp_path / "request.json"
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "what is 2+2"}], "temperature": 0.5}
    request.write_text(json.dumps({"method": "POST", "path": "/v1/chat/completions", "body": body}))
    hit = llmproxy("explain", str(request), "--recordings", str(recorded))
    assert hit.returncode == 0, hit.stderr
    assert "route       openai (provider openai" in hit.stdout
    assert "key         " in hit.stdout and "ignored body fields: -" in hit.stdout
    assert "hit         " + str(recorded / "openai") in hit.stdout

    request.write_text(
        json.dumps({"method": "POST", "path": "/v1/chat/completions", "body": {**body, "temperature": 0.9}})
    )
    miss = llmproxy("explain", str(request), "--recordings", str(recorded))
    assert "hit         none" in miss.stdout
    assert "nearest 1" in miss.stdout and "temperature: 0.9 != 0.5 recorded" in miss.stdout


def test_ls_lists_and_filters_by_age_and_show_prints_a_conversation(recorded: Path) -> None:
    listing = llmproxy("ls", "--recordings", str(recorded))
    assert listing.returncode == 0
    assert "3 recording(s)" in listing.stdout
    assert "/v1/embeddings" in listing.stdout and "text-embedding-3-small" in listing.stdout
    assert "1 recording(s)" in llmproxy("ls", "--recordings", str(recorded), "--model", "embedding").stdout
    # Just recorded: nothing is older than a day, except the seed, whose age is unknown.
    stale = llmproxy("ls", "--recordings", str(recorded), "--older-than", "1d").stdout
    assert "1 recording(s)" in stale and SEED.name in stale and "unknown" in stale
    assert llmproxy("ls", "--recordings", str(recorded), "--older-than", "soon").returncode == 2

    chat = next(p for p in files_under(recorded) if p.name.startswith("chat-completions"))
    shown = llmproxy("show", str(chat))
    assert shown.returncode == 0
    assert "[user] what is 2+2" in shown.stdout
    assert "[assistant] ECHO: WHAT IS 2+2" in shown.stdout
    assert "answered by gpt-4o-2024-08-06" in shown.stdout


def test_run_points_the_child_at_the_proxy_and_returns_its_status(tmp_path: Path) -> None:
    shutil.copy(SEED, tmp_path / SEED.name)
    child = tmp_path / "child.py"
    child.write_text(
        "import os, sys\n"
        "from openai import OpenAI\n"
        "client = OpenAI()  # no key, no base URL: both come from llmproxy run\n"
        "stream = client.chat.completions.create(model='gpt-4o', response_format={'type': 'text'}, stream=True,\n"
        "    messages=[{'role': 'user', 'content': [{'type': 'text', 'text': 'Which planet do humans live on?'}]},\n"
        "              {'role': 'assistant', 'content': [{'type': 'text', 'text': 'Humans live on Earth.'}]},\n"
        "              {'role': 'user', 'content': 'Repeat your previous response in all caps.'}])\n"
        "print(''.join(c.choices[0].delta.content or '' for c in stream))\n"
        "print(os.environ['ANTHROPIC_BASE_URL'], os.environ['OLLAMA_HOST'], os.environ['GOOGLE_GEMINI_BASE_URL'])\n"
        "sys.exit(7)\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith(("OPENAI_", "ANTHROPIC_"))}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmproxy",
            "run",
            "replay",
            "--recordings",
            str(tmp_path),
            "--",
            sys.executable,
            str(child),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 7, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "HUMANS LIVE ON EARTH."
    assert all(url.startswith("http://127.0.0.1:") for url in lines[1].split())
    assert "summary" in result.stderr and "hits=1" in result.stderr
    missing = llmproxy("run", "replay", "--recordings", str(tmp_path), "--", "no-such-command-xyz")
    assert missing.returncode == 127 and "cannot start the command" in missing.stderr
