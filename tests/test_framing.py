"""Whatever framing an upstream uses, replay gives back the same bytes.

Each case is a raw body the upstream sends; it is recorded through the proxy and replayed."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.providers_support import write_config
from tests.support import LoopThread, RunningApp, files_under, start_proxy

CASES = {
    "openai_plain": (
        "openai",
        "text/event-stream; charset=utf-8",
        b'data: {"a":1}\n\ndata: {"a":2}\n\ndata: [DONE]\n\n',
    ),
    "keepalive_comments": (
        "openai",
        "text/event-stream",
        b': keep-alive\n\ndata: {"a":1}\n\n: ping\n\ndata: {"a":2}\n\ndata: [DONE]\n\n',
    ),
    "crlf_and_no_done": ("openai", "text/event-stream", b'data: {"a":1}\r\n\r\ndata: {"a":2}\r\n\r\n'),
    "spaces_in_json": ("gemini", "text/event-stream", b'data: {"a": 1, "b": [1, 2]}\r\n\r\n'),
    "event_names_differ_from_type": (
        "anthropic",
        "text/event-stream; charset=utf-8",
        b'event: custom\ndata: {"type":"message_start"}\n\nevent: message_stop\ndata: {"type":"message_stop"}\n\n',
    ),
    "multiline_data_and_id": (
        "openai",
        "text/event-stream",
        b'id: 7\ndata: {"a":\ndata: 1}\n\nretry: 100\ndata: {"b":2}\n\n',
    ),
    "non_json_data": ("openai", "text/event-stream", b'data: hello\n\ndata: {"a":1}\n\ndata: [DONE]\n\n'),
    "stream_cut_short": ("openai", "text/event-stream", b'data: {"a":1}\n\ndata: {"a":2'),
    "ndjson_blank_line": ("ollama", "application/x-ndjson", b'{"a":1}\n\n{"done":true}\n'),
    "ndjson_crlf": ("ollama", "application/x-ndjson", b'{"a":1}\r\n{"done":true}\r\n'),
    "ndjson_no_final_newline": ("ollama", "application/x-ndjson", b'{"a":1}\n{"done":true}'),
    "json_body": ("openai", "application/json", b'{"id": "x", "object": "chat.completion", "n": 1.5e-7}'),
    "html_error_page": ("openai", "text/html", b"<html><body>Bad gateway</body></html>"),
    "not_utf8_stream": ("openai", "text/event-stream", b"data: \xff\xfe\n\n"),
    "empty_body": ("openai", "application/json", b""),
    "big_integer": ("openai", "text/event-stream", b'data: {"n":123456789012345678901234567890}\n\n'),
}
# Streams that end without their provider's end marker: recorded only with record_errors, and
# then marked truncated.
TRUNCATED = {
    "crlf_and_no_done",
    "spaces_in_json",
    "multiline_data_and_id",
    "stream_cut_short",
    "ndjson_no_final_newline",
    "big_integer",
}
PATHS = {
    "openai": "/v1/chat/completions",
    "anthropic": "/v1/messages",
    "ollama": "/api/chat",
    "gemini": "/v1beta/models/m:streamGenerateContent?alt=sse",
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_recorded_framing_replays_exactly(loop_thread: LoopThread, tmp_path: Path, case: str) -> None:
    provider, content_type, raw = CASES[case]

    async def serve(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": content_type})
        await response.prepare(request)
        for start in range(0, len(raw), 7):  # odd network chunk boundaries
            await response.write(raw[start : start + 7])
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", serve)
    upstream = RunningApp(loop_thread, app).start()
    config = write_config(
        tmp_path / "llmproxy.toml", [{"name": provider, "provider": provider, "upstream": upstream.url}]
    )
    recordings = tmp_path / "recordings"
    body = {"model": "m", "stream": True, "messages": []}

    async def fetch(base: str) -> tuple[int, str, bytes]:
        async with aiohttp.ClientSession() as session:
            async with session.post(base + PATHS[provider], json=body) as response:
                return response.status, response.headers.get("Content-Type", ""), await response.read()

    proxy = start_proxy(loop_thread, "record", recordings, config=config, record_errors=True)
    try:
        through_record = loop_thread.run(fetch(proxy.url))
    finally:
        proxy.stop()
        upstream.stop()
    assert through_record == (200, content_type, raw)
    [path] = files_under(recordings)
    assert json.loads(path.read_text())["response"].get("truncated", False) == (case in TRUNCATED)
    replay = start_proxy(loop_thread, "replay", recordings, config=config)
    try:
        status, replay_type, replayed = loop_thread.run(fetch(replay.url))
    finally:
        replay.stop()
    assert status == 200 and replay_type == content_type
    assert replayed == raw  # JSON spelling included (spaces_in_json, json_body)
