"""Identical calls in flight at once: followers are fed the leader's chunks as they arrive
(share_inflight = true), or each goes upstream and is recorded as its own repeat (false)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from llmproxy.call import Call
from llmproxy.upstream.base import UpstreamBroken
from llmproxy.upstream.flight import Flight
from tests.support import LoopThread, RunningApp, files_under, sse_data, start_proxy

CHUNKS = 20
CLIENTS = 4


def _chunk(index: int, text: str) -> bytes:
    event = {
        "id": "chatcmpl-fanout",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "gpt-4o-2024-08-06",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
    }
    if index == CHUNKS - 1:
        event["choices"][0]["finish_reason"] = "stop"  # type: ignore[index]
    return b"data: " + orjson.dumps(event) + b"\n\n"


class PacedUpstream:
    """OpenAI-style paced stream; it sends its first chunk, then waits on `release` before the
    second. `arrived` is set once `expect` requests are in (each answers with its own number)."""

    def __init__(self, expect: int = 1) -> None:
        self.requests = 0
        self.expect = expect
        self.release = asyncio.Event()
        self.arrived = asyncio.Event()
        self.second_chunk_sent = False

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        return app

    async def chat(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        self.requests += 1
        number = self.requests
        if self.requests >= self.expect:
            self.arrived.set()
        await self.arrived.wait()  # with share_inflight = false: all calls are upstream at once
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await response.prepare(request)
        await response.write(_chunk(0, f"answer {number}:"))
        await self.release.wait()
        for index in range(1, CHUNKS):
            self.second_chunk_sent = True
            await response.write(_chunk(index, f" {index}"))
            await asyncio.sleep(0.001)  # paced, as a model streams
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


BODY = {"model": "gpt-4o", "messages": [{"role": "user", "content": "same prompt"}], "stream": True}


async def _first_byte_then_rest(
    session: aiohttp.ClientSession, url: str, first_bytes: list[bool], upstream: PacedUpstream, everyone: asyncio.Event
) -> tuple[bytes, bool]:
    async with session.post(url + "/v1/chat/completions", json=BODY) as response:
        assert response.status == 200
        first = await response.content.readany()
        assert first
        # Before the upstream's second chunk (it waits for every client's first byte).
        sent_before = upstream.second_chunk_sent
        first_bytes.append(True)
        if len(first_bytes) == CLIENTS:
            everyone.set()
        return first + await response.read(), sent_before


def _run_clients(loop_thread: LoopThread, url: str, upstream: PacedUpstream) -> list[tuple[bytes, bool]]:
    async def drive() -> list[tuple[bytes, bool]]:
        first_bytes: list[bool] = []
        everyone = asyncio.Event()
        async with aiohttp.ClientSession() as session:
            clients = [
                asyncio.create_task(_first_byte_then_rest(session, url, first_bytes, upstream, everyone))
                for _ in range(CLIENTS)
            ]
            try:
                # A proxy that holds followers back until the leader's stream ends never gets here.
                await asyncio.wait_for(everyone.wait(), 15)
            finally:
                upstream.release.set()
                upstream.arrived.set()
            return await asyncio.gather(*clients)

    return loop_thread.run(drive(), timeout=60)


def test_four_identical_streams_each_get_their_first_byte_before_the_upstreams_second_chunk(
    loop_thread: LoopThread, tmp_path: Path
) -> None:
    upstream = PacedUpstream()
    app = RunningApp(loop_thread, upstream.app()).start()
    proxy = start_proxy(loop_thread, "record", tmp_path, upstream=app.url)
    try:
        results = _run_clients(loop_thread, proxy.url, upstream)
    finally:
        proxy.stop()
        app.stop()
    assert upstream.requests == 1
    bodies = [body for body, _ in results]
    assert all(sent_before is False for _, sent_before in results)
    assert len(set(bodies)) == 1 and bodies[0].endswith(b"data: [DONE]\n\n")
    events = sse_data(bodies[0])
    assert len(events) == CHUNKS and events[-1]["choices"][0]["finish_reason"] == "stop"
    outcome = proxy.server.pipeline.outcome
    assert (outcome.forwarded, outcome.shared, outcome.not_recorded) == (1, CLIENTS - 1, 0)
    [path] = files_under(tmp_path)
    assert len(json.loads(path.read_text())["response"]["body"]) == CHUNKS


def test_share_inflight_false_sends_each_call_upstream_and_records_each_as_a_repeat(
    loop_thread: LoopThread, tmp_path: Path
) -> None:
    upstream = PacedUpstream(expect=CLIENTS)  # answers only once all four calls are upstream at once
    app = RunningApp(loop_thread, upstream.app()).start()
    proxy = start_proxy(loop_thread, "record", tmp_path, upstream=app.url, share_inflight=False)
    try:
        results = _run_clients(loop_thread, proxy.url, upstream)
    finally:
        proxy.stop()
        app.stop()
    assert upstream.requests == CLIENTS
    answers = {sse_data(body)[0]["choices"][0]["delta"]["content"] for body, _ in results}
    assert answers == {f"answer {n}:" for n in range(1, CLIENTS + 1)}
    files = files_under(tmp_path)
    assert len(files) == CLIENTS
    sequences = sorted(json.loads(path.read_text())["request"].get("sequence", 1) for path in files)
    assert sequences == [1, 2, 3, 4]

    # Replay serves the four repeats in order, one answer each.
    replay = start_proxy(loop_thread, "replay", tmp_path)

    async def ask_four_times() -> list[str]:
        async with aiohttp.ClientSession() as session:
            answers = []
            for _ in range(CLIENTS):
                async with session.post(replay.url + "/v1/chat/completions", json=BODY) as response:
                    answers.append(sse_data(await response.read())[0]["choices"][0]["delta"]["content"])
            return answers

    try:
        replayed = loop_thread.run(ask_four_times())
    finally:
        replay.stop()
    assert sorted(replayed) == sorted(answers) and len(set(replayed)) == CLIENTS


def test_share_inflight_setting_is_read_from_config_and_environment(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from llmproxy.config import ConfigError, load_settings

    config = tmp_path / "llmproxy.toml"
    config.write_text("[proxy]\nshare_inflight = false\nmax_recording_mb = 2\n")
    settings = load_settings(config, {})
    assert settings.share_inflight is False and settings.max_recording_bytes == 2 * 1024 * 1024
    assert load_settings(config, {"share_inflight": True}).share_inflight is True
    assert load_settings(None, {}).share_inflight is True
    config.write_text('[proxy]\nshare_inflight = "no"\n')
    with pytest.raises(ConfigError, match="share_inflight"):
        load_settings(config, {})

    from llmproxy.cli import main

    help_text = CliRunner().invoke(main, ["record", "--help"]).output
    assert "--no-share-inflight" in help_text and "--max-recording-mb" in help_text


class _Double:
    """An Upstream double (unit level): a body of `count` chunks of `size` bytes."""

    read_timeout = 5.0

    def __init__(self, count: int, size: int, *, break_after: int | None = None) -> None:
        self.count, self.size, self.break_after = count, size, break_after
        self.produced = 0

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def send(self, call: Call) -> Any:
        double = self

        class Response:
            status = 200
            headers = [("Content-Type", "application/octet-stream")]
            url = "http://upstream.invalid/v1/files"
            headers_ms = 1.0

            async def chunks(self) -> Any:
                for index in range(double.count):
                    if double.break_after is not None and index == double.break_after:
                        raise UpstreamBroken("reset")
                    double.produced += 1
                    yield bytes([index % 256]) * double.size

            def close(self) -> None: ...

        return Response()


def _call() -> Call:
    from llmproxy.canonical import canonical_request
    from llmproxy.routing import default_routes

    route = default_routes()[0]
    canonical = canonical_request(route=route.name, method="GET", path="/v1/files", query=[], headers={}, body=None)
    return Call(route, "GET", "/v1/files", "", [], {}, b"", None, canonical)


def test_flight_memory_stays_at_the_window_when_nothing_is_kept(loop_thread: LoopThread) -> None:
    """Pass-through of a body 64 times the window: never more than window + one chunk held."""

    async def go() -> tuple[int, int, int]:
        double = _Double(count=256, size=16 * 1024)
        flight = Flight(_call(), double, keep_bytes=None, persist=False, window=64 * 1024)
        reader = flight.join()
        received = 0
        most_held = 0
        async for chunk in flight.chunks(reader):
            received += len(chunk)
            most_held = max(most_held, flight._buffered)
            await asyncio.sleep(0)  # a reader slower than the upstream
        flight.leave(reader)
        await flight.finished()
        return received, most_held, double.produced

    received, most_held, produced = loop_thread.run(go())
    assert received == produced * 16 * 1024 == 256 * 16 * 1024
    assert most_held <= 64 * 1024 + 16 * 1024


def test_flight_past_its_keep_limit_still_feeds_readers_but_keeps_nothing(loop_thread: LoopThread) -> None:
    async def go() -> tuple[int, bool, bytes | None, bool]:
        flight = Flight(
            _call(), _Double(count=64, size=16 * 1024), keep_bytes=256 * 1024, persist=True, window=64 * 1024
        )
        reader = flight.join()
        received = 0
        async for chunk in flight.chunks(reader):
            received += len(chunk)
        flight.leave(reader)
        await flight.finished()
        return received, flight.over_limit, flight.body(), flight.joinable

    received, over_limit, body, joinable = loop_thread.run(go())
    assert received == 64 * 16 * 1024 and over_limit and body is None and not joinable


def test_flight_that_breaks_off_says_so(loop_thread: LoopThread) -> None:
    async def go() -> tuple[int, str | None, bool]:
        flight = Flight(_call(), _Double(count=8, size=10, break_after=3), keep_bytes=1024, persist=True)
        reader = flight.join()
        received = b"".join([chunk async for chunk in flight.chunks(reader)])
        flight.leave(reader)
        await flight.finished()
        return len(received), flight.broken, flight.complete

    assert loop_thread.run(go()) == (30, "reset", False)


class _Gated(_Double):
    """A `_Double` whose response headers wait for `gate`."""

    def __init__(self, count: int, size: int) -> None:
        super().__init__(count, size)
        self.gate = asyncio.Event()

    async def send(self, call: Call) -> Any:
        await self.gate.wait()
        return await super().send(call)


def test_readers_leaving_while_waiting_do_not_disturb_the_one_that_stays(loop_thread: LoopThread) -> None:
    """Identical calls wait on one flight: one client leaves while waiting for the headers,
    another while waiting for the journal; the third still gets the whole body and its end."""

    async def go() -> tuple[bytes, bool, bool, bool, bytes | None]:
        double = _Gated(count=3, size=10)
        flight = Flight(_call(), double, keep_bytes=1024, persist=True, journal=True)
        # Set right before a wait: the one setting it runs on into that wait before anyone looks.
        at_headers, at_journal = asyncio.Event(), {"late": asyncio.Event(), "staying": asyncio.Event()}

        async def read(reader: int, name: str) -> bytes:
            try:
                if name == "early":
                    at_headers.set()
                await flight.headers()
                body = b"".join([chunk async for chunk in flight.chunks(reader)])
                at_journal[name].set()
                await flight.journaled_end()
                return body
            finally:
                flight.leave(reader)

        early = asyncio.create_task(read(flight.join(), "early"))
        late = asyncio.create_task(read(flight.join(), "late"))
        staying = asyncio.create_task(read(flight.join(), "staying"))
        await at_headers.wait()
        early.cancel()
        await asyncio.wait([early])
        double.gate.set()
        await at_journal["late"].wait()
        late.cancel()
        await asyncio.wait([late])
        await at_journal["staying"].wait()
        was_waiting = not staying.done()  # the end waits for the journal
        flight.mark_journaled()
        body = await staying
        return body, was_waiting, early.cancelled() and late.cancelled(), flight.complete, flight.body()

    body, was_waiting, both_left, complete, kept = loop_thread.run(go())
    assert body == kept == bytes(10) + bytes([1]) * 10 + bytes([2]) * 10
    assert was_waiting and both_left and complete
