"""Hostile and odd files in a recordings directory: the loader reads only regular files inside
it, bounded in size and depth, and indexes a file only if it can be served. Everything else is
reported once at load and skipped, so a good recording of the same request is served; `check`
reports the same problems and never crashes; realtime pacing is clamped; a miss's nearest-
recording search is bounded."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from llmproxy.store.directory import MAX_DOCUMENT_DEPTH
from llmproxy.store.index import NEAREST_CANDIDATES
from tests.support import CliProxy, LoopThread, start_proxy

MESSAGES = [{"role": "user", "content": "hostile files"}]
GOOD_CONTENT = "the good answer"


def _document(content: str = GOOD_CONTENT, messages: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "request": {
            "method": "POST",
            "url": "https://api.openai.com/v1/chat/completions",
            "headers": {},
            "body": {"model": "gpt-4o", "messages": messages or MESSAGES},
            "endpoint": "/v1/chat/completions",
            "model": "gpt-4o",
            "route": "openai",
        },
        "response": {
            "status": 200,
            "headers": {"content-type": "application/json"},
            "body": {
                "__type__": "openai.types.chat.chat_completion.ChatCompletion",
                "__data__": {
                    "id": "chatcmpl-1",
                    "object": "chat.completion",
                    "created": 1,
                    "model": "gpt-4o",
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": content},
                            "finish_reason": "stop",
                        }
                    ],
                },
            },
            "is_streaming": False,
            "framing": {"format": "json"},
        },
        "provenance": {"tool": "llmproxy", "version": "0"},
    }


def _streaming_document() -> dict[str, Any]:
    document = _document()
    document["request"]["body"]["stream"] = True
    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o", "choices": []}
    document["response"].update(
        body=[{"__type__": "openai.types.chat.chat_completion_chunk.ChatCompletionChunk", "__data__": chunk}],
        is_streaming=True,
        framing={"format": "sse", "line_ending": "\n", "event_field": None, "end": "data: [DONE]\n\n"},
        timing={"headers_ms": 1e308, "chunk_ms": [1e300]},
    )
    document["response"]["headers"] = {"content-type": "text/event-stream; charset=utf-8"}
    return document


def _variant(change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    document = _document(content="a broken answer")
    change(document)
    return document


def _nested(depth: int) -> Any:
    value: Any = 1.5
    for _ in range(depth):
        value = [value]
    return value


# Each loads as JSON and as a recording of the very request the good file answers, then fails to
# serve (today: it takes the key, and every request gets a bare 500 or an empty reply).
UNSERVABLE: dict[str, dict[str, Any]] = {
    "header-crlf": _variant(lambda d: d["response"]["headers"].update({"x-request-id": "a\r\nSet-Cookie: x=1"})),
    "header-bad-name": _variant(lambda d: d["response"]["headers"].update({"bad name:": "v"})),
    "header-not-latin1": _variant(lambda d: d["response"]["headers"].update({"x-note": "\u20ac"})),
    "status-101": _variant(lambda d: d["response"].update(status=101)),
    "framing-stream-not-list": _variant(lambda d: d["response"].update(framing={"format": "sse"})),
    "framing-unknown": _variant(lambda d: d["response"].update(framing={"format": "carrier-pigeon"})),
    "framing-inserts-wrong-type": _variant(
        lambda d: d["response"].update(body=[], framing={"format": "sse", "inserts": [1, 2]})
    ),
    "framing-binary-not-base64": _variant(
        lambda d: d["response"].update(
            body={"__type__": "llmproxy.bytes", "__data__": "%%%"}, framing={"format": "binary"}
        )
    ),
    "timing-not-a-number": _variant(lambda d: d["response"].update(timing={"headers_ms": "soon", "chunk_ms": []})),
    "timing-chunk-nan-like": _variant(lambda d: d["response"].update(timing={"headers_ms": 1, "chunk_ms": [None]})),
    "timing-negative": _variant(lambda d: d["response"].update(timing={"headers_ms": -5, "chunk_ms": []})),
}


def _write(path: Path, document: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document))


def _skipped(events: list[dict[str, Any]]) -> dict[str, str]:
    return {Path(e["path"]).name: e["reason"] for e in events if e["event"] == "recording skipped"}


def _ask(url: str, messages: list[dict[str, Any]] | None = None) -> str:
    client = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0)
    reply = client.chat.completions.create(model="gpt-4o", messages=messages or MESSAGES)  # type: ignore[arg-type]
    return reply.choices[0].message.content or ""


def _quiet(events: list[dict[str, Any]]) -> None:
    assert not [e for e in events if e.get("level") == "error" or "exception" in e]


def test_files_that_load_but_cannot_be_served_are_skipped_so_the_good_one_is_served(tmp_path: Path) -> None:
    # Sorted before the good file: today the first of them takes the key.
    for name, document in UNSERVABLE.items():
        _write(tmp_path / "openai" / f"a-{name}.json", document)
    _write(tmp_path / "openai" / "z-good.json", _document())
    proxy = CliProxy("replay", "--recordings", str(tmp_path), "--port", "0")
    try:
        assert _ask(proxy.url) == GOOD_CONTENT
        assert _ask(proxy.url) == GOOD_CONTENT  # repeats: the good one again, never a broken one
    finally:
        events = proxy.stop()
    skipped = _skipped(events)
    assert set(skipped) == {f"a-{name}.json" for name in UNSERVABLE}, skipped
    assert "CR/LF" in skipped["a-header-crlf.json"] and "101" in skipped["a-status-101.json"]
    assert "timing.headers_ms" in skipped["a-timing-not-a-number.json"]
    loaded = [e for e in events if e["event"] == "recordings loaded"]
    assert loaded and loaded[0]["recordings"] == 1 and loaded[0]["skipped"] == len(UNSERVABLE)
    _quiet(events)
    # `check` reports the same files, one line each, and exits 1 without a traceback.
    checked = subprocess.run([sys.executable, "-m", "llmproxy", "check", str(tmp_path)], capture_output=True, text=True)
    assert checked.returncode == 1 and "Traceback" not in checked.stderr
    invalid = {Path(line.split(":")[0]).name for line in checked.stdout.splitlines() if ": invalid: " in line}
    assert invalid == set(skipped)


def test_fifo_device_symlinks_and_huge_files_never_block_or_flood_the_loader(tmp_path: Path) -> None:
    recordings = tmp_path / "rec"
    (recordings / "openai").mkdir(parents=True)
    os.mkfifo(recordings / "openai" / "a-fifo.json")  # nobody ever writes it: reading would block forever
    (recordings / "openai" / "b-zero.json").symlink_to("/dev/zero")
    outside = tmp_path / "outside.json"
    _write(outside, _document(content="from outside"))
    (recordings / "openai" / "c-outside.json").symlink_to(outside)
    with open(recordings / "openai" / "d-sparse.json", "wb") as handle:
        handle.truncate(2 * 1024 * 1024 * 1024)  # 2 GB, sparse: costs no disk
    _write(recordings / "openai" / "e-big.json", _document(content="x" * 2 * 1024 * 1024))
    _write(recordings / "openai" / "z-good.json", _document())
    (recordings / "openai" / "y-link-inside.json").symlink_to(recordings / "openai" / "z-good.json")
    config = tmp_path / "llmproxy.toml"
    config.write_text("[proxy]\nmax_file_mb = 1\n")
    proxy = CliProxy("replay", "--recordings", str(recordings), "--port", "0", "--config", str(config))
    try:
        assert _ask(proxy.url) == GOOD_CONTENT  # served: the loader went past the FIFO
    finally:
        events = proxy.stop()  # and SIGTERM completes
    assert proxy.process.returncode is not None
    skipped = _skipped(events)
    assert "not a regular file" in skipped["a-fifo.json"]
    assert "outside the recordings directory" in skipped["b-zero.json"]
    assert "outside the recordings directory" in skipped["c-outside.json"]
    assert "byte limit" in skipped["d-sparse.json"] and "byte limit" in skipped["e-big.json"]
    assert "y-link-inside.json" not in skipped and "z-good.json" not in skipped
    _quiet(events)
    checked = subprocess.run(
        [sys.executable, "-m", "llmproxy", "check", str(recordings), "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert checked.returncode == 1 and "Traceback" not in checked.stderr
    assert "a-fifo.json: invalid: not a regular file" in checked.stdout


def test_deep_nesting_is_reported_and_round_floats_never_kills_the_loader(tmp_path: Path) -> None:
    recordings = tmp_path / "rec"
    deep = _document(messages=[{"role": "user", "content": "deep", "extra": _nested(900)}])
    _write(recordings / "openai" / "a-deep-900.json", deep)
    just_past = _document(messages=[{"role": "user", "content": "d", "extra": _nested(MAX_DOCUMENT_DEPTH)}])
    _write(recordings / "openai" / "b-just-past-the-limit.json", just_past)
    _write(recordings / "openai" / "z-good.json", _document())
    config = tmp_path / "llmproxy.toml"
    config.write_text(
        '[[routes]]\nname = "openai"\nprovider = "openai"\nupstream = "http://127.0.0.1:9"\nround_floats = 2\n'
    )
    proxy = CliProxy("replay", "--recordings", str(recordings), "--port", "0", "--config", str(config))
    try:
        assert _ask(proxy.url) == GOOD_CONTENT  # loaded after the deep files: the loader lived on
    finally:
        events = proxy.stop()
    skipped = _skipped(events)
    assert set(skipped) == {"a-deep-900.json", "b-just-past-the-limit.json"}
    assert all(f"more than {MAX_DOCUMENT_DEPTH} levels" in reason for reason in skipped.values())
    _quiet(events)
    checked = subprocess.run(
        [sys.executable, "-m", "llmproxy", "check", str(recordings), "--config", str(config)],
        capture_output=True,
        text=True,
    )
    assert checked.returncode == 1 and "Traceback" not in checked.stderr
    assert checked.stdout.count(": invalid: ") == 2


def test_realtime_pacing_with_huge_recorded_delays_is_clamped(loop_thread: LoopThread, tmp_path: Path) -> None:
    _write(tmp_path / "openai" / "stream.json", _streaming_document())
    config = tmp_path / "llmproxy.toml"
    config.write_text("[proxy]\nmax_pause = 0.01\n")
    proxy = start_proxy(loop_thread, "replay", tmp_path, config, timing="realtime")

    async def stream() -> tuple[int, bytes]:
        body = {"model": "gpt-4o", "messages": MESSAGES, "stream": True}
        timeout = aiohttp.ClientTimeout(total=60)  # 1e308 ms unclamped would never end
        async with aiohttp.ClientSession(timeout=timeout) as session:
            async with session.post(proxy.url + "/v1/chat/completions", json=body) as response:
                return response.status, await response.read()

    try:
        status, body = loop_thread.run(stream(), timeout=90)
    finally:
        proxy.stop()
    assert status == 200 and body.endswith(b"data: [DONE]\n\n")


def test_replay_miss_compares_a_bounded_number_of_candidates_off_the_loop(
    loop_thread: LoopThread, tmp_path: Path
) -> None:
    """20,000 recordings and a 1 MB miss: the nearest search compares at most NEAREST_CANDIDATES
    (same endpoint and model first) and runs in a worker thread while hits keep being served."""
    proxy = start_proxy(loop_thread, "replay", tmp_path)
    index = proxy.server.mode.index  # type: ignore[attr-defined]
    base = _document()
    for number in range(20_000):
        document = copy.deepcopy(base)
        model = "gpt-4o" if number % 2 else "gpt-4o-mini"
        document["request"]["body"] = {"model": model, "messages": [{"role": "user", "content": f"q{number}"}]}
        document["request"]["model"] = model
        index.load_document(document)
    threads: list[str] = []
    original = index.nearest

    def watched(*args: Any) -> Any:
        threads.append(threading.current_thread().name)
        return original(*args)

    index.nearest = watched

    async def go() -> tuple[tuple[int, str], list[int]]:
        async with aiohttp.ClientSession() as session:

            async def miss() -> tuple[int, str]:
                content = "q17 " + "y" * 1024 * 1024
                body = {"model": "gpt-4o", "messages": [{"role": "user", "content": content}]}
                async with session.post(proxy.url + "/v1/chat/completions", json=body) as response:
                    return response.status, (await response.json())["error"]["message"]

            async def hit(number: int) -> int:
                body = {"model": "gpt-4o", "messages": [{"role": "user", "content": f"q{number}"}]}
                async with session.post(proxy.url + "/v1/chat/completions", json=body) as response:
                    await response.read()
                    return response.status

            results = await asyncio.gather(miss(), *(hit(n) for n in range(1, 40, 2)))
            return results[0], list(results[1:])  # type: ignore[return-value]

    try:
        (status, message), hits = loop_thread.run(go(), timeout=120)
    finally:
        proxy.stop()
    assert status == 404 and "no recording" in message
    assert hits == [200] * 20
    assert index.compared <= NEAREST_CANDIDATES
    assert threads and all(name.startswith("asyncio") for name in threads)  # the loop's default executor


@pytest.mark.parametrize("depth", [256, 300])
def test_check_never_crashes_on_a_file_nested_past_255_levels(tmp_path: Path, depth: int) -> None:
    _write(
        tmp_path / "openai" / "deep.json", _document(messages=[{"role": "user", "content": "x", "n": _nested(depth)}])
    )
    checked = subprocess.run([sys.executable, "-m", "llmproxy", "check", str(tmp_path)], capture_output=True, text=True)
    assert checked.returncode == 1 and "Traceback" not in checked.stderr
    assert f"more than {MAX_DOCUMENT_DEPTH} levels" in checked.stdout
