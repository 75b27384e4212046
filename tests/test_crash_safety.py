"""kill -9 and SIGTERM in the middle of 32 recording streams."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import orjson

from llmproxy.config import load_settings
from llmproxy.store.directory import RecordingStore
from llmproxy.store.index import RecordingIndex
from tests.support import CliProxy, LoopThread, RunningApp, files_under, wait_until
from tests.upstreams.openai_wire import OpenAIWire


async def _new_event() -> asyncio.Event:
    return asyncio.Event()


async def _stream_many(url: str, count: int, first: int = 0) -> list[BaseException | bytes]:
    async def one(number: int) -> bytes:
        # Longer answers for higher numbers: when the first files land, the rest are mid-stream.
        content = f"crash {number} " + "x" * 6 * number
        body = {"model": "gpt-4o", "messages": [{"role": "user", "content": content}], "stream": True}
        async with aiohttp.ClientSession() as session:
            async with session.post(url + "/v1/chat/completions", json=body) as response:
                return await response.read()

    return await asyncio.gather(*(one(n) for n in range(first, first + count)), return_exceptions=True)


def _valid_recordings(directory: Path) -> int:
    index = RecordingIndex(load_settings(None, {}).router())
    index.load_store(RecordingStore(directory))
    assert index.problems == [], index.problems
    return len(index)


def test_kill_9_mid_recording_leaves_only_complete_valid_files(loop_thread: LoopThread, tmp_path: Path) -> None:
    wire = OpenAIWire()
    app = RunningApp(loop_thread, wire.app()).start()
    recordings = tmp_path / "recordings"
    proxy = CliProxy(
        "record", "--upstream", app.url, "--recordings", str(recordings), "--port", "0", "--log-level", "debug"
    )
    try:
        loop_thread.run(_stream_many(proxy.url, 8))
        proxy.wait_for_event("recorded", count=8)  # these are written
        # The rest stay mid-stream (the upstream holds them after their first chunk) at the kill.
        wire.gate = loop_thread.run(_new_event())
        future = asyncio.run_coroutine_threadsafe(_stream_many(proxy.url, 24, first=8), loop_thread.loop)
        wait_until(lambda: len(wire.requests) == 32, "the 24 held streams to reach the upstream")
        proxy.process.send_signal(signal.SIGKILL)
        proxy.process.wait(10)
        loop_thread.loop.call_soon_threadsafe(wire.gate.set)  # the upstream ends what it held
        results = future.result(20)
    finally:
        app.stop()
    files = files_under(recordings)
    complete = [p for p in files if p.suffix == ".json"]
    assert len(complete) == 8
    assert all(isinstance(result, BaseException) for result in results)  # killed mid-stream
    for path in complete:
        document = orjson.loads(path.read_bytes())
        assert document["response"]["framing"]["end"] == "data: [DONE]\n\n"
    # Whatever the kill left behind, replay serves only the complete files, and check --fix
    # removes temp leftovers.
    assert _valid_recordings(recordings) == len(complete)
    fixed = subprocess.run(
        [sys.executable, "-m", "llmproxy", "check", str(recordings), "--fix"], capture_output=True, text=True
    )
    assert fixed.returncode == 0, fixed.stdout
    assert [p for p in files_under(recordings) if p.suffix != ".json"] == []  # no temp files left


def test_sigterm_finishes_in_flight_writes_and_exits_in_bounded_time(loop_thread: LoopThread, tmp_path: Path) -> None:
    wire = OpenAIWire()
    wire.chunk_delay = 0.01
    app = RunningApp(loop_thread, wire.app()).start()
    recordings = tmp_path / "recordings"
    proxy = CliProxy("record", "--upstream", app.url, "--recordings", str(recordings), "--port", "0")
    try:
        future = asyncio.run_coroutine_threadsafe(_stream_many(proxy.url, 32), loop_thread.loop)
        wait_until(lambda: len(wire.requests) == 32, "all 32 calls to reach the upstream")
        events = proxy.stop()  # SIGTERM; stop() fails if the proxy has not exited within 15 s
        results = future.result(20)
    finally:
        app.stop()
    assert all(isinstance(result, bytes) and result.endswith(b"data: [DONE]\n\n") for result in results)
    summary = next(e for e in events if e["event"] == "summary")
    assert summary["recorded"] == 32
    assert _valid_recordings(recordings) == 32
    assert proxy.process.returncode == 0
