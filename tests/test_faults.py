"""Upstream and client faults in record mode, each injected for real: what the client sees, and
what is (not) on disk."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web

from tests.support import CliProxy, LoopThread, RunningApp, files_under, free_port, start_proxy, wait_until

CHUNK = (
    b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"m",'
    b'"choices":[{"index":0,"delta":{"content":"x"},"finish_reason":null}]}\n\n'
)


class FaultyUpstream:
    """Behaves as the first message's content says."""

    def __init__(self) -> None:
        self.requests = 0
        self.client_gone = False
        self.chunks_sent = 0
        # Set by the test (on the loop) when the upstream may go on: no behaviour here waits a
        # fixed time, so nothing depends on how fast the proxy or the machine is.
        self.release = asyncio.Event()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        return app

    async def chat(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        behaviour = (await request.json())["messages"][0]["content"]
        if behaviour == "slow-headers":
            await self.release.wait()
        if behaviour.startswith("status-"):
            status = int(behaviour.split("-")[1])
            return web.json_response(
                {"error": {"message": f"upstream says {status}", "type": "server_error", "code": None}},
                status=status,
                headers={"retry-after": "7", "retry-after-ms": "7000", "x-request-id": "req_fault"},
            )
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await response.prepare(request)
        if behaviour == "reset-mid-stream":
            await response.write(CHUNK * 2)
            await self.release.wait()  # the client has both chunks: now cut the connection
            assert request.transport is not None
            request.transport.abort()  # RST, no end of chunked body
            return response
        if behaviour == "late-end":
            await response.write(CHUNK + b"data: [DONE]\n\n")
            await self.release.wait()  # the end of the chunked body comes once the client left
            await response.write_eof()
            return response
        if behaviour == "no-end-marker":
            await response.write(CHUNK * 2)
            await response.write_eof()
            return response
        if behaviour in ("held-stream", "endless-stream"):
            # held: one chunk, then (once released) 99 more and the end. endless: chunks until the
            # connection breaks, the end only after 20,000 (far beyond any prompt close).
            total = 100 if behaviour == "held-stream" else 20_000
            try:
                for index in range(total):
                    await response.write(CHUNK)
                    self.chunks_sent += 1
                    if index == 0 and behaviour == "held-stream":
                        await self.release.wait()
                    elif behaviour == "endless-stream":
                        await asyncio.sleep(0.005)  # pacing only; no assertion depends on it
                await response.write(b"data: [DONE]\n\n")
                await response.write_eof()
            except (ConnectionResetError, asyncio.CancelledError):
                self.client_gone = True
                raise
            return response
        await response.write(CHUNK + b"data: [DONE]\n\n")
        await response.write_eof()
        return response


@pytest.fixture
def faulty(loop_thread: LoopThread):  # type: ignore[no-untyped-def]
    upstream = FaultyUpstream()
    app = RunningApp(loop_thread, upstream.app()).start()
    yield upstream, app
    app.stop()


def chat(base_url: str, behaviour: str, stream: bool = False, **client: Any) -> Any:
    sdk = openai.OpenAI(base_url=base_url + "/v1", api_key="sk-test", max_retries=0, **client)
    result = sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": behaviour}], stream=stream)
    return list(result) if stream else result


def test_connection_refused_is_a_502_in_provider_shape(loop_thread: LoopThread, tmp_path: Path) -> None:
    closed_port = free_port()  # nothing listens there
    proxy = start_proxy(loop_thread, "record", tmp_path, upstream=f"http://127.0.0.1:{closed_port}")
    try:
        with pytest.raises(openai.InternalServerError) as caught:
            chat(proxy.url, "hello")
    finally:
        proxy.stop()
    assert caught.value.status_code == 502
    assert caught.value.body["code"] == "upstream_unreachable"  # type: ignore[index]
    assert files_under(tmp_path) == []


def test_dns_failure_is_a_502(tmp_path: Path) -> None:
    proxy = CliProxy(
        "record",
        "--upstream",
        "http://api.upstream.invalid",
        "--recordings",
        str(tmp_path),
        "--port",
        "0",
        netguard="no-dns",
    )
    try:
        with pytest.raises(openai.InternalServerError) as caught:
            chat(proxy.url, "hello")
    finally:
        events = proxy.stop()
    assert caught.value.status_code == 502 and "cannot reach upstream" in caught.value.message
    assert any(e["event"] == "upstream unreachable" for e in events)
    assert files_under(tmp_path) == []


def test_tls_error_is_a_502(loop_thread: LoopThread, tmp_path: Path, faulty) -> None:  # type: ignore[no-untyped-def]
    _, app = faulty
    proxy = start_proxy(loop_thread, "record", tmp_path, upstream=f"https://127.0.0.1:{app.port}")  # plain HTTP there
    try:
        with pytest.raises(openai.InternalServerError) as caught:
            chat(proxy.url, "hello")
    finally:
        proxy.stop()
    assert caught.value.status_code == 502
    assert files_under(tmp_path) == []


def test_timeout_before_headers_is_a_504(loop_thread: LoopThread, tmp_path: Path, faulty) -> None:  # type: ignore[no-untyped-def]
    upstream, app = faulty
    proxy = start_proxy(loop_thread, "record", tmp_path, upstream=app.url, read_timeout=0.3)
    try:
        # The upstream answers only once released, after the client has its answer: the 504 can
        # only come from the proxy's own read timeout (the client's 60 s guards against a hang).
        with pytest.raises(openai.APIStatusError) as caught:
            chat(proxy.url, "slow-headers", timeout=60)
    finally:
        loop_thread.loop.call_soon_threadsafe(upstream.release.set)
        proxy.stop()
    assert caught.value.status_code == 504
    assert caught.value.body["code"] == "upstream_timeout"  # type: ignore[index]
    assert files_under(tmp_path) == []


@pytest.mark.parametrize("record_errors", [False, True])
def test_reset_mid_stream_cuts_the_client_off_and_writes_no_half_file(
    loop_thread: LoopThread,
    tmp_path: Path,
    faulty,
    record_errors: bool,  # type: ignore[no-untyped-def]
) -> None:
    upstream, app = faulty
    proxy = start_proxy(loop_thread, "record", tmp_path, upstream=app.url, record_errors=record_errors)
    sdk = openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk-test", max_retries=0)
    received = []
    try:
        stream = sdk.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "reset-mid-stream"}], stream=True
        )
        with pytest.raises(openai.APIConnectionError):  # the SDK sees the body cut off
            for chunk in stream:
                received.append(chunk)
                if len(received) == 2:
                    loop_thread.loop.call_soon_threadsafe(upstream.release.set)
    finally:
        proxy.stop()
    assert len(received) == 2
    files = files_under(tmp_path)
    if record_errors:
        [path] = files
        document = json.loads(path.read_text())
        assert document["response"]["truncated"] is True and len(document["response"]["body"]) == 2
    else:
        assert files == []


