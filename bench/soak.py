"""Load/soak: 64 concurrent streaming clients for a while against record, then replay.

    python -m bench.soak --duration 60

Reports, per mode: requests, errors (status or byte mismatch), invalid recording files, and
the proxy's RSS and open file descriptors after warm-up and at the end. Not part of the test
suite: it runs for minutes and measures a machine, not a behaviour.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from bench.common import Spec, expected_bytes, free_port, open_fds, rss_mb, use_uvloop
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds per mode")
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    use_uvloop()
    asyncio.run(main_async(args.duration, args.concurrency))


if __name__ == "__main__":
    main()
