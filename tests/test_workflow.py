"""The team workflow: record-if-missing, forward on miss, repeats in order, rules applied to old
recordings, the secret scanner, usage reports and pruning."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import openai
import pytest
import structlog

from tests.providers_support import write_config
from tests.support import LoopThread, RunningApp, files_under, start_proxy
from tests.upstreams.openai_wire import OpenAIWire

KEY = "sk-test-workflow-key-0123456789abcdef"


def ask(base_url: str, content: str, **extra: object) -> str:
    client = openai.OpenAI(base_url=base_url + "/v1", api_key=KEY, max_retries=0)
    answer = client.chat.completions.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": content}],
        **extra,  # type: ignore[arg-type]
    )
    return answer.choices[0].message.content or ""


@pytest.fixture
def upstream(loop_thread: LoopThread):  # type: ignore[no-untyped-def]
    wire = OpenAIWire()
    app = RunningApp(loop_thread, wire.app()).start()
    yield wire, app
    app.stop()


def test_record_missing_replays_known_calls_and_records_only_new_ones(
    loop_thread: LoopThread, tmp_path: Path, upstream
) -> None:
    wire, app = upstream
    proxy = start_proxy(loop_thread, "record", tmp_path, upstream=app.url)
    try:
        ask(proxy.url, "first")
    finally:
        proxy.stop()
    assert len(wire.requests) == 1
    with structlog.testing.capture_logs() as logs:
        proxy = start_proxy(loop_thread, "record-missing", tmp_path, upstream=app.url)
        try:
            assert ask(proxy.url, "first") == "ECHO: FIRST"
            assert ask(proxy.url, "second") == "ECHO: SECOND"
        finally:
            proxy.stop()
    assert [r["body"]["messages"][0]["content"] for r in wire.requests] == ["first", "second"]
    assert len(files_under(tmp_path)) == 2
    live = [entry for entry in logs if entry["event"] == "live call: no recording yet"]
    assert len(live) == 1 and live[0]["path"] == "/v1/chat/completions"
    summary = next(entry for entry in logs if entry["event"] == "summary")
    # The miss was recorded: it is counted apart, not as a miss (issue 11: prune accepts the report).
    assert (summary["hits"], summary["misses"], summary["recorded_misses"], summary["recorded"]) == (1, 0, 1, 1)


def test_replay_on_miss_forward_calls_upstream_without_recording(
    loop_thread: LoopThread, tmp_path: Path, upstream
) -> None:
    wire, app = upstream
    proxy = start_proxy(loop_thread, "replay", tmp_path, upstream=app.url, on_miss="forward")
    try:
        assert ask(proxy.url, "live please") == "ECHO: LIVE PLEASE"
    finally:
        proxy.stop()
    assert len(wire.requests) == 1
    assert files_under(tmp_path) == []


def test_three_identical_requests_replay_in_recorded_order(loop_thread: LoopThread, tmp_path: Path, upstream) -> None:
    wire, app = upstream
    proxy = start_proxy(loop_thread, "record", tmp_path, upstream=app.url)
    try:
        recorded = [
            openai.OpenAI(base_url=proxy.url + "/v1", api_key=KEY)
            .chat.completions.with_raw_response.create(
                model="gpt-4o", messages=[{"role": "user", "content": "sample"}], temperature=1.0
            )
            .headers["x-request-id"]
            for _ in range(3)
        ]
    finally:
        proxy.stop()
    assert len(set(recorded)) == 3  # three different answers (ids) from the upstream
    names = sorted(p.name for p in files_under(tmp_path))
    assert names[0].endswith("-2.json") and names[1].endswith("-3.json") and names[2].endswith(".json")

    def replay_ids(after_last: str, count: int) -> list[object]:
        proxy = start_proxy(loop_thread, "replay", tmp_path, after_last=after_last)
        client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
        ids: list[object] = []
        try:
            for _ in range(count):
                try:
                    ids.append(
                        client.chat.completions.with_raw_response.create(
                            model="gpt-4o", messages=[{"role": "user", "content": "sample"}], temperature=1.0
                        ).headers["x-request-id"]
                    )
                except openai.NotFoundError as exc:
                    ids.append(exc.body)
        finally:
            proxy.stop()
        return ids

    assert replay_ids("repeat", 4) == [*recorded, recorded[-1]]
    exhausted = replay_ids("error", 4)
    assert exhausted[:3] == recorded
    assert isinstance(exhausted[3], dict) and exhausted[3]["code"] == "recordings_exhausted"


def test_a_rule_change_makes_old_recordings_hit_without_rerecording(
    loop_thread: LoopThread, tmp_path: Path, upstream
) -> None:
    wire, app = upstream
    recordings = tmp_path / "recordings"
    plain = write_config(tmp_path / "plain.toml", [{"name": "openai", "provider": "openai", "upstream": app.url}])
    proxy = start_proxy(loop_thread, "record", recordings, config=plain)
    try:
        ask(proxy.url, "rules", user="alice", metadata={"run": "1"})
    finally:
        proxy.stop()
    before = {p: p.read_bytes() for p in files_under(recordings)}

    replay = start_proxy(loop_thread, "replay", recordings, config=plain)
    try:
        with pytest.raises(openai.NotFoundError) as caught:
            ask(replay.url, "rules", user="bob", metadata={"run": "2"})
    finally:
        replay.stop()
    message = caught.value.body["message"]  # type: ignore[index]
    assert 'user: "bob" != "alice" recorded' in message
    assert 'metadata.run: "2" != "1" recorded' in message

    ruled = write_config(
        tmp_path / "ruled.toml",
        [{"name": "openai", "provider": "openai", "upstream": app.url, "ignore_body": ["user", "metadata"]}],
    )
    replay = start_proxy(loop_thread, "replay", recordings, config=ruled)
    try:
        assert ask(replay.url, "rules", user="bob", metadata={"run": "2"}) == "ECHO: RULES"
    finally:
        replay.stop()
    assert {p: p.read_bytes() for p in files_under(recordings)} == before  # nothing re-recorded


def test_float_rounding_rule(loop_thread: LoopThread, tmp_path: Path, upstream) -> None:
    wire, app = upstream
    config = tmp_path / "llmproxy.toml"
    config.write_text(f'[[routes]]\nname = "openai"\nprovider = "openai"\nupstream = "{app.url}"\nround_floats = 2\n')
    proxy = start_proxy(loop_thread, "record", tmp_path / "rec", config=config)
    try:
        ask(proxy.url, "floats", temperature=0.7000001)
    finally:
        proxy.stop()
    replay = start_proxy(loop_thread, "replay", tmp_path / "rec", config=config)
    try:
        assert ask(replay.url, "floats", temperature=0.7) == "ECHO: FLOATS"
        with pytest.raises(openai.NotFoundError):
            ask(replay.url, "floats", temperature=0.8)
    finally:
        replay.stop()


def test_a_planted_credential_refuses_the_write_but_the_client_gets_its_answer(
    loop_thread: LoopThread, tmp_path: Path, upstream
) -> None:
    wire, app = upstream
    planted = "sk-proj-PLANTEDinPROMPT0123456789abcdefXYZ"
    with structlog.testing.capture_logs() as logs:
        proxy = start_proxy(loop_thread, "record", tmp_path, upstream=app.url)
        try:
            answer = ask(proxy.url, f"my key is {planted}")
            ask(proxy.url, "harmless")
        finally:
            proxy.stop()
    assert answer == f"ECHO: MY KEY IS {planted.upper()}"
    [path] = files_under(tmp_path)  # only the harmless exchange
    assert planted not in path.read_text()
    [refusal] = [entry for entry in logs if entry["event"] == "recording refused: it would hold a credential"]
    assert "openai key in request.body.messages[0].content" in refusal["findings"]
    assert planted not in json.dumps(logs)
    summary = next(entry for entry in logs if entry["event"] == "summary")
    assert summary["refused"] == 1


def test_usage_report_and_prune(loop_thread: LoopThread, tmp_path: Path, upstream) -> None:
    wire, app = upstream
    recordings = tmp_path / "recordings"
    proxy = start_proxy(loop_thread, "record", recordings, upstream=app.url)
    try:
        ask(proxy.url, "kept")
        ask(proxy.url, "stale")
    finally:
        proxy.stop()
    [kept_file] = [p for p in files_under(recordings) if "kept" in p.read_text()]
    [stale_file] = [p for p in files_under(recordings) if "stale" in p.read_text()]

    missed_report = tmp_path / "missed.json"
    replay = start_proxy(loop_thread, "replay", recordings, report=missed_report)
    try:
        ask(replay.url, "kept")
        with pytest.raises(openai.NotFoundError):
            ask(replay.url, "never recorded")
    finally:
        replay.stop()
    report = json.loads(missed_report.read_text())
    assert report["hits"] == 1 and len(report["misses"]) == 1
    assert report["unused"] == [str(stale_file)]

    prune = [sys.executable, "-m", "llmproxy", "prune", "--report"]
    refused = subprocess.run([*prune, str(missed_report)], capture_output=True, text=True)
    assert refused.returncode == 1
    assert "1 miss(es)" in refused.stderr and "nothing is pruned" in refused.stderr
    assert stale_file.exists()

    clean_report = tmp_path / "clean.json"
    replay = start_proxy(loop_thread, "replay", recordings, report=clean_report)
    try:
        ask(replay.url, "kept")
    finally:
        replay.stop()
    dry = subprocess.run([*prune, str(clean_report), "--dry-run"], capture_output=True, text=True)
    assert dry.returncode == 0 and str(stale_file) in dry.stdout and stale_file.exists()
    done = subprocess.run([*prune, str(clean_report)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"deleted {stale_file}" in done.stdout
    assert not stale_file.exists() and kept_file.exists()


def test_record_missing_adds_a_repeat_when_asked_more_often_than_recorded(
    loop_thread: LoopThread, tmp_path: Path, upstream
) -> None:
    wire, app = upstream
    proxy = start_proxy(loop_thread, "record", tmp_path, upstream=app.url)
    try:
        ask(proxy.url, "again")
    finally:
        proxy.stop()
    proxy = start_proxy(loop_thread, "record-missing", tmp_path, upstream=app.url, after_last="error")
    try:
        ask(proxy.url, "again")  # replayed
        ask(proxy.url, "again")  # one more than recorded: recorded as the second repeat
    finally:
        proxy.stop()
    assert len(wire.requests) == 2
    names = sorted(p.name for p in files_under(tmp_path))
    assert len(names) == 2 and names[0].endswith("-2.json")
    assert json.loads((tmp_path / "openai" / names[0]).read_text())["request"]["sequence"] == 2
