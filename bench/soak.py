"""Load/soak: 64 concurrent streaming clients for a while against record, then replay; then chaos.

    python -m bench.soak --duration 60                           # steady, then 5 minutes of chaos
    python -m bench.soak --phase chaos --chaos-duration 120

Chaos: clients leave mid-answer at random, the upstream resets, pauses and stalls past
read_timeout, and hostile files (a FIFO, a symlink to /dev/zero, a 2 GB sparse file, JSON nested
100,000 deep, a symlink out of the directory) land in the directory while replaying (then a fresh
replay loads them). It reports lost recordings (answers the upstream sent whole that have no
file), invalid files, tracebacks in the proxy's log, and RSS/fds along the way.

Reports, per mode: requests, errors (status or byte mismatch), invalid recording files, and
the proxy's RSS and open file descriptors after warm-up and at the end. Not part of the test
suite: it runs for minutes and measures a machine, not a behaviour.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from bench.common import (
    REPO,
    Spec,
    expected_bytes,
    free_port,
    open_fds,
    rss_mb,
    salt_of,
    sse_events,
    stop,
    use_uvloop,
    wait_for_port,
)
from bench.run import Target, llmproxy_target
from llmproxy.config import load_settings
from llmproxy.store.directory import RecordingStore
from llmproxy.store.index import RecordingIndex

SPEC = Spec("sse", chunks=40)
DISTINCT = 256


async def hammer(url: str, duration: float, concurrency: int) -> tuple[int, list[str]]:
    bodies = [SPEC.request_body(f"soak-{i}") for i in range(DISTINCT)]
    expected = [expected_bytes(SPEC, f"soak-{i}") for i in range(DISTINCT)]
    errors: list[str] = []
    done = 0
    deadline = time.monotonic() + duration

    async def worker(number: int) -> None:
        nonlocal done
        turn = number
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            while time.monotonic() < deadline:
                which = turn % DISTINCT
                turn += concurrency
                try:
                    async with session.post(
                        url + "/v1/chat/completions", data=bodies[which], headers={"Content-Type": "application/json"}
                    ) as response:
                        body = await response.read()
                        if response.status != 200 or body != expected[which]:
                            errors.append(f"#{which}: status {response.status}, {len(body)} bytes")
                except (TimeoutError, aiohttp.ClientError) as exc:
                    errors.append(f"#{which}: {type(exc).__name__} {exc}")
                done += 1

    await asyncio.gather(*(worker(n) for n in range(concurrency)))
    return done, errors


def invalid_files(directory: Path) -> int:
    index = RecordingIndex(load_settings(None, {}).router(), keep_recordings=True, cache_bytes=0)
    store = RecordingStore(directory)
    bad = 0
    for path in store.paths():
        try:
            index.rendered(index.load_document(store.read(path), path))
        except Exception:  # noqa: BLE001 - any failure makes the file invalid for this report
            bad += 1
    return bad + len([p for p in directory.rglob("*.tmp")])


async def soak(target: Target, duration: float, concurrency: int) -> dict[str, object]:
    await hammer(target.url, 2, concurrency)  # warm-up
    assert target.process is not None
    pid = target.process.pid
    start_rss, start_fds = rss_mb(pid), open_fds(pid)
    first_half, errors = await hammer(target.url, duration / 2, concurrency)
    middle_rss = rss_mb(pid)
    second_half, more_errors = await hammer(target.url, duration / 2, concurrency)
    await asyncio.sleep(1)  # let closed client connections finish closing on the server side
    errors += more_errors
    return {
        "mode": target.name,
        "requests": first_half + second_half,
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "rss_mb": (round(start_rss, 1), round(middle_rss, 1), round(rss_mb(pid), 1)),
        "open_fds": (start_fds, open_fds(pid)),
    }


async def main_async(duration: float, concurrency: int) -> None:
    with tempfile.TemporaryDirectory(prefix="llmproxy-soak-") as tmp:
        upstream = Target("upstream", ["-m", "bench.upstream", "--port", str(u := free_port())], u)
        upstream.start()
        record = llmproxy_target("record", "record", tmp, upstream.url)
        record.start()
        try:
            results = [await soak(record, duration, concurrency)]
            record.stop()
            results[0]["invalid_files"] = invalid_files(Path(tmp))
            results[0]["files"] = sum(1 for _ in Path(tmp).rglob("*.json"))
        finally:
            upstream.stop()
            record.stop()
        replay = llmproxy_target("replay", "replay", tmp)
        replay.start()
        try:
            results.append(await soak(replay, duration, concurrency))
        finally:
            replay.stop()
    print(f"{concurrency} concurrent streams of {SPEC.chunks} chunks, {duration:.0f} s per mode")
    print("| mode | requests | errors | invalid files | RSS start → half-time → end (MB) | open fds start → end |")
    print("|---|---|---|---|---|---|")
    for result in results:
        rss, fds = result["rss_mb"], result["open_fds"]
        print(
            f"| {result['mode']} | {result['requests']} | {result['errors']} | {result.get('invalid_files', '-')} "
            f"| {rss[0]} → {rss[1]} → {rss[2]} | {fds[0]} → {fds[1]} |"
        )  # type: ignore[index]
        if result["first_error"]:
            print(f"  first error: {result['first_error']}", file=sys.stderr)


# -- chaos -------------------------------------------------------------------------------------

CHAOS_CONFIG = """[proxy]
read_timeout = 3
shutdown_timeout = 10
header_timeout = 5
body_timeout = 5
"""


class ChaosUpstream:
    """An OpenAI-style SSE upstream that misbehaves as each request's salt says: answers whole,
    pauses mid-stream (under read_timeout: still whole), stalls past read_timeout, or resets
    mid-stream. It counts the answers it sent whole: each must become one recording."""

    def __init__(self) -> None:
        self.whole: set[str] = set()
        self.behaviours: dict[str, int] = {}
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        self.runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = self.runner.addresses[0][1]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        salt = salt_of(body)
        behaviour = random.Random(salt).choices(["whole", "pause", "stall", "reset"], [70, 12, 8, 10])[0]
        self.behaviours[behaviour] = self.behaviours.get(behaviour, 0) + 1
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await response.prepare(request)
        events = sse_events(CHAOS_SPEC, salt)
        half = len(events) // 2
        await response.write(b"".join(events[:half]))
        if behaviour == "reset":
            assert request.transport is not None
            request.transport.abort()
            return response
        if behaviour == "pause":
            await asyncio.sleep(1.0)  # under the proxy's read_timeout (3 s)
        elif behaviour == "stall":
            await asyncio.sleep(30)  # past read_timeout: the proxy gives up (and is cancelled here)
        await response.write(b"".join(events[half:]))
        await response.write_eof()
        self.whole.add(salt)
        return response


CHAOS_SPEC = Spec("sse", chunks=20)


class LoggedProxy:
    """`python -m llmproxy MODE` with its log (JSON) in a file, read at the end for tracebacks."""

    def __init__(self, mode: str, recordings: Path, config: Path, log: Path, upstream: str | None = None) -> None:
        self.port = free_port()
        args = ["-m", "llmproxy", mode, "--recordings", str(recordings), "--port", str(self.port)]
        args += ["--config", str(config), "--log-json", "--log-level", "warning"]
        args += ["--upstream", upstream] if upstream else []
        self.log = log
        with log.open("ab") as handle:
            self.process = subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=subprocess.DEVNULL, stderr=handle)
        wait_for_port(self.port, process=self.process)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def sample(self, settle: float = 4.0) -> tuple[float, int]:
        """RSS (MB) and open descriptors once calls still draining (read_timeout 3 s) are done."""
        await asyncio.sleep(settle)
        return round(rss_mb(self.process.pid), 1), open_fds(self.process.pid)

    def stop(self) -> int:
        stop(self.process)
        return self.process.returncode


async def chaos_clients(
    url: str,
    duration: float,
    concurrency: int,
    salts: Callable[[random.Random], str],
    expected: Callable[[str], bytes | None],
) -> dict[str, int]:
    """Clients that read whole answers or leave at a random point; counts what they saw."""
    counts = {"requests": 0, "left_early": 0, "whole": 0, "mismatch": 0, "misses": 0, "errors": 0}
    deadline = time.monotonic() + duration

    async def worker(number: int) -> None:
        rng = random.Random(number)
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(force_close=True)) as session:
            while time.monotonic() < deadline:
                salt = salts(rng)
                counts["requests"] += 1
                leave = rng.random() < 0.3
                try:
                    async with session.post(
                        url + "/v1/chat/completions",
                        data=CHAOS_SPEC.request_body(salt),
                        headers={"Content-Type": "application/json"},
                    ) as response:
                        if response.status == 404:
                            counts["misses"] += 1
                            await response.read()
                            continue
                        if leave:
                            await response.content.readany()
                            response.close()  # gone mid-answer
                            counts["left_early"] += 1
                            continue
                        body = await response.read()
                        want = expected(salt)
                        if response.status == 200 and (want is None or body == want):
                            counts["whole"] += 1
                        elif response.status == 200:
                            counts["mismatch"] += 1
                        else:
                            counts["errors"] += 1  # 502/504 from upstream faults: expected in record
                except (TimeoutError, aiohttp.ClientError):
                    counts["errors"] += 1  # a reset upstream cuts the client off too

    await asyncio.gather(*(worker(n) for n in range(concurrency)))
    return counts


def drop_hostile_files(directory: Path) -> list[str]:
    """What a hostile or careless user leaves in a recordings directory."""
    hostile = directory / "hostile"
    hostile.mkdir(exist_ok=True)
    os.mkfifo(hostile / "fifo.json")
    (hostile / "zero.json").symlink_to("/dev/zero")
    with (hostile / "sparse.json").open("wb") as handle:
        handle.truncate(2 * 1024 * 1024 * 1024)  # 2 GB of nothing, no disk used
    depth = 100_000
    (hostile / "deep.json").write_text("[" * depth + "]" * depth)
    (hostile / "outside.json").symlink_to("/etc/passwd")
    return ["fifo", "symlink to /dev/zero", "2 GB sparse", f"nested {depth} deep", "symlink outside"]


def _log_facts(log: Path) -> dict[str, int]:
    text = log.read_text(errors="replace")
    events = []
    for line in text.splitlines():
        try:
            events.append(orjson.loads(line))
        except orjson.JSONDecodeError:
            continue
    return {
        "tracebacks": text.count("Traceback"),
        "internal_errors": sum(1 for e in events if e.get("event") == "internal error"),
        "skipped_at_load": sum(1 for e in events if e.get("event") == "recording skipped"),
        "log_lines": len(text.splitlines()),
    }


async def chaos(duration: float, concurrency: int) -> dict[str, Any]:
    """Record under upstream chaos and leaving clients, then replay while hostile files land."""
    with tempfile.TemporaryDirectory(prefix="llmproxy-chaos-") as tmp:
        root = Path(tmp)
        recordings, config, log = root / "recordings", root / "llmproxy.toml", root / "proxy.log"
        config.write_text(CHAOS_CONFIG)
        upstream = ChaosUpstream()
        await upstream.start()
        counter = iter(range(10**9))
        record = LoggedProxy("record", recordings, config, log, f"http://127.0.0.1:{upstream.port}")
        try:
            samples = [await record.sample()]
            half = await chaos_clients(
                record.url, duration / 4, concurrency, lambda _rng: f"chaos-{next(counter)}", lambda _s: None
            )
            samples.append(await record.sample())
            rest = await chaos_clients(
                record.url, duration / 4, concurrency, lambda _rng: f"chaos-{next(counter)}", lambda _s: None
            )
            samples.append(await record.sample())
        finally:
            record_status = record.stop()
            await upstream.stop()
        files = [p for p in recordings.rglob("*.json") if p.is_file()]
        recorded_salts = set()
        for path in files:
            body = orjson.loads(path.read_bytes())["request"]["body"]
            recorded_salts.add(salt_of(body))
        lost = sorted(upstream.whole - recorded_salts)
        result: dict[str, Any] = {
            "record": {k: half[k] + rest[k] for k in half},
            "upstream": dict(upstream.behaviours),
            "answered_whole_upstream": len(upstream.whole),
            "files": len(files),
            "lost_recordings": len(lost),
            "invalid_files": invalid_files(recordings),
            "record_rss_fds": samples,
            "record_exit": record_status,
        }
        known = sorted(recorded_salts)
        expected = {salt: expected_bytes(CHAOS_SPEC, salt) for salt in known}

        def pick(rng: random.Random) -> str:
            return rng.choice(known) if known and rng.random() < 0.9 else f"never-{rng.random()}"

        replay = LoggedProxy("replay", recordings, config, log)
        replay_samples = [await replay.sample()]
        try:
            dropper = asyncio.get_running_loop().run_in_executor(None, drop_hostile_files, recordings)
            first = await chaos_clients(replay.url, duration / 4, concurrency, pick, expected.get)
            result["hostile_files"] = await dropper
            replay_samples.append(await replay.sample())
        finally:
            replay_status = [replay.stop()]
        # A fresh replay loads the directory with the hostile files in it.
        replay = LoggedProxy("replay", recordings, config, log)
        try:
            replay_samples.append(await replay.sample())
            second = await chaos_clients(replay.url, duration / 4, concurrency, pick, expected.get)
            replay_samples.append(await replay.sample())
        finally:
            replay_status.append(replay.stop())
        result["replay"] = {k: first[k] + second[k] for k in first}
        result["replay_rss_fds"] = replay_samples
        result["replay_exit"] = replay_status
        result["log"] = _log_facts(log)
        return result


def print_chaos(result: dict[str, Any], duration: float, concurrency: int) -> None:
    print(f"chaos: {concurrency} clients, {duration:.0f} s (record half, replay half)")
    for key, value in result.items():
        print(f"  {key}: {value}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds per mode")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--phase", choices=["steady", "chaos", "all"], default="all")
    parser.add_argument("--chaos-duration", type=float, default=300.0, help="seconds of the chaos phase in all")
    parser.add_argument("--chaos-concurrency", type=int, default=16)
    args = parser.parse_args()
    use_uvloop()
    if args.phase in ("steady", "all"):
        asyncio.run(main_async(args.duration, args.concurrency))
    if args.phase in ("chaos", "all"):
        result = asyncio.run(chaos(args.chaos_duration, args.chaos_concurrency))
        print_chaos(result, args.chaos_duration, args.chaos_concurrency)


if __name__ == "__main__":
    main()
