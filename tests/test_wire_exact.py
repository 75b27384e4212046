"""Replay sends the bytes the upstream sent, JSON spelling included, for every body kind.

Each case: a local upstream sends exact bytes; they are recorded through the real proxy; the
upstream is stopped; replay must give back the same bytes, while the file keeps parsed JSON."""

from __future__ import annotations

import asyncio
import json
import struct
import zlib
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from botocore.eventstream import EventStreamBuffer

from tests.providers_support import write_config
from tests.support import LoopThread, RunningApp, files_under, start_proxy


def py(value: Any, **options: Any) -> str:
    """JSON as a Python server writes it (json.dumps defaults unless told otherwise)."""
    return json.dumps(value, **options)


COMPLETION = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Caf\u00e9 \u2615"}, "logprobs": None}],
    "usage": {"prompt_tokens": 9, "completion_tokens": 3},
}
EXPONENTS = {"id": "e", "scores": [5.978460467304103e-05, 1e-05, 1.5e-07, 2.5e16, 1e22, -0.0, 123.0]}
BIG = '{"id": 123456789012345678901234567890, "seed": 18446744073709551617, "n": -99999999999999999999}'


def sse(values: list[Any], **options: Any) -> bytes:
    return "".join(f"data: {py(value, **options)}\n\n" for value in values).encode() + b"data: [DONE]\n\n"


def frame(event_type: str, payload: bytes) -> bytes:
    """One event-stream frame built by hand (independent of llmproxy's encoder)."""

    def header(name: str, value: str) -> bytes:
        n, v = name.encode(), value.encode()
        return bytes([len(n)]) + n + b"\x07" + struct.pack("!H", len(v)) + v

    headers = header(":event-type", event_type) + header(":content-type", "application/json")
    headers += header(":message-type", "event")
    prelude = struct.pack("!II", 16 + len(headers) + len(payload), len(headers))
    message = prelude + struct.pack("!I", zlib.crc32(prelude)) + headers + payload
    return message + struct.pack("!I", zlib.crc32(message))


EVENTSTREAM = b"".join(
    [
        frame("messageStart", b'{"role":"assistant"}'),
        frame("contentBlockDelta", b'{"contentBlockIndex":0,"delta":{"text":"Hi \xc3\xa9"},"p":"abcdefgh"}'),
        frame("contentBlockStop", b'{"contentBlockIndex":0}'),
        frame("messageStop", b'{"stopReason":"end_turn"}'),
        frame("metadata", b'{"usage":{"inputTokens":9},"metrics":{"latencyMs":412},"score":5.978460467304103e-05}'),
    ]
)

# case -> (route provider, path, content type, exact upstream bytes, expected framing.json_style)
CASES: dict[str, tuple[str, str, str, bytes, str | None]] = {
    "json_python_spacing": ("openai", "/v1/chat/completions", "application/json", py(COMPLETION).encode(), "python"),
    "json_python_unicode": (
        "openai",
        "/v1/chat/completions",
        "application/json",
        py(COMPLETION, ensure_ascii=False).encode(),
        "python-unicode",
    ),
    "json_exponent_floats": (
        "openai",
        "/v1/chat/completions",
        "application/json",
        py(EXPONENTS, separators=(",", ":")).encode(),
        "python-compact",
    ),
    "json_big_integers": ("openai", "/v1/chat/completions", "application/json", BIG.encode(), None),
    "json_pretty_with_newline": (
        "openai",
        "/v1/chat/completions",
        "application/json",
        (py(COMPLETION, indent=2, ensure_ascii=False) + "\n").encode(),  # as OpenAI pretty-prints
        "indent-2-unicode",
    ),
    "json_unreproducible_spacing": (
        "openai",
        "/v1/chat/completions",
        "application/json",
        b'{ "id" : "x",\t"n" : 1.5e-7 }',
        None,
    ),
    "sse_python_spacing": (
        "openai",
        "/v1/chat/completions",
        "text/event-stream",
        # The first events are plain ASCII integers (every style fits); the floats decide.
        sse([{"i": 0}, {"i": 1, "t": "\u00e9"}, EXPONENTS, {"n": 12345678901234567890123}]),
        "python",
    ),
    "sse_gemini_crlf": (
        "gemini",
        "/v1beta/models/m:streamGenerateContent?alt=sse",
        "text/event-stream",
        b"".join(
            f"data: {py(value, separators=(',', ': '), ensure_ascii=False)}\r\n\r\n".encode()
            for value in [
                {"candidates": [{"content": {"parts": [{"text": "H\u00e9"}], "role": "model"}, "index": 0}]},
                {"candidates": [{"finishReason": "STOP", "avgLogprobs": -0.000123}], "modelVersion": "g"},
            ]
        ),
        "key-spaced",
    ),
    "ndjson_python_spacing": (
        "ollama",
        "/api/chat",
        "application/x-ndjson",
        b"".join(
            (py(value) + "\n").encode()
            for value in [{"model": "m", "message": {"content": "Caf\u00e9"}, "done": False}, EXPONENTS, {"done": True}]
        ),
        "python",
    ),
    "eventstream_binary": (
        "gemini",
        "/bedrock/model/m/converse-stream",
        "application/vnd.amazon.eventstream",
        EVENTSTREAM,
        "python-compact-unicode",  # floats as Python writes them, UTF-8 as is
    ),
}


