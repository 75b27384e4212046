"""The request pipeline in record mode: every exchange is recorded or loudly not, clients that
leave early, bounded memory, locks released, and record --missing counting for prune."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import orjson
import structlog
from aiohttp import web

from llmproxy.config import load_settings
from llmproxy.store.directory import RecordingStore
from llmproxy.store.index import RecordingIndex
from llmproxy.upstream.singleflight import InFlight, Lock
from tests.providers_support import normalise_json_whitespace, write_config
from tests.support import REPO, CliProxy, LoopThread, RunningApp, files_under, sse_data, start_proxy, wait_until
from tests.upstreams.openai_wire import OpenAIWire


def _anthropic_event(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


ANTHROPIC_BEFORE_STOP = [
    _anthropic_event(
        "message_start",
        {
            "type": "message_start",
            "message": {
                "id": "msg_01Leave",
                "type": "message",
                "role": "assistant",
                "model": "claude-test",
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {"input_tokens": 5, "output_tokens": 1},
            },
        },
    ),
    _anthropic_event(
        "content_block_start",
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    ),
    _anthropic_event(
        "content_block_delta",
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hello"}},
    ),
    _anthropic_event("content_block_stop", {"type": "content_block_stop", "index": 0}),
    _anthropic_event(
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": None},
            "usage": {"output_tokens": 2},
        },
    ),
]
ANTHROPIC_END = [_anthropic_event("message_stop", {"type": "message_stop"})]

OPENAI_CHUNK = {
    "id": "chatcmpl-leave",
    "object": "chat.completion.chunk",
    "created": 1,
    "model": "gpt-4o-2024-08-06",
}
OPENAI_BEFORE_DONE = [
    b"data: "
    + orjson.dumps({**OPENAI_CHUNK, "choices": [{"index": 0, "delta": {"content": "Hello"}, "finish_reason": None}]})
    + b"\n\n",
    b"data: "
    + orjson.dumps({**OPENAI_CHUNK, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    + b"\n\n",
]
OPENAI_END = [b"data: [DONE]\n\n"]


class HeldStream:
    """Sends `before`, waits for `release` (set by the test once the client is gone), sends `end`."""

    def __init__(self, path: str, before: list[bytes], end: list[bytes]) -> None:
        self.path, self.before, self.end = path, before, end
        self.release = asyncio.Event()
        self.requests = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post(self.path, self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        self.requests += 1
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await response.prepare(request)
        for piece in self.before:
            await response.write(piece)
        await self.release.wait()
        for piece in self.end:
            await response.write(piece)
        await response.write_eof()
        return response


def _leave_after(
    loop_thread: LoopThread, url: str, body: dict[str, Any], marker: bytes, headers: dict[str, str]
) -> bytes:
    """Read the stream until `marker` is in, then close the connection, as litellm and SDKs do."""

    async def go() -> bytes:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
            response = await session.post(url, json=body, headers=headers)
            received = b""
            while marker not in received:
                data = await response.content.readany()
                assert data, "stream ended before the marker"
                received += data
            response.close()
            return received

    return loop_thread.run(go())


def _record_with_early_leaver(
    loop_thread: LoopThread, tmp_path: Path, upstream: HeldStream, provider: str, url_path: str, body: dict[str, Any]
) -> tuple[Path, bytes]:
    app = RunningApp(loop_thread, upstream.app(), handler_cancellation=True).start()
    config = write_config(tmp_path / "llmproxy.toml", [{"name": provider, "provider": provider, "upstream": app.url}])
    recordings = tmp_path / "recordings"
    proxy = start_proxy(loop_thread, "record", recordings, config)
    marker = upstream.before[-1]
    try:
        with structlog.testing.capture_logs() as logs:
            # Each provider's own identity header: an anthropic-version on OpenAI's route is refused.
            headers = {"anthropic-version": "2023-06-01"} if provider == "anthropic" else {}
            received = _leave_after(loop_thread, proxy.url + url_path, body, marker, headers)
            # The proxy has seen its client go, and the upstream has not finished yet.
            wait_until(lambda: proxy.server.pipeline.serving == 0, "the proxy to notice the client left")
            assert upstream.requests == 1 and not files_under(recordings)
            loop_thread.loop.call_soon_threadsafe(upstream.release.set)
            wait_until(lambda: bool(files_under(recordings)), "the recording")
    finally:
        proxy.stop()
        app.stop()
    assert received.endswith(marker)
    assert any(e["event"] == "client went away before the end" and e["read_on"] for e in logs)
    outcome = proxy.server.pipeline.outcome
    assert outcome.not_recorded == 0 and outcome.errors == 0
    [path] = files_under(recordings)
    document = json.loads(path.read_text())
    assert "truncated" not in document["response"]
    return config, b"".join(upstream.before + upstream.end)


def test_client_closing_right_after_anthropic_message_delta_is_recorded_whole_and_replays(
    loop_thread: LoopThread, tmp_path: Path
) -> None:
    upstream = HeldStream("/v1/messages", ANTHROPIC_BEFORE_STOP, ANTHROPIC_END)
    body = {"model": "claude-test", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    config, sent = _record_with_early_leaver(loop_thread, tmp_path, upstream, "anthropic", "/v1/messages", body)
    replay = start_proxy(loop_thread, "replay", tmp_path / "recordings", config)
    try:
        client = anthropic.Anthropic(base_url=replay.url, api_key="sk-ant-replay", max_retries=0)
        events = list(
            client.messages.create(model="claude-test", max_tokens=16, messages=body["messages"], stream=True)
        )

        async def raw() -> bytes:
            async with aiohttp.ClientSession() as session:
                headers = {"anthropic-version": "2023-06-01"}
                async with session.post(replay.url + "/v1/messages", json=body, headers=headers) as response:
                    return await response.read()

        replayed = loop_thread.run(raw())
    finally:
        replay.stop()
    assert [event.type for event in events][-2:] == ["message_delta", "message_stop"]
    assert normalise_json_whitespace(replayed) == normalise_json_whitespace(sent)


def test_client_closing_after_openais_last_chunk_before_done_is_recorded_whole_and_replays(
    loop_thread: LoopThread, tmp_path: Path
) -> None:
    upstream = HeldStream("/v1/chat/completions", OPENAI_BEFORE_DONE, OPENAI_END)
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    config, sent = _record_with_early_leaver(loop_thread, tmp_path, upstream, "openai", "/v1/chat/completions", body)
    replay = start_proxy(loop_thread, "replay", tmp_path / "recordings", config)
    try:
        client = openai.OpenAI(base_url=replay.url + "/v1", api_key="sk-replay", max_retries=0)
        chunks = list(client.chat.completions.create(model="gpt-4o", messages=body["messages"], stream=True))

        async def raw() -> bytes:
            async with aiohttp.ClientSession() as session:
                async with session.post(replay.url + "/v1/chat/completions", json=body) as response:
                    return await response.read()

        replayed = loop_thread.run(raw())
    finally:
        replay.stop()
    assert [chunk.choices[0].finish_reason for chunk in chunks] == [None, "stop"]
    assert replayed.endswith(b"data: [DONE]\n\n")
    assert normalise_json_whitespace(replayed) == normalise_json_whitespace(sent)


class SilentUpstream:
    """Answers nothing (a model thinking) until the call is closed; says when it was."""

    def __init__(self, *, headers_first: bool) -> None:
        self.headers_first = headers_first
        self.arrived = asyncio.Event()
        self.closed = asyncio.Event()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        try:
            if self.headers_first:
                response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
                await response.prepare(request)
                await response.write(OPENAI_BEFORE_DONE[0])
            self.arrived.set()
            await asyncio.Event().wait()  # silent for ever
        finally:
            self.closed.set()
        raise AssertionError("unreachable")


def _leave_while_silent(loop_thread: LoopThread, url: str, upstream: SilentUpstream, stream: bool) -> None:
    async def go() -> None:
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
        body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "think"}], "stream": stream}
        try:
            call = asyncio.create_task(session.post(url + "/v1/chat/completions", json=body))
            await asyncio.wait_for(upstream.arrived.wait(), 10)
            if stream:
                response = await call
                await response.content.readany()
                response.close()
            else:
                call.cancel()  # the client gives up while the upstream says nothing
                await asyncio.gather(call, return_exceptions=True)
        finally:
            await session.close()
        # Well under the 600 s read timeout: the proxy closed the upstream call at once.
        await asyncio.wait_for(upstream.closed.wait(), 10)

    loop_thread.run(go())


def test_discard_closes_a_silent_upstream_when_the_client_leaves(loop_thread: LoopThread, tmp_path: Path) -> None:
    for stream in (True, False):
        upstream = SilentUpstream(headers_first=stream)
        app = RunningApp(loop_thread, upstream.app(), handler_cancellation=True).start()
        recordings = tmp_path / f"stream-{stream}"
        proxy = start_proxy(loop_thread, "record", recordings, upstream=app.url, client_disconnect="discard")
        try:
            with structlog.testing.capture_logs() as logs:
                _leave_while_silent(loop_thread, proxy.url, upstream, stream)
                outcome = proxy.server.pipeline.outcome
                wait_until(lambda: outcome.not_recorded == 1, "the exchange to be counted")  # noqa: B023
        finally:
            proxy.stop()
            app.stop()
        assert files_under(recordings) == []
        assert proxy.server.pipeline.outcome.not_recorded_by == {"client_left": 1}
        assert any(e["event"] == "not recorded" and e["reason"] == "client_left" for e in logs)
        assert not proxy.server.pipeline._locks


def test_a_client_leaving_a_non_streamed_call_in_flight_keeps_the_recording_and_frees_the_lock(
    loop_thread: LoopThread, tmp_path: Path
) -> None:
    wire = OpenAIWire()
    release = asyncio.Event()
    arrived = asyncio.Event()
    original = wire.chat

    async def held_chat(request: web.Request) -> web.StreamResponse:
        arrived.set()
        await release.wait()
        return await original(request)

    wire.chat = held_chat  # type: ignore[method-assign]
    app = RunningApp(loop_thread, wire.app(), handler_cancellation=True).start()
    proxy = start_proxy(loop_thread, "record", tmp_path, upstream=app.url)

    async def leave() -> None:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
            body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "not streamed"}]}
            call = asyncio.create_task(session.post(proxy.url + "/v1/chat/completions", json=body))
            await asyncio.wait_for(arrived.wait(), 10)
            call.cancel()
            await asyncio.gather(call, return_exceptions=True)

    try:
        loop_thread.run(leave())
        wait_until(lambda: proxy.server.pipeline.serving == 0, "the proxy to notice the client left")
        loop_thread.loop.call_soon_threadsafe(release.set)
        wait_until(lambda: bool(files_under(tmp_path)), "the recording")
        wait_until(lambda: not proxy.server.pipeline._locks, "the lock to be released")
    finally:
        proxy.stop()
        app.stop()
    [path] = files_under(tmp_path)
    answer = json.loads(path.read_text())["response"]["body"]["__data__"]
    assert answer["choices"][0]["message"]["content"] == "ECHO: NOT STREAMED"
    index = RecordingIndex(load_settings(None, {"upstream": app.url}).router())
    index.load_store(RecordingStore(tmp_path))
    [key] = index.keys()
    lock = InFlight(tmp_path).try_acquire(key)  # another proxy would get the call at once
    assert isinstance(lock, Lock)
    InFlight.release(lock)


def test_a_response_over_max_recording_mb_streams_to_the_client_but_is_not_recorded(
    loop_thread: LoopThread, tmp_path: Path
) -> None:
    size = 3 * 1024 * 1024
    piece = bytes(range(256)) * 256  # 64 KiB

    async def download(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await response.prepare(request)
        for _ in range(size // len(piece)):
            await response.write(piece)
        await response.write_eof()
        return response

    upstream = web.Application()
    upstream.router.add_get("/v1/files/file-1/content", download)
    app = RunningApp(loop_thread, upstream, handler_cancellation=True).start()
    proxy = start_proxy(loop_thread, "record", tmp_path, upstream=app.url, max_recording_mb=1)

    async def fetch() -> bytes:
        async with aiohttp.ClientSession() as session:
            async with session.get(proxy.url + "/v1/files/file-1/content") as response:
                assert response.status == 200
                return await response.read()

    try:
        with structlog.testing.capture_logs() as logs:
            received = loop_thread.run(fetch())
            wait_until(lambda: proxy.server.pipeline.outcome.not_recorded == 1, "the exchange to be counted")
    finally:
        proxy.stop()
    app.stop()
    assert received == piece * (size // len(piece))
    assert files_under(tmp_path) == []
    assert proxy.server.pipeline.outcome.not_recorded_by == {"over_limit": 1}
    [warning] = [e for e in logs if e["event"] == "not recorded"]
    assert warning["reason"] == "over_limit" and warning["limit"] == 1024 * 1024 and warning["log_level"] == "warning"
    assert proxy.server.report()["not_recorded"] == 1


def _ask(url: str, content: str) -> str:
    client = openai.OpenAI(base_url=url + "/v1", api_key="sk-test-missing", max_retries=0)
    answer = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": content}])
    return answer.choices[0].message.content or ""


def test_record_missing_counts_recorded_misses_apart_and_prune_accepts_its_report(
    loop_thread: LoopThread, tmp_path: Path
) -> None:
    from tests.support import RunningApp

    wire = OpenAIWire()
    app = RunningApp(loop_thread, wire.app()).start()
    recordings = tmp_path / "recordings"
    report = tmp_path / "usage.json"
    try:
        first = CliProxy("record", "--upstream", app.url, "--recordings", str(recordings), "--port", "0")
        try:
            _ask(first.url, "kept")
            _ask(first.url, "stale")
        finally:
            first.stop()
        assert len(files_under(recordings)) == 2
        missing = CliProxy(
            "record", "--missing", "--upstream", app.url, "--recordings", str(recordings), "--port", "0",
            "--report", str(report),
        )  # fmt: skip
        try:
            assert _ask(missing.url, "kept") == "ECHO: KEPT"  # a hit
            assert _ask(missing.url, "new") == "ECHO: NEW"  # a miss, recorded
        finally:
            events = missing.stop()
    finally:
        app.stop()
    [summary] = [e for e in events if e["event"] == "summary"]
    assert (summary["hits"], summary["misses"], summary["recorded_misses"], summary["errors"]) == (1, 0, 1, 0)
    assert summary["not_recorded"] == 0
    written = json.loads(report.read_text())
    assert written["misses"] == [] and len(written["recorded_misses"]) == 1
    assert Path(written["recorded_misses"][0]["recorded"]).is_file()
    stale = [
        p
        for p in files_under(recordings)
        if "stale" in json.loads(p.read_text())["request"]["body"]["messages"][0]["content"]
    ]
    pruned = subprocess.run(
        [sys.executable, "-m", "llmproxy", "prune", "--report", str(report)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert pruned.returncode == 0, pruned.stderr
    assert "1 unused recording(s)" in pruned.stdout
    assert [p for p in stale if p.exists()] == [] and len(files_under(recordings)) == 2


def test_replay_on_miss_forward_is_not_shared_nor_recorded_and_sdk_sees_the_answer(
    loop_thread: LoopThread, tmp_path: Path
) -> None:
    wire = OpenAIWire()
    from tests.support import RunningApp

    app = RunningApp(loop_thread, wire.app()).start()
    proxy = start_proxy(loop_thread, "replay", tmp_path, upstream=app.url, on_miss="forward")

    async def twice() -> list[list[Any]]:
        async with aiohttp.ClientSession() as session:
            body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "live"}], "stream": True}

            async def one() -> list[Any]:
                async with session.post(proxy.url + "/v1/chat/completions", json=body) as response:
                    return sse_data(await response.read())

            return list(await asyncio.gather(one(), one()))

    try:
        first, second = loop_thread.run(twice())
    finally:
        proxy.stop()
        app.stop()
    assert first == second and len(wire.requests) == 2
    assert files_under(tmp_path) == []
    outcome = proxy.server.pipeline.outcome
    assert (outcome.misses, outcome.forwarded, outcome.shared, outcome.not_recorded) == (2, 2, 0, 0)