@pytest.mark.parametrize("status", [429, 500, 503])
def test_429_and_5xx_pass_through_with_retry_headers_and_are_not_recorded(
    loop_thread: LoopThread,
    tmp_path: Path,
    faulty,
    status: int,  # type: ignore[no-untyped-def]
) -> None:
    _, app = faulty
    proxy = start_proxy(loop_thread, "record", tmp_path, upstream=app.url)
    try:
        with pytest.raises(openai.APIStatusError) as caught:
            chat(proxy.url, f"status-{status}")
    finally:
        proxy.stop()
    assert caught.value.status_code == status
    assert caught.value.response.headers["retry-after"] == "7"
    assert caught.value.message.endswith(f"upstream says {status}")
    assert files_under(tmp_path) == []


def test_4xx_is_recorded_and_429_too_with_record_errors(loop_thread: LoopThread, tmp_path: Path, faulty) -> None:  # type: ignore[no-untyped-def]
    _, app = faulty
    proxy = start_proxy(loop_thread, "record", tmp_path / "a", upstream=app.url)
    try:
        with pytest.raises(openai.BadRequestError):
            chat(proxy.url, "status-400")
    finally:
        proxy.stop()
    [path] = files_under(tmp_path / "a")
    assert json.loads(path.read_text())["response"]["status"] == 400
    replay = start_proxy(loop_thread, "replay", tmp_path / "a")
    try:
        with pytest.raises(openai.BadRequestError) as caught:
            chat(replay.url, "status-400")
        assert caught.value.message.endswith("upstream says 400")
    finally:
        replay.stop()
    proxy = start_proxy(loop_thread, "record", tmp_path / "b", upstream=app.url, record_errors=True)
    try:
        with pytest.raises(openai.RateLimitError):
            chat(proxy.url, "status-429")
    finally:
        proxy.stop()
    [path] = files_under(tmp_path / "b")
    document = json.loads(path.read_text())
    assert document["response"]["status"] == 429 and document["response"]["headers"]["retry-after"] == "7"


