"""Replay pacing: realtime keeps the recorded order and spacing, fast does not wait at all."""

from __future__ import annotations

import json
import time
from pathlib import Path

import aiohttp

from tests.support import LoopThread, RunningApp, files_under, start_proxy
from tests.upstreams.openai_wire import OpenAIWire

GAP = 0.12  # seconds between upstream chunks
# Bounds below allow 1 ms: offsets are stored rounded to 0.1 ms, and the loop's clock has a resolution.


async def _arrivals(url: str) -> tuple[list[float], list[bytes], aiohttp.typedefs.LooseHeaders]:
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "pace me"}], "stream": True}
    async with aiohttp.ClientSession() as session:
        started = time.monotonic()
        async with session.post(url + "/v1/chat/completions", json=body) as response:
            times, events, buffer = [], [], b""
            async for data in response.content.iter_any():
                buffer += data
                while b"\n\n" in buffer:
                    event, buffer = buffer.split(b"\n\n", 1)
                    times.append(time.monotonic() - started)
                    events.append(event)
            return times, events, response.headers


def test_realtime_replay_keeps_order_and_spacing_and_fast_replay_does_not_sleep(
    loop_thread: LoopThread, tmp_path: Path
) -> None:
    wire = OpenAIWire()
    wire.chunk_delay = GAP
    app = RunningApp(loop_thread, wire.app()).start()
    proxy = start_proxy(loop_thread, "record", tmp_path, upstream=app.url)
    try:
        recorded_times, recorded_events, _ = loop_thread.run(_arrivals(proxy.url))
    finally:
        proxy.stop()
        app.stop()
    [path] = files_under(tmp_path)
    chunk_ms = json.loads(path.read_text())["response"]["timing"]["chunk_ms"]
    assert len(chunk_ms) == len(recorded_events) - 1  # every chunk but [DONE] has its arrival time
    # The upstream waits GAP between chunks, so chunk i cannot arrive before i * GAP.
    assert all(ms >= i * GAP * 1000 - 1 for i, ms in enumerate(chunk_ms)), chunk_ms

    realtime = start_proxy(loop_thread, "replay", tmp_path, timing="realtime")
    try:
        times, events, headers = loop_thread.run(_arrivals(realtime.url))
    finally:
        realtime.stop()
    assert events == recorded_events  # same chunks, same order
    # Replay never sends a chunk before its recorded offset (lower bounds only: a busy machine
    # can make replay later, never earlier).
    assert all(t * 1000 >= ms - 1 for t, ms in zip(times, chunk_ms)), (times, chunk_ms)
    assert headers.get("Transfer-Encoding") == "chunked"

    doubled = start_proxy(loop_thread, "replay", tmp_path, timing="x4")
    try:
        times_x4, events_x4, _ = loop_thread.run(_arrivals(doubled.url))
    finally:
        doubled.stop()
    assert events_x4 == recorded_events
    assert all(t * 1000 >= ms / 4 - 1 for t, ms in zip(times_x4, chunk_ms)), (times_x4, chunk_ms)

    # Faster than recorded: stretch the recorded offsets to a minute apart, replay at x1000. The
    # stream must end long before the minute realtime would take (a bound 1000 times too loose
    # to flake), and still no chunk comes before its scaled offset.
    document = json.loads(path.read_text())
    stretched = [60_000.0 * (i + 1) / len(chunk_ms) for i in range(len(chunk_ms))]
    document["response"]["timing"]["chunk_ms"] = stretched
    path.write_text(json.dumps(document))
    sped_up = start_proxy(loop_thread, "replay", tmp_path, timing="x1000")
    try:
        times_fast, events_fast, _ = loop_thread.run(_arrivals(sped_up.url))
    finally:
        sped_up.stop()
    assert events_fast == recorded_events
    assert all(t * 1000 >= ms / 1000 - 1 for t, ms in zip(times_fast, stretched)), (times_fast, stretched)
    assert times_fast[-1] < 60

    fast = start_proxy(loop_thread, "replay", tmp_path)  # the default
    try:
        _, fast_events, fast_headers = loop_thread.run(_arrivals(fast.url))
    finally:
        fast.stop()
    assert fast_events == recorded_events
    # The whole body in one response with a length: nothing is paced, nothing waits.
    assert int(fast_headers["Content-Length"]) == sum(len(e) + 2 for e in recorded_events)
    assert "Transfer-Encoding" not in fast_headers