def files_json(recordings: Path) -> dict[str, Any]:
    [path] = files_under(recordings)
    return json.loads(path.read_text())


@pytest.mark.parametrize("case", sorted(CASES))
def test_replayed_bytes_equal_the_upstream_bytes(loop_thread: LoopThread, tmp_path: Path, case: str) -> None:
    provider, path, content_type, raw, style = CASES[case]

    async def serve(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": content_type})
        await response.prepare(request)
        for start in range(0, len(raw), 5):  # reads that cut events and frames anywhere
            await response.write(raw[start : start + 5])
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", serve)
    upstream = RunningApp(loop_thread, app).start()
    route: dict[str, Any] = {"name": provider, "provider": provider, "upstream": upstream.url}
    if path.startswith("/bedrock/"):
        route["prefix"] = "/bedrock"  # no Bedrock provider on this branch: a prefixed route carries it
    config = write_config(tmp_path / "llmproxy.toml", [route])
    recordings = tmp_path / "recordings"
    body = {"model": "m", "messages": [], "stream": content_type != "application/json"}

    async def fetch(base: str) -> bytes:
        async with aiohttp.ClientSession(auto_decompress=False) as session:
            async with session.post(base + path, json=body) as response:
                assert response.status == 200
                assert response.headers["Content-Type"] == content_type
                return await response.read()

    proxy = start_proxy(loop_thread, "record", recordings, config=config)
    try:
        assert loop_thread.run(fetch(proxy.url)) == raw
    finally:
        proxy.stop()
        upstream.stop()
    document = files_json(recordings)
    response = document["response"]
    assert "truncated" not in response
    assert response["framing"].get("json_style") == style
    replay = start_proxy(loop_thread, "replay", recordings, config=config)
    try:
        assert loop_thread.run(fetch(replay.url)) == raw
    finally:
        replay.stop()

    # The file stays readable: parsed JSON in __data__, the upstream's text only where needed.
    chunks = response["body"] if isinstance(response["body"], list) else [response["body"]]
    assert all(isinstance(chunk["__data__"], (dict, list)) for chunk in chunks)
    verbatim = set(response["framing"].get("verbatim", {}))
    if case.startswith("json_"):
        assert verbatim == ({"0"} if style is None else set())
        assert response["framing"].get("end") == ("\n" if case == "json_pretty_with_newline" else None)
    elif case == "sse_python_spacing":
        assert verbatim == {"3"}  # the integer past 64 bits, which orjson would read as a float
        assert chunks[1]["__data__"] == {"i": 1, "t": "\u00e9"}
    else:
        assert verbatim == set()
    if case == "eventstream_binary":
        assert [chunk["__headers__"][":event-type"] for chunk in chunks] == [
            "messageStart",
            "contentBlockDelta",
            "contentBlockStop",
            "messageStop",
            "metadata",
        ]
        assert chunks[1]["__data__"]["delta"] == {"text": "Hi \u00e9"}


def test_event_streams_pass_through_as_they_arrive(loop_thread: LoopThread, tmp_path: Path) -> None:
    """The first frame reaches the client while the upstream still holds the rest back."""
    frames = [frame("messageStart", b'{"role":"assistant"}'), frame("messageStop", b'{"stopReason":"end_turn"}')]
    first_seen = asyncio.Event()

    async def serve(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "application/vnd.amazon.eventstream"})
        await response.prepare(request)
        await response.write(frames[0][:7])  # a frame split across reads
        await response.write(frames[0][7:])
        await first_seen.wait()  # the rest only once the client has the first frame
        await response.write(frames[1])
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", serve)
    upstream = RunningApp(loop_thread, app).start()
    config = write_config(
        tmp_path / "llmproxy.toml",
        [{"name": "aws", "provider": "gemini", "upstream": upstream.url, "prefix": "/bedrock"}],
    )
    recordings = tmp_path / "recordings"

    async def fetch(base: str) -> bytes:
        async with aiohttp.ClientSession() as session:
            async with session.post(base + "/bedrock/model/m/converse-stream", json={"messages": []}) as response:
                head = await response.content.readexactly(len(frames[0]))
                first_seen.set()
                return head + await response.read()

    proxy = start_proxy(loop_thread, "record", recordings, config=config)
    try:
        received = loop_thread.run(fetch(proxy.url), timeout=10)
    finally:
        proxy.stop()
        upstream.stop()
    assert received == b"".join(frames)
    buffer = EventStreamBuffer()
    buffer.add_data(received)
    assert [orjson.loads(message.payload) for message in buffer] == [
        {"role": "assistant"},
        {"stopReason": "end_turn"},
    ]
    body = files_json(recordings)["response"]["body"]
    assert [chunk["__data__"] for chunk in body] == [{"role": "assistant"}, {"stopReason": "end_turn"}]
