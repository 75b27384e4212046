"""Many writers: several proxy processes recording into one directory at once, and identical
calls in flight at the same moment going upstream once."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import orjson

from llmproxy.config import load_settings
from llmproxy.store.directory import RecordingStore
from llmproxy.store.index import RecordingIndex
from tests.providers_support import write_config
from tests.support import CliProxy, LoopThread, RunningApp, async_wait_until, files_under, sse_data, start_proxy
from tests.upstreams.openai_wire import OpenAIWire


async def _stream(session: aiohttp.ClientSession, url: str, content: str) -> list[dict]:
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": content}], "stream": True}
    async with session.post(url + "/v1/chat/completions", json=body) as response:
        assert response.status == 200
        return sse_data(await response.read())


def test_two_processes_times_32_streams_into_one_directory(loop_thread: LoopThread, tmp_path: Path) -> None:
    wire = OpenAIWire()
    wire.chunk_delay = 0.002  # keep the streams overlapping
    app = RunningApp(loop_thread, wire.app()).start()
    config = write_config(tmp_path / "llmproxy.toml", [{"name": "openai", "provider": "openai", "upstream": app.url}])
    recordings = tmp_path / "recordings"
    proxies = [
        CliProxy("record", "--config", str(config), "--recordings", str(recordings), "--port", "0") for _ in range(2)
    ]

    async def drive() -> list[list[dict]]:
        async with aiohttp.ClientSession() as session:
            calls = []
            for number, proxy in enumerate(proxies):
                for stream in range(32):
                    # Half the requests are the same in both processes: they race for one file.
                    content = f"shared {stream}" if stream % 2 else f"process {number} stream {stream}"
                    calls.append(_stream(session, proxy.url, content))
            return await asyncio.gather(*calls)

    try:
        results = loop_thread.run(drive(), timeout=120)
    finally:
        for proxy in proxies:
            proxy.stop()
        app.stop()
    assert all(result[-1]["choices"][0]["finish_reason"] == "stop" for result in results)
    files = files_under(recordings)
    assert not [p for p in files if p.name.endswith(".tmp")]
    assert len(files) == 16 + 32  # 16 shared requests (one file each) + 2 x 16 distinct
    for path in files:
        orjson.loads(path.read_bytes())  # every file complete and valid
    index = RecordingIndex(load_settings(config, {}).router())
    index.load_store(RecordingStore(recordings))
    assert index.problems == [] and len(index) == 48


def test_identical_calls_in_flight_go_upstream_once(loop_thread: LoopThread, tmp_path: Path) -> None:
    wire = OpenAIWire()
    wire.gate = asyncio.Event()
    app = RunningApp(loop_thread, wire.app()).start()
    proxy = start_proxy(loop_thread, "record", tmp_path, upstream=app.url)
    outcome = proxy.server.mode.outcome

    async def drive() -> list[list[dict]]:
        async with aiohttp.ClientSession() as session:
            first = asyncio.create_task(_stream(session, proxy.url, "same"))
            second = asyncio.create_task(_stream(session, proxy.url, "same"))
            await async_wait_until(lambda: outcome.shared >= 1, "the second call to join the first")
            wire.gate.set()
            return await asyncio.gather(first, second)

    try:
        first, second = loop_thread.run(drive())
    finally:
        proxy.stop()
        app.stop()
    assert outcome.shared == 1
    assert len(wire.requests) == 1
    assert first == second and first[-1]["choices"][0]["finish_reason"] == "stop"
    assert len(files_under(tmp_path)) == 1
    json.loads(files_under(tmp_path)[0].read_text())


def test_identical_calls_in_two_proxies_on_one_directory_go_upstream_once(
    loop_thread: LoopThread, tmp_path: Path
) -> None:
    """Parallel test workers: proxy B waits for proxy A's lock, then serves what A recorded."""
    wire = OpenAIWire()
    wire.gate = asyncio.Event()
    app = RunningApp(loop_thread, wire.app()).start()
    recordings = tmp_path / "recordings"
    first, second = (
        CliProxy("record", "--upstream", app.url, "--recordings", str(recordings), "--port", "0") for _ in range(2)
    )

    async def drive() -> tuple[list[dict], list[dict], int]:
        async with aiohttp.ClientSession() as session:
            via_first = asyncio.create_task(_stream(session, first.url, "across processes"))
            await async_wait_until(lambda: wire.requests, "proxy A's upstream call")
            via_second = asyncio.create_task(_stream(session, second.url, "across processes"))
            # B logs when it starts waiting for A's lock; from then on it must not call upstream.
            await asyncio.to_thread(second.wait_for_event, "identical call in flight in another proxy: waiting")
            upstream_calls_while_held = len(wire.requests)
            wire.gate.set()
            return await via_first, await via_second, upstream_calls_while_held

    try:
        answer_a, answer_b, calls_while_held = loop_thread.run(drive())
    finally:
        events_b = second.stop()
        first.stop()
        app.stop()
    assert calls_while_held == 1
    assert len(wire.requests) == 1
    assert answer_a == answer_b and answer_a[-1]["choices"][0]["finish_reason"] == "stop"
    assert len(files_under(recordings)) == 1
    assert any(e["event"] == "identical call in flight in another proxy: served its recording" for e in events_b)
