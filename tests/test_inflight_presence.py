"""A proxy alone on its recordings directory takes no cross-process lock; once another proxy records
into the same directory, the calls in flight in both (also those begun while alone) are made once."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp

from llmproxy.upstream.singleflight import InFlight, Lock
from tests.support import CliProxy, LoopThread, RunningApp, async_wait_until, files_under, start_proxy
from tests.test_concurrency import _stream
from tests.upstreams.openai_wire import OpenAIWire

WAITING = "identical call in flight in another proxy: waiting"
GREETED = "another proxy records into this directory: sharing in-flight calls"
ALONE_AGAIN = "no other proxy records into this directory any more: calls take no lock"
SERVED = "identical call in flight in another proxy: served its recording"


def _upstream_calls(wire: OpenAIWire, content: str) -> int:
    return sum(1 for r in wire.requests if r["body"]["messages"][0]["content"] == content)


def _record(app: RunningApp, recordings: Path) -> CliProxy:
    return CliProxy("record", "--upstream", app.url, "--recordings", str(recordings), "--port", "0")


def test_a_lone_proxy_binds_no_lock_until_another_proxy_comes_then_binds_its_calls_in_flight(
    loop_thread: LoopThread, tmp_path: Path
) -> None:
    wire = OpenAIWire()
    wire.gate = asyncio.Event()
    app = RunningApp(loop_thread, wire.app()).start()
    proxy = start_proxy(loop_thread, "record", tmp_path, upstream=app.url)
    pipeline = proxy.server.pipeline
    newcomer = InFlight(tmp_path)

    async def drive() -> tuple[list[dict], bool, Lock | None | bool, bool]:
        async with aiohttp.ClientSession() as session:
            call = asyncio.create_task(_stream(session, proxy.url, "alone"))
            await async_wait_until(lambda: wire.requests, "the upstream call")
            [key] = pipeline._flights
            # Nothing bound while alone: a process that does not announce itself gets the name.
            outsider = InFlight(tmp_path).try_acquire(key)
            free_while_alone = isinstance(outsider, Lock)
            if isinstance(outsider, Lock):
                InFlight.release(outsider)
            # A proxy that announces itself: the lone one binds its call in flight before answering.
            taken = await newcomer.acquire(key)
            wire.gate.set()
            answer = await call
            freed = await newcomer.wait(key, 30)
            return answer, free_while_alone, taken, freed

    try:
        answer, free_while_alone, taken, freed = loop_thread.run(drive())
        assert not pipeline.inflight.alone  # the newcomer is still there
        loop_thread.run(newcomer.aclose())
        loop_thread.run(async_wait_until(lambda: pipeline.inflight.alone, "the proxy to be alone again"))
    finally:
        proxy.stop()
        app.stop()
    assert free_while_alone
    assert taken is None  # held by the lone proxy since the newcomer came
    assert freed and answer[-1]["choices"][0]["finish_reason"] == "stop"
    assert len(wire.requests) == 1


def test_a_call_begun_in_a_lone_proxy_is_made_once_when_a_second_proxy_starts_and_makes_it(
    loop_thread: LoopThread, tmp_path: Path
) -> None:
    wire = OpenAIWire()
    wire.gate = asyncio.Event()
    app = RunningApp(loop_thread, wire.app()).start()
    recordings = tmp_path / "recordings"
    first = _record(app, recordings)
    second: CliProxy | None = None

    async def drive() -> tuple[list[dict], list[dict], int]:
        nonlocal second
        async with aiohttp.ClientSession() as session:
            # A distinct call first: the first proxy has announced itself, alone, before the shared one.
            await _stream_released(session, first.url, "warm up", wire)
            via_first = asyncio.create_task(_stream(session, first.url, "begun alone"))
            await async_wait_until(lambda: _upstream_calls(wire, "begun alone"), "the first proxy's upstream call")
            second = await asyncio.to_thread(_record, app, recordings)  # starts while the call is in flight
            via_second = asyncio.create_task(_stream(session, second.url, "begun alone"))
            await asyncio.to_thread(second.wait_for_event, WAITING)
            held = _upstream_calls(wire, "begun alone")
            wire.gate.set()
            return await via_first, await via_second, held

    try:
        answer_a, answer_b, held = loop_thread.run(drive(), timeout=120)
    finally:
        events_b = second.stop() if second is not None else []
        first.stop()
        app.stop()
    assert held == 1 and _upstream_calls(wire, "begun alone") == 1
    assert answer_a == answer_b and answer_a[-1]["choices"][0]["finish_reason"] == "stop"
    assert any(e["event"] == SERVED for e in events_b)
    assert len(files_under(recordings)) == 2  # the warm-up and the shared call


async def _stream_released(session: aiohttp.ClientSession, url: str, content: str, wire: OpenAIWire) -> list[dict]:
    """A call the test does not hold: the gate is opened for it and closed again after."""
    gate = wire.gate
    wire.gate = None
    try:
        return await _stream(session, url, content)
    finally:
        wire.gate = gate


def test_after_the_other_proxy_is_killed_a_proxy_is_alone_again_and_shares_with_the_next_one(
    loop_thread: LoopThread, tmp_path: Path
) -> None:
    wire = OpenAIWire()
    app = RunningApp(loop_thread, wire.app()).start()
    recordings = tmp_path / "recordings"
    first, second = _record(app, recordings), _record(app, recordings)
    third: CliProxy | None = None

    async def shared_once(session: aiohttp.ClientSession, a: CliProxy, b: CliProxy, content: str, waits: int) -> int:
        wire.gate = asyncio.Event()
        via_a = asyncio.create_task(_stream(session, a.url, content))
        await async_wait_until(lambda: _upstream_calls(wire, content), f"{content}: the upstream call")
        via_b = asyncio.create_task(_stream(session, b.url, content))
        await asyncio.to_thread(b.wait_for_event, WAITING, waits)
        held = _upstream_calls(wire, content)
        wire.gate.set()
        answers = [await via_a, await via_b]
        assert answers[0] == answers[1]
        return held

    async def drive() -> tuple[int, int]:
        nonlocal third
        async with aiohttp.ClientSession() as session:
            held_two = await shared_once(session, first, second, "with the second", 1)
            second.process.kill()  # no goodbye: the kernel closes its connections
            await asyncio.to_thread(first.wait_for_event, ALONE_AGAIN)
            wire.gate = None
            await _stream(session, first.url, "alone again")  # begun and ended with no lock
            third = await asyncio.to_thread(_record, app, recordings)
            held_three = await shared_once(session, first, third, "with the third", 1)
            return held_two, held_three

    try:
        held_two, held_three = loop_thread.run(drive(), timeout=120)
    finally:
        second.process.kill()
        second.process.wait(15)
        events_c = third.stop() if third is not None else []
        events_a = first.stop()
        app.stop()
    assert held_two == 1 and held_three == 1
    assert _upstream_calls(wire, "with the second") == 1 and _upstream_calls(wire, "with the third") == 1
    assert any(e["event"] == SERVED for e in events_c)
    assert [e["event"] for e in events_a].count(GREETED) == 2  # by the second, then by the third


def test_two_proxies_making_the_same_first_call_at_once_make_it_once(loop_thread: LoopThread, tmp_path: Path) -> None:
    """Neither has announced itself yet: whichever order they look in, one finds the other."""
    wire = OpenAIWire()
    wire.gate = asyncio.Event()
    app = RunningApp(loop_thread, wire.app()).start()
    recordings = tmp_path / "recordings"
    proxies = [_record(app, recordings), _record(app, recordings)]

    def someone_waits() -> bool:
        return any(e["event"] == WAITING for proxy in proxies for e in proxy.events())

    async def drive() -> tuple[list[list[dict]], int]:
        async with aiohttp.ClientSession() as session:
            calls = [asyncio.create_task(_stream(session, proxy.url, "at once")) for proxy in proxies]
            await async_wait_until(lambda: wire.requests and someone_waits(), "one call upstream, one waiting")
            held = len(wire.requests)
            wire.gate.set()
            return list(await asyncio.gather(*calls)), held

    try:
        answers, held = loop_thread.run(drive(), timeout=120)
    finally:
        for proxy in proxies:
            proxy.stop()
        app.stop()
    assert held == 1 and len(wire.requests) == 1
    assert answers[0] == answers[1] and answers[0][-1]["choices"][0]["finish_reason"] == "stop"
    assert len(files_under(recordings)) == 1
