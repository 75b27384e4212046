"""Loading a recordings directory: bad files are reported once with their path and skipped;
every other recording keeps being served."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import aiohttp
import openai
import structlog

from tests.support import SEED, LoopThread, start_proxy
from tests.test_seed_and_cli import SEED_MESSAGES

BAD_FILES = {
    "corrupt.json": b'{"request": {"method": "POST", ',
    "empty.json": b"",
    "array.json": b"[1, 2, 3]",
    "tool-call.json": json.dumps({"tool_name": "web_search", "kwargs": {"q": "x"}, "result": "..."}).encode(),
    "no-response.json": json.dumps(
        {"request": {"method": "POST", "url": "http://x/v1/chat/completions", "body": {}}}
    ).encode(),
    "wrong-types.json": json.dumps({"request": {"method": 7, "url": []}, "response": {"body": {}}}).encode(),
    "bad-status.json": json.dumps(
        {
            "request": {"method": "GET", "url": "http://x/v1/models", "endpoint": "/v1/models"},
            "response": {"status": "teapot", "body": {}},
            "provenance": {"tool": "llmproxy"},
        }
    ).encode(),
    "deep.json": b"[" * 5000 + b"]" * 5000,
    "huge-number.json": b'{"request": {"method": "POST", "url": "http://x/v1/chat/completions", "body": {"n": 1e999}}, '
    b'"response": {"body": {}}}',
    "not-text.bin": bytes(range(256)),
    "stream-not-a-list.json": json.dumps(
        {
            "request": {
                "method": "POST",
                "url": "http://x/v1/chat/completions",
                "endpoint": "/v1/chat/completions",
                "body": {"model": "m"},
            },
            "response": {"body": {"__type__": "x", "__data__": 1}, "is_streaming": True},
        }
    ).encode(),
}


def test_bad_files_are_reported_and_skipped_while_the_rest_is_served(loop_thread: LoopThread, tmp_path: Path) -> None:
    shutil.copy(SEED, tmp_path / SEED.name)
    for name, data in BAD_FILES.items():
        (tmp_path / name).write_bytes(data)
    # A recording whose __type__ names a module: a label only, nothing is imported.
    hostile = json.loads(SEED.read_text())
    hostile["request"]["body"]["messages"][-1]["content"] = "hostile"
    for chunk in hostile["response"]["body"]:
        chunk["__type__"] = "os.system"
    (tmp_path / "hostile-type.json").write_text(json.dumps(hostile))
    # Temp files of an interrupted write are not recordings.
    (tmp_path / ".000.json.abc.tmp").write_text("{")
    with structlog.testing.capture_logs() as logs:
        proxy = start_proxy(loop_thread, "replay", tmp_path)
    try:
        problems = {p.path.name: p.reason for p in proxy.server.mode.index.problems}
        assert set(problems) == set(BAD_FILES)
        assert "not valid JSON" in problems["corrupt.json"]
        assert "empty" in problems["empty.json"]
        assert "no 'request'" in problems["tool-call.json"]
        assert "status" in problems["bad-status.json"]
        warned = [entry for entry in logs if entry["event"] == "recording skipped"]
        assert sorted(Path(entry["path"]).name for entry in warned) == sorted(BAD_FILES)
        client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="k", max_retries=0)
        stream = client.chat.completions.create(
            model="gpt-4o", messages=SEED_MESSAGES, response_format={"type": "text"}, stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in stream) == "HUMANS LIVE ON EARTH."
        hostile_messages = [*SEED_MESSAGES[:-1], {"role": "user", "content": "hostile"}]
        stream = client.chat.completions.create(
            model="gpt-4o", messages=hostile_messages, response_format={"type": "text"}, stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in stream) == "HUMANS LIVE ON EARTH."
    finally:
        proxy.stop()


def test_unknown_path_and_oversized_body_get_clear_errors(loop_thread: LoopThread, tmp_path: Path) -> None:
    proxy = start_proxy(loop_thread, "replay", tmp_path, max_body_mb=0.001)

    async def go() -> list[tuple[int, dict]]:
        async with aiohttp.ClientSession() as session:
            results = []
            async with session.post(
                proxy.url + "/v1/chat/completions", data=b"x" * 5000, headers={"Content-Type": "application/json"}
            ) as response:
                results.append((response.status, await response.json()))
            async with session.post(proxy.url + "/v1/chat/completions", data=b"\xff\xfe not json") as response:
                results.append((response.status, await response.json()))
            return results

    try:
        (too_big, too_big_body), (garbage, garbage_body) = loop_thread.run(go())
    finally:
        proxy.stop()
    assert too_big == 413 and too_big_body["error"]["code"] == "body_too_large"
    assert garbage == 404 and garbage_body["error"]["code"] == "recording_not_found"
