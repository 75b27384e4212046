"""The small edges that misled users: `explain`'s exit status and input, a replay miss of an
exchange that a record run dropped, and the secret scanner's hint. The CLI runs as a user runs
it; the proxy is real; the upstream is a local server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import openai
import pytest
import structlog

from tests.support import REPO, SEED, LoopThread, RunningApp, files_under, free_port, start_proxy
from tests.upstreams.openai_wire import OpenAIWire

HIT = {
    "method": "POST",
    "path": "/v1/chat/completions",
    "body": json.loads(SEED.read_text())["request"]["body"],
}


def llmproxy(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llmproxy", *args], capture_output=True, text=True, cwd=REPO, timeout=60, input=stdin
    )


def test_explain_exits_0_on_a_hit_and_1_on_a_miss() -> None:
    hit = llmproxy("explain", "-", "--recordings", str(SEED.parent), stdin=json.dumps(HIT))
    assert hit.returncode == 0, hit.stderr
    assert f"hit         {SEED.relative_to(REPO)}" in hit.stdout or f"hit         {SEED}" in hit.stdout
    miss_request = {**HIT, "body": {**HIT["body"], "model": "gpt-4o-mini"}}
    miss = llmproxy("explain", "-", "--recordings", str(SEED.parent), stdin=json.dumps(miss_request))
    assert miss.returncode == 1
    assert "hit         none" in miss.stdout and "nearest 1" in miss.stdout
    no_route = llmproxy("explain", "-", "--recordings", str(SEED.parent), stdin=json.dumps({**HIT, "path": "/x"}))
    assert no_route.returncode == 1 and "route       none" in no_route.stdout


def test_explain_reads_a_request_from_stdin_with_dash(tmp_path: Path) -> None:
    from_stdin = llmproxy("explain", "-", "--recordings", str(SEED.parent), stdin=json.dumps(HIT))
    request = tmp_path / "request.json"
    request.write_text(json.dumps(HIT))
    from_file = llmproxy("explain", str(request), "--recordings", str(SEED.parent))
    assert from_stdin.returncode == from_file.returncode == 0
    assert from_stdin.stdout == from_file.stdout


@pytest.mark.parametrize(
    "document",
    [
        {"body": {"model": "gpt-4o"}},  # no method, no path
        {"method": "POST", "body": {}},  # no path
        {"path": "/v1/chat/completions"},  # no method
        {"method": 7, "path": "/v1/chat/completions"},
        {"method": "POST", "path": "/v1/chat/completions", "headers": ["x"]},
        [1, 2],
    ],
)
def test_explain_refuses_a_file_that_is_no_request_with_one_clear_line(document: Any) -> None:
    result = llmproxy("explain", "-", "--recordings", str(SEED.parent), stdin=json.dumps(document))
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: stdin: "), result.stderr
    assert '"method"' in lines[0] or "headers" in lines[0] or "JSON object" in lines[0]


def test_explain_refuses_bad_json_from_stdin_with_one_line() -> None:
    result = llmproxy("explain", "-", stdin="{not json")
    assert result.returncode == 1
    assert result.stderr.startswith("Error: stdin: not valid JSON") and "Traceback" not in result.stderr


def _ask(url: str, content: str) -> Any:
    client = openai.OpenAI(base_url=url + "/v1", api_key="sk-proj-" + "D" * 40, max_retries=0)
    try:
        return client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": content}])
    finally:
        client.close()


def test_a_replay_miss_of_an_exchange_the_record_run_dropped_says_so(loop_thread: LoopThread, tmp_path: Path) -> None:
    recordings = tmp_path / "recordings"
    # The upstream is down while recording: the exchange is not written (not_recorded=1).
    record = start_proxy(loop_thread, "record", recordings, upstream=f"http://127.0.0.1:{free_port()}")
    try:
        with pytest.raises(openai.APIStatusError):
            _ask(record.url, "dropped while recording")
    finally:
        record.stop()
    assert record.server.pipeline.outcome.not_recorded_by == {"upstream_failed": 1}
    assert files_under(recordings) == []

    replay = start_proxy(loop_thread, "replay", recordings)
    try:
        with structlog.testing.capture_logs() as logs:
            with pytest.raises(openai.NotFoundError) as dropped:
                _ask(replay.url, "dropped while recording")
            with pytest.raises(openai.NotFoundError) as never_sent:
                _ask(replay.url, "never sent to record")
    finally:
        replay.stop()
    message = dropped.value.message
    assert "This very request reached llmproxy record at " in message
    assert "not recorded: the upstream gave no whole answer" in message and "not_recorded" in message
    assert "reached llmproxy record" not in never_sent.value.message  # only the dropped one says so
    misses = [e for e in logs if e["event"] == "replay miss"]
    assert [e["not_recorded"] for e in misses] == ["upstream_failed", None]


def test_a_replay_miss_of_an_exchange_refused_for_a_credential_says_it_was_not_recorded(
    loop_thread: LoopThread, tmp_path: Path
) -> None:
    wire = OpenAIWire()
    app = RunningApp(loop_thread, wire.app()).start()
    recordings = tmp_path / "recordings"
    secret = "sk-ant-api03-" + "K" * 40
    record = start_proxy(loop_thread, "record", recordings, upstream=app.url)
    try:
        # The writer logs the refusal after the client was answered: capture until the proxy stopped.
        with structlog.testing.capture_logs() as logs:
            try:
                _ask(record.url, f"my key is {secret}")
            finally:
                record.stop()
    finally:
        app.stop()
    refusal = next(e for e in logs if e["event"] == "recording refused: it would hold a credential")
    # The hint offers what works: redaction or an allow-list, never an ignore rule that would not help.
    assert 'secrets = "redact"' in refusal["hint"] and "secret_allow" in refusal["hint"]
    assert "ignore" not in refusal["hint"]
    assert files_under(recordings) == []
    notes = (recordings / ".llmproxy-not-recorded.jsonl").read_text()
    assert secret not in notes and "chat/completions" in notes
    assert [json.loads(line)["reason"] for line in notes.splitlines()] == ["secret"]

    replay = start_proxy(loop_thread, "replay", recordings)
    try:
        with pytest.raises(openai.NotFoundError) as missed:
            _ask(replay.url, f"my key is {secret}")
    finally:
        replay.stop()
    assert "reached llmproxy record at " in missed.value.message and "was not recorded" in missed.value.message
