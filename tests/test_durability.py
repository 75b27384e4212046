"""Nothing forwarded is lost: SIGTERM under load, kill -9 under load then a restart, a slow disk.

Every request carries a nonce in its body, so each answered request is matched with its file.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import aiohttp
import orjson
import pytest

from llmproxy.store.directory import RecordingStore
from llmproxy.store.journal import Journal, Target, journals, recover
from tests.support import (
    CliProxy,
    LoopThread,
    RunningApp,
    assert_no_secret,
    async_wait_until,
    children_of,
    start_proxy,
    wait_until,
)
from tests.upstreams.openai_wire import OpenAIWire


def _body(number: int, *, stream: bool, size: int = 0) -> dict:
    content = f"nonce-{number:05d} " + "y" * size
    return {"model": "gpt-4o", "messages": [{"role": "user", "content": content}], "stream": stream}


KEY = "sk-proj-journalsecret0123456789abcdefABCDEF"


async def _fire(url: str, count: int, answered: list[int], *, stream: bool, limit: int = 0, size: int = 0) -> None:
    """`count` distinct calls at once; `answered` gets the number of each whose whole response arrived."""

    async def one(session: aiohttp.ClientSession, number: int) -> None:
        try:
            async with session.post(url + "/v1/chat/completions", json=_body(number, stream=stream, size=size)) as r:
                data = await r.read()
        except aiohttp.ClientError:
            return  # refused or cut by the stop: never answered
        assert r.status == 200, data
        assert data.endswith(b"data: [DONE]\n\n") if stream else orjson.loads(data)["choices"]
        answered.append(number)

    headers = {"Authorization": f"Bearer {KEY}"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit), headers=headers) as session:
        await asyncio.gather(*(one(session, n) for n in range(count)))


def _nonces_on_disk(recordings: Path) -> list[int]:
    found = []
    for path in recordings.rglob("*.json"):
        content = orjson.loads(path.read_bytes())["request"]["body"]["messages"][0]["content"]
        found.append(int(content.split()[0].removeprefix("nonce-")))
    return sorted(found)


def _writer_config(tmp_path: Path, writer: str) -> Path:
    config = tmp_path / "llmproxy.toml"
    config.write_text(f'[proxy]\nwriter = "{writer}"\n')
    return config


@pytest.mark.parametrize("writer", ["process", "thread"])
def test_sigterm_under_load_on_a_slow_disk_writes_every_answered_exchange(
    loop_thread: LoopThread, tmp_path: Path, writer: str
) -> None:
    wire = OpenAIWire()
    wire.chunk_delay = 0.002
    app = RunningApp(loop_thread, wire.app()).start()
    recordings = tmp_path / "recordings"
    config = ["--config", str(_writer_config(tmp_path, writer))]
    # 20 ms per file: the writer is far behind the clients when SIGTERM comes.
    proxy = CliProxy(
        "record", "--upstream", app.url, "--recordings", str(recordings), "--port", "0", *config, slowdisk="0.02"
    )
    answered: list[int] = []
    try:
        future = asyncio.run_coroutine_threadsafe(_fire(proxy.url, 150, answered, stream=True), loop_thread.loop)
        wait_until(lambda: len(answered) >= 40, "40 answers while the rest are in flight")
        events = proxy.stop()  # SIGTERM
        future.result(60)
    finally:
        app.stop()
    assert proxy.process.returncode == 0
    assert 40 <= len(answered)
    assert _nonces_on_disk(recordings) == sorted(answered)
    summary = next(e for e in events if e["event"] == "summary")
    assert summary["recorded"] == len(answered)
    assert any(e["event"] == "shutting down: writing queued recordings" for e in events)
    assert journals(recordings) == []  # everything written: the journal is gone


@pytest.mark.parametrize(
    ("recover_with", "writer"), [("restart", "process"), ("restart", "thread"), ("check --fix", "process")]
)
def test_kill_9_under_load_then_a_restart_recovers_every_acknowledged_exchange(
    loop_thread: LoopThread, tmp_path: Path, recover_with: str, writer: str
) -> None:
    wire = OpenAIWire()
    app = RunningApp(loop_thread, wire.app()).start()
    recordings = tmp_path / "recordings"
    config = ["--config", str(_writer_config(tmp_path, writer))]
    # A disk that never publishes a file: what clients got exists only in the journal.
    proxy = CliProxy(
        "record", "--upstream", app.url, "--recordings", str(recordings), "--port", "0", *config, slowdisk="stuck"
    )
    writers = children_of(proxy.process.pid)
    assert len(writers) == (1 if writer == "process" else 0)
    answered: list[int] = []
    try:
        future = asyncio.run_coroutine_threadsafe(
            _fire(proxy.url, 120, answered, stream=False, limit=16), loop_thread.loop
        )
        wait_until(lambda: len(answered) >= 30, "30 answers")
        proxy.process.send_signal(signal.SIGKILL)
        proxy.process.wait(10)
        future.result(30)
        acknowledged = sorted(answered)
        assert len(acknowledged) < 120  # killed under load
        assert _nonces_on_disk(recordings) == []  # nothing reached its file before the kill
        assert len(journals(recordings)) == 1
        assert_no_secret(recordings, KEY)  # the journal holds what the recordings will: no credential
        if recover_with == "check --fix":
            command = [sys.executable, "-m", "llmproxy", "check", str(recordings)]
            unfixed = subprocess.run(command, capture_output=True, text=True)
            assert unfixed.returncode == 1 and "journal of a proxy that was killed" in unfixed.stdout
            fixed = subprocess.run([*command, "--fix"], capture_output=True, text=True)
            assert fixed.returncode == 0, fixed.stdout + fixed.stderr
            assert set(acknowledged) <= set(_nonces_on_disk(recordings))
            assert journals(recordings) == []
        # The next start (here a replay) writes the journal's recordings, then serves them.
        replay = CliProxy("replay", "--recordings", str(recordings), "--port", "0", "--allow-empty")
        try:
            assert set(acknowledged) <= set(_nonces_on_disk(recordings))
            assert journals(recordings) == []
            replayed = loop_thread.run(_one(replay.url, acknowledged[0]))
        finally:
            events = replay.stop()
    finally:
        app.stop()
        for pid in writers:  # its disk is stuck for good: the orphaned file writer never ends
            os.kill(pid, signal.SIGKILL)
    assert replayed == wire.sent[[r["body"] for r in wire.requests].index(_body(acknowledged[0], stream=False))]
    if recover_with == "restart":
        recovered = next(e for e in events if e["event"].startswith("recovered recordings from the journal"))
        assert recovered["written"] >= len(acknowledged) and recovered["failed"] == 0


async def _one(url: str, number: int) -> bytes:
    async with aiohttp.ClientSession() as session:
        async with session.post(url + "/v1/chat/completions", json=_body(number, stream=False)) as response:
            assert response.status == 200
            return await response.read()


@pytest.mark.parametrize("writer", ["process", "thread"])
def test_overload_on_a_stuck_disk_waits_before_the_upstream_and_loses_nothing(
    loop_thread: LoopThread, tmp_path: Path, writer: str
) -> None:
    wire = OpenAIWire()
    app = RunningApp(loop_thread, wire.app()).start()
    recordings = tmp_path / "recordings"
    bound = 256 * 1024
    proxy = start_proxy(
        loop_thread, "record", recordings, upstream=app.url, max_pending_mb=bound / 1024 / 1024, writer=writer
    )
    recorder = proxy.server.pipeline.recorder
    assert recorder is not None
    if writer == "process":
        pid = recorder.writer_pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)  # the file writer process takes nothing until continued

        def release() -> None:
            os.kill(pid, signal.SIGCONT)
    else:
        assert recorder.writer_pid is None
        disk = threading.Event()
        recorder.before_write = disk.wait  # the disk takes nothing until released
        release = disk.set
    answered: list[int] = []
    count, connections, size = 64, 8, 16 * 1024
    try:
        future = asyncio.run_coroutine_threadsafe(
            _fire(proxy.url, count, answered, stream=False, limit=connections, size=size), loop_thread.loop
        )

        def settled() -> bool:
            # Every connection's call waits for room, every call sent upstream was answered: nothing moves.
            return recorder.waiting == connections and len(answered) == len(wire.requests)

        async def check() -> tuple[int, int]:
            await async_wait_until(settled, "the queue to fill and the rest to wait")
            return len(wire.requests), recorder.pending_bytes

        sent, pending = loop_thread.run(check())
        # Backpressure held the rest before the upstream; what is queued is the bound plus at most
        # one exchange per connection that passed before it filled (a body and its recording each).
        assert sent < count
        assert bound < pending <= bound + connections * 6 * size
        assert _nonces_on_disk(recordings) == []
        release()
        future.result(60)
    finally:
        release()
        proxy.stop()
        app.stop()
    assert sorted(answered) == list(range(count))
    assert _nonces_on_disk(recordings) == list(range(count))
    assert journals(recordings) == []


def test_a_torn_journal_tail_is_dropped_and_done_entries_are_not_rewritten(tmp_path: Path) -> None:
    """What a kill mid-append leaves: the complete entries are recovered, the torn one (never
    acknowledged) is dropped, entries marked done are not written again."""
    store = RecordingStore(tmp_path)
    journal = Journal(tmp_path)
    documents = [{"request": {"sequence": 1, "n": n}, "response": {}} for n in range(3)]
    targets = [Target("openai", "/v1/chat/completions", "gpt-4o", str(n + 1) * 64, 1) for n in range(3)]
    entries = journal.append_many([(t, store.serialize(d)) for t, d in zip(targets, documents, strict=True)])
    journal.done([entries[1]])
    path = journal.path
    with path.open("ab") as handle:  # a header and half a body: killed mid-append
        handle.write(b'{"id":99,"size":500,"route":"openai","path":"/x","model":null,"key":"' + b"f" * 64)
        handle.write(b'","sequence":1}\n{"request"')
    journal._fd, fd = -1, journal._fd  # the process dies holding it: its lock goes with it
    os.close(fd)
    result = recover(store)
    written = sorted(p.name for p in tmp_path.rglob("*.json"))
    assert (result.written, result.failed) == (2, 0)
    assert written == sorted(targets[n].relative(store).name for n in (0, 2))
    assert not path.exists()
