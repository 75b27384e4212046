"""Sustained overload of `llmproxy record`: memory, then nothing lost at SIGTERM or after SIGKILL.

    python -m bench.overload --duration 60 [--dir /tmp]

Distinct small JSON calls from 64 clients for `duration` seconds against `llmproxy record` writing
into a directory under `--dir` (on this machine /tmp creates files ~15x slower than /work: the
writer falls behind, which is the point). RSS is sampled every 5 s. Then the proxy is stopped:

    sigterm   every answered request must have its file once the proxy has exited
    sigkill   every answered request must have its file after the next start recovers the journal
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from bench.common import Spec, children, expected_bytes, free_port, settle_disk, start, stop, wait_for_port
from bench.run import Target, llmproxy_target

SPEC = Spec("json")


async def overload(target: Target, duration: float, concurrency: int) -> dict[str, object]:
    answered = 0
    errors: list[str] = []
    samples: list[float] = []
    deadline = time.monotonic() + duration
    url = target.url + "/v1/chat/completions"
    run = time.time_ns()

    async def worker(number: int) -> None:
        nonlocal answered
        turn = 0
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                salt = f"overload-{run}-{number}-{turn}"
                turn += 1
                try:
                    async with session.post(
                        url, data=SPEC.request_body(salt), headers={"Content-Type": "application/json"}
                    ) as response:
                        data = await response.read()
                except aiohttp.ClientError as exc:
                    errors.append(str(exc))
                    continue
                if response.status != 200 or data != expected_bytes(SPEC, salt):
                    errors.append(f"status {response.status}")
                    continue
                answered += 1

    async def sample() -> None:
        while time.monotonic() < deadline:
            samples.append(round(target.rss(), 1))
            await asyncio.sleep(5)

    idle = round(target.rss(), 1)
    await asyncio.gather(sample(), *(worker(n) for n in range(concurrency)))
    return {"answered": answered, "errors": len(errors), "idle_rss_mb": idle, "rss_mb": samples}


def files(directory: Path) -> int:
    return sum(1 for p in directory.rglob("*.json") if not p.name.startswith("."))


async def main_async(args: argparse.Namespace) -> None:
    upstream = Target("direct", ["-m", "bench.upstream", "--port", str(port := free_port())], port)
    upstream.start()
    try:
        for how in args.stop:
            print(f"disk: {settle_disk()}", file=sys.stderr)
            with tempfile.TemporaryDirectory(prefix="llmproxy-overload-", dir=args.dir) as tmp:
                record = llmproxy_target("record", "record", tmp, upstream.url)
                record.start()
                result = await overload(record, args.duration, args.concurrency)
                assert record.process is not None
                started = time.monotonic()
                if how == "sigterm":
                    stop(record.process)
                else:
                    writers = children(record.process.pid)
                    record.process.send_signal(signal.SIGKILL)
                    record.process.wait()
                    result["files_at_kill"] = files(Path(tmp))
                    # The orphaned file writer writes what it was handed, then exits.
                    while any(Path(f"/proc/{pid}").exists() for pid in writers):
                        await asyncio.sleep(0.05)
                result["stopped_s"] = round(time.monotonic() - started, 1)
                result["files_at_exit"] = files(Path(tmp))
                if how == "sigkill":  # the next start writes what the journal holds
                    port = free_port()
                    replay = start(
                        ["-m", "llmproxy", "replay", "--recordings", tmp, "--port", str(port), "--allow-empty"], port
                    )
                    wait_for_port(port, process=replay)
                    stop(replay)
                    result["files_after_restart"] = files(Path(tmp))
                final = result.get("files_after_restart", result["files_at_exit"])
                result["lost"] = max(0, int(result["answered"]) - int(final))  # type: ignore[arg-type]
                print(f"{how}: {result}", flush=True)
    finally:
        upstream.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--dir", default=None, help="where recordings go (default: the temp directory)")
    parser.add_argument("--stop", nargs="*", default=["sigterm", "sigkill"], choices=["sigterm", "sigkill"])
    args = parser.parse_args()
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
