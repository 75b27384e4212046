"""Repeats never overwrite: two `llmproxy record` processes on one directory (two pytest-xdist
workers sampling the same prompt) each record the same request once: two files, numbered 1 and
2, and replay serves both in order."""

from __future__ import annotations

from pathlib import Path

import openai
import orjson

from llmproxy.store.directory import RecordingStore
from tests.support import CliProxy, LoopThread, RunningApp, files_under, start_proxy, wait_until
from tests.upstreams.openai_wire import OpenAIWire

MESSAGES = [{"role": "user", "content": "sample me twice"}]


def _ask(url: str) -> str:
    client = openai.OpenAI(base_url=url + "/v1", api_key="sk-test-not-a-real-key", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES)  # type: ignore[arg-type]
    raw.parse()
    return raw.headers["x-request-id"]  # the upstream numbers its answers


def _wait_for_files(directory: Path, count: int, timeout: float = 20) -> list[Path]:
    # The recording is written after the client was answered: wait for the file itself.
    def found() -> list[Path]:
        return [p for p in files_under(directory) if p.suffix == ".json"] if directory.exists() else []

    wait_until(lambda: len(found()) >= count, f"{count} recordings under {directory}", timeout)
    return found()


def test_two_record_processes_same_request_one_after_the_other_write_two_files(
    loop_thread: LoopThread, tmp_path: Path
) -> None:
    wire = OpenAIWire()
    upstream = RunningApp(loop_thread, wire.app()).start()
    recordings = tmp_path / "recordings"
    first = CliProxy(
        "record", "--upstream", upstream.url, "--recordings", str(recordings), "--port", "0", "--log-level", "debug"
    )
    second = CliProxy(
        "record", "--upstream", upstream.url, "--recordings", str(recordings), "--port", "0", "--log-level", "debug"
    )
    try:
        first_id = _ask(first.url)
        _wait_for_files(recordings, 1)
        second_id = _ask(second.url)
        files = _wait_for_files(recordings, 2)
    finally:
        first_events = first.stop()
        second_events = second.stop()
        upstream.stop()
    assert first_id != second_id  # two real upstream answers
    assert len(wire.requests) == 2
    files = sorted(p for p in files_under(recordings) if p.suffix == ".json")
    assert len(files) == 2, files
    documents = {path.name: orjson.loads(path.read_bytes()) for path in files}
    by_sequence = {doc["request"].get("sequence", 1): doc for doc in documents.values()}
    assert set(by_sequence) == {1, 2}
    assert by_sequence[1]["response"]["headers"]["x-request-id"] == first_id
    assert by_sequence[2]["response"]["headers"]["x-request-id"] == second_id
    # Names follow the sequence: <...>-<key16>.json and <...>-<key16>-2.json.
    stems = sorted(name.rsplit(".", 1)[0] for name in documents)
    assert stems[1] == stems[0] + "-2"
    recorded_by_second = [e for e in second_events if e["event"] == "recorded"]
    assert len(recorded_by_second) == 1 and recorded_by_second[0]["file"].endswith("-2.json")
    assert [e for e in first_events if e["event"] == "recorded"][0]["file"].endswith(stems[0] + ".json")
    for events in (first_events, second_events):
        assert not any(e.get("level") == "error" or "exception" in e for e in events)
    # Replay serves the two answers in the order they were recorded.
    proxy = start_proxy(loop_thread, "replay", recordings, after_last="error")
    try:
        assert [_ask(proxy.url), _ask(proxy.url)] == [first_id, second_id]
    finally:
        proxy.stop()


def test_create_only_write_never_replaces_an_existing_file(tmp_path: Path) -> None:
    store = RecordingStore(tmp_path)
    relative = Path("openai") / "chat-completions-gpt-4o-0123456789abcdef.json"
    store.write(relative, {"request": {"n": 1}, "response": {}})
    try:
        store.write(relative, {"request": {"n": 2}, "response": {}})
    except FileExistsError:
        pass
    else:
        raise AssertionError("a second write to the same name must not replace the first")
    assert orjson.loads((tmp_path / relative).read_bytes())["request"] == {"n": 1}
    assert [p.name for p in (tmp_path / "openai").iterdir()] == [relative.name]  # no temp file left
    assert store.highest_sequence("openai", "0123456789abcdef" + "0" * 48) == 1