def test_stream_without_its_end_marker_is_passed_on_but_not_recorded(
    loop_thread: LoopThread,
    tmp_path: Path,
    faulty,  # type: ignore[no-untyped-def]
) -> None:
    _, app = faulty
    proxy = start_proxy(loop_thread, "record", tmp_path, upstream=app.url)
    try:
        chunks = chat(proxy.url, "no-end-marker", stream=True)
    finally:
        proxy.stop()
    assert len(chunks) == 2  # the SDK ends cleanly at EOF: the client gets what was sent
    assert proxy.server.mode.outcome.truncated == 1
    assert files_under(tmp_path) == []


@pytest.mark.parametrize("mode", ["discard", "drain"])
def test_client_disconnect_mid_stream(loop_thread: LoopThread, tmp_path: Path, faulty, mode: str) -> None:  # type: ignore[no-untyped-def]
    upstream, app = faulty
    proxy = start_proxy(loop_thread, "record", tmp_path, upstream=app.url, client_disconnect=mode)
    baseline_tasks = loop_thread.run(_task_count())

    behaviour = "endless-stream" if mode == "discard" else "held-stream"

    async def read_a_little_then_leave() -> None:
        async with aiohttp.ClientSession() as session:
            body = {"model": "m", "messages": [{"role": "user", "content": behaviour}], "stream": True}
            async with session.post(proxy.url + "/v1/chat/completions", json=body) as response:
                await response.content.readany()
        upstream.release.set()  # the client has left: the held stream may go on

    def settled() -> bool:
        done = upstream.client_gone or upstream.chunks_sent == 100
        return done and loop_thread.run(_task_count()) <= baseline_tasks and not proxy.server.mode.recorder._pending

    try:
        loop_thread.run(read_a_little_then_leave())
        wait_until(settled, "the upstream request to end and the proxy to go idle")
    finally:
        proxy.stop()
    if mode == "discard":
        assert upstream.client_gone, "the upstream request was not closed"
        assert upstream.chunks_sent < 20_000  # closed when the client left, not at the stream's end
        assert files_under(tmp_path) == []
    else:
        assert upstream.chunks_sent == 100
        [path] = files_under(tmp_path)
        document = json.loads(path.read_text())
        assert len(document["response"]["body"]) == 100 and "truncated" not in document["response"]
    assert loop_thread.run(_task_count()) <= baseline_tasks  # no task left running


def test_a_client_that_stops_at_done_before_the_upstream_finishes_still_gets_recorded(
    loop_thread: LoopThread,
    tmp_path: Path,
    faulty,  # type: ignore[no-untyped-def]
) -> None:
    """SDKs stop reading at [DONE]; the upstream's final empty chunk may come after they left."""
    upstream, app = faulty
    proxy = start_proxy(loop_thread, "record", tmp_path, upstream=app.url)

    async def read_to_done_then_leave() -> bytes:
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            body = {"model": "m", "messages": [{"role": "user", "content": "late-end"}], "stream": True}
            response = await session.post(proxy.url + "/v1/chat/completions", json=body)
            received = b""
            while b"[DONE]" not in received:
                received += await response.content.readany()
            response.close()  # leave at once, as an SDK does
            upstream.release.set()  # only now does the upstream end its chunked body
            return received

    try:
        received = loop_thread.run(read_to_done_then_leave())
        wait_until(lambda: files_under(tmp_path), "the recording to be written")
    finally:
        proxy.stop()
    assert received.endswith(b"data: [DONE]\n\n")
    [path] = files_under(tmp_path)
    assert json.loads(path.read_text())["response"]["framing"]["end"] == "data: [DONE]\n\n"


async def _task_count() -> int:
    """Tasks doing work on the loop; idle keep-alive connections (pooled, by design) excluded."""
    await asyncio.sleep(0)
    return len(
        [
            task
            for task in asyncio.all_tasks()
            if not task.done()
            and task is not asyncio.current_task()
            and task.get_coro().__qualname__ != "RequestHandler.start"  # type: ignore[union-attr]
        ]
    )


def test_nothing_listens_after_stop(loop_thread: LoopThread, tmp_path: Path) -> None:
    proxy = start_proxy(loop_thread, "replay", tmp_path)
    port = proxy.server.port
    proxy.stop()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass
