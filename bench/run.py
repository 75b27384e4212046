"""The benchmark: llmproxy against a minimal pass-through proxy and a bare in-memory handler.

    python -m bench.run                 # full run (a few minutes on 2 cores)
    python -m bench.run --rounds 1 --quick

Every target is measured in the same run, round after round (targets interleaved, so drift on
a noisy machine hits them alike), and the table reports medians over rounds as ratios:

    record  vs  pass-through   (llmproxy record does more work; the fast path must keep up)
    record  vs  refproxy-tee   (the pass-through writing one file per response: the naive recorder)
    replay  vs  bare handler   (the same bytes from memory, no routing, no matching)

and splits record's CPU in two: forwarding (llmproxy replay --on-miss forward on an empty
directory: the same routing, keying and upstream client, nothing recorded) and the recording's
own cost (record − forward), beside the tee's (tee − pass-through).

Record-side targets get a distinct body per request (as real traffic), and a round ends only
once every response is a file on disk (files counted against requests): throughput and CPU per
request include the writing.

Every response is checked byte for byte. Loading 10,000 and 100,000 generated recordings is
timed separately (`--loading`), with the time to the first served request.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from bench.common import Spec, cpu_seconds, free_port, rss_mb, settle_disk, start, stop
from bench.loadgen import Result, Scenario, drive, percentile

SCENARIOS = [
    Scenario("json-c1", Spec("json"), 1, 300),
    Scenario("json-c16", Spec("json"), 16, 1000),
    Scenario("json-c64", Spec("json"), 64, 1000),
    Scenario("sse100-c16", Spec("sse", chunks=100), 16, 300),
    Scenario("paced-c16", Spec("sse", chunks=20, delay_ms=20), 16, 64),
    Scenario("json1mb-c4", Spec("json", size=1_000_000), 4, 40, distinct=8),
    Scenario("sse5000-c10", Spec("sse", chunks=5000), 10, 10, distinct=10),
]
QUICK = [
    Scenario("json-c16", Spec("json"), 16, 400),
    Scenario("sse100-c16", Spec("sse", chunks=100), 16, 100),
    Scenario("paced-c16", Spec("sse", chunks=10, delay_ms=20), 16, 32),
]


class Target:
    def __init__(self, name: str, args: list[str] | None, port: int, recordings: str | None = None) -> None:
        self.name, self.args, self.port = name, args, port
        # A recording target: a round ends when this directory holds one file per request.
        self.recordings = Path(recordings) if recordings else None
        self.process: subprocess.Popen | None = None

    def files(self) -> int:
        if self.recordings is None:
            return 0
        count = 0
        for _, subdirs, names in os.walk(self.recordings):
            subdirs[:] = [d for d in subdirs if not d.startswith(".")]
            count += sum(1 for name in names if not name.startswith(".") and not name.endswith(".tmp"))
        return count

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        if self.args is not None:
            self.process = start(self.args, self.port)

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)

    def cpu(self) -> float:
        return cpu_seconds(self.process.pid) if self.process else 0.0

    def rss(self) -> float:
        return rss_mb(self.process.pid) if self.process else 0.0


def llmproxy_target(name: str, mode: str, recordings: str, upstream: str | None = None) -> Target:
    """`python -m llmproxy MODE` on a free port, logging only warnings."""
    port = free_port()
    args = ["-m", "llmproxy", mode, "--recordings", recordings, "--port", str(port), "--log-level", "warning"]
    return Target(name, args + (["--upstream", upstream] if upstream else []), port, recordings if upstream else None)


async def measure(target: Target, scenario: Scenario) -> dict[str, Any]:
    timeout = aiohttp.ClientTimeout(total=300)
    connector = aiohttp.TCPConnector(limit=0)
    if target.recordings is not None:
        scenario = Scenario(scenario.name, scenario.spec, scenario.concurrency, scenario.requests, unique=True)
    files_before = target.files()
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        cpu_before = target.cpu()
        result: Result = await drive(session, target.url, scenario)
        if target.recordings is not None:  # the round is over when every exchange is on disk
            started = time.perf_counter()
            while target.files() < files_before + scenario.requests:
                if time.perf_counter() - started > 300:
                    raise SystemExit(f"{target.name} {scenario.name}: {target.files() - files_before} files written")
                await asyncio.sleep(0.005)
            result.wall += time.perf_counter() - started
        cpu_used = target.cpu() - cpu_before
    if result.errors:
        raise SystemExit(f"{target.name} {scenario.name}: {len(result.errors)} errors, first: {result.errors[0]}")
    count = len(result.latencies)
    return {
        "throughput": result.throughput,
        "p50_ms": percentile(result.latencies, 0.5) * 1000,
        "p99_ms": percentile(result.latencies, 0.99) * 1000,
        "ttfb_ms": percentile(result.ttfb, 0.5) * 1000,
        "cpu_ms": cpu_used / count * 1000 if count and target.process else float("nan"),
    }


# A replay round is this many requests at least: 10 streams replayed from memory take a few
# milliseconds, too short to time on a noisy machine; 300 requests (~0.1 s) left each round's
# fixed costs (16 new connections, the loop waking up) weighing 5 to 10%.
REPLAY_MIN_REQUESTS = 1000


def replay_scenario(scenario: Scenario) -> Scenario:
    requests = max(scenario.requests, REPLAY_MIN_REQUESTS)
    return Scenario(scenario.name, scenario.spec, scenario.concurrency, requests, scenario.distinct)


def median_of(rounds: list[dict[str, Any]]) -> dict[str, float]:
    return {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}


async def run_rounds(targets: list[Target], scenarios: list[Scenario], rounds: int) -> dict[str, dict[str, dict]]:
    raw: dict[str, dict[str, list[dict]]] = {t.name: {s.name: [] for s in scenarios} for t in targets}
    for scenario in scenarios:  # warm-up, not counted: connections, caches, first recordings
        for target in targets:
            await measure(
                target,
                Scenario(
                    scenario.name,
                    scenario.spec,
                    scenario.concurrency,
                    min(scenario.requests, scenario.distinct),
                    scenario.distinct,
                ),
            )
    for number in range(rounds):
        for scenario in scenarios:
            for target in targets:
                raw[target.name][scenario.name].append(await measure(target, scenario))
        print(f"  round {number + 1}/{rounds} done", file=sys.stderr)
    return {t: {s: median_of(r) for s, r in by_s.items()} for t, by_s in raw.items()}


async def memory_growth(target: Target, scenarios: list[Scenario]) -> dict[str, float]:
    """RSS after warm-up, after 1,000 small requests, and after 10 streams of 5,000 chunks."""
    warm = Scenario("json-c16", Spec("json"), 16, 200)
    await measure(target, warm)
    start_rss = target.rss()
    await measure(target, Scenario("json-c16", Spec("json"), 16, 1000))
    after_small = target.rss()
    await measure(target, Scenario("sse5000-c10", Spec("sse", chunks=5000), 10, 10, distinct=10))
    after_streams = target.rss()
    return {"start_mb": start_rss, "after_1000_mb": after_small, "after_long_streams_mb": after_streams}


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def table(results: dict[str, dict[str, dict]], scenarios: list[Scenario]) -> str:
    lines = [
        "| scenario | record req/s | record / pass-through / tee throughput | record CPU µs/req (vs pass-through, tee) "
        "| CPU µs/req forward (vs pass-through) | recording's own CPU µs/req: record − forward (tee − pass-through) "
        "| TTFB record − pass-through | replay/bare throughput | replay/bare TTFB "
        "| p99 record / pass-through / tee / replay / bare (ms) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in scenarios:
        rec, pas, tee, fwd, rep, bare = (
            results[name][s.name] for name in ("record", "passthrough", "tee", "forward", "replay", "bare")
        )
        lines.append(
            f"| {s.name} | {rec['throughput']:,.0f} | {ratio(rec['throughput'], pas['throughput'])} / "
            f"{ratio(rec['throughput'], tee['throughput'])} | {rec['cpu_ms'] * 1000:.0f} "
            f"({ratio(rec['cpu_ms'], pas['cpu_ms'])}, {ratio(rec['cpu_ms'], tee['cpu_ms'])}) "
            f"| {fwd['cpu_ms'] * 1000:.0f} ({ratio(fwd['cpu_ms'], pas['cpu_ms'])}) "
            f"| {(rec['cpu_ms'] - fwd['cpu_ms']) * 1000:.0f} ({(tee['cpu_ms'] - pas['cpu_ms']) * 1000:.0f}) "
            f"| {rec['ttfb_ms'] - pas['ttfb_ms']:+.2f} ms | {ratio(rep['throughput'], bare['throughput'])} "
            f"| {ratio(bare['ttfb_ms'], rep['ttfb_ms'])} (faster is >1) "
            f"| {rec['p99_ms']:.1f} / {pas['p99_ms']:.1f} / {tee['p99_ms']:.1f} / {rep['p99_ms']:.1f} "
            f"/ {bare['p99_ms']:.1f} |"
        )
    return "\n".join(lines)


def generate_recordings(directory: Path, count: int) -> bytes:
    """`count` distinct recordings (the seed's shape) and the body of the first one loaded."""
    template = {
        "request": {
            "method": "POST",
            "url": "https://api.openai.com/v1/chat/completions",
            "headers": {},
            "body": None,
            "endpoint": "/v1/chat/completions",
            "model": "gpt-4o",
            "route": "openai",
        },
        "response": {
            "status": 200,
            "headers": {"content-type": "application/json"},
            "body": {"__type__": "openai.types.chat.chat_completion.ChatCompletion", "__data__": None},
            "is_streaming": False,
            "framing": {"format": "json"},
        },
        "provenance": {"tool": "llmproxy", "version": "bench", "recorded_at": "2026-11-26T00:00:00+00:00"},
    }
    directory.mkdir(parents=True, exist_ok=True)
    probe = b""
    for number in range(count):
        body = {"model": "gpt-4o", "messages": [{"role": "user", "content": f"question {number}"}]}
        template["request"]["body"] = body
        template["response"]["body"]["__data__"] = {
            "id": f"c{number}",
            "choices": [{"message": {"content": f"answer {number} " + "y" * 800}}],
        }
        sub = directory / f"d{number % 100:02d}"
        sub.mkdir(exist_ok=True)
        (sub / f"chat-{number:06d}.json").write_bytes(orjson.dumps(template, option=orjson.OPT_INDENT_2))
        if number == 0:
            probe = orjson.dumps(body)
    return probe


async def time_loading(count: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="llmproxy-bench-") as tmp:
        probe = generate_recordings(Path(tmp), count)
        port = free_port()
        started = time.perf_counter()
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "llmproxy",
                "replay",
                "--recordings",
                tmp,
                "--port",
                str(port),
                "--log-level",
                "warning",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        first_served = ready = float("nan")
        try:
            async with aiohttp.ClientSession() as session:
                while time.perf_counter() - started < 120:
                    try:
                        async with session.post(
                            f"http://127.0.0.1:{port}/v1/chat/completions",
                            data=probe,
                            headers={"Content-Type": "application/json"},
                        ) as response:
                            await response.read()
                            if response.status == 200:
                                first_served = time.perf_counter() - started
                                break
                    except aiohttp.ClientError:
                        await asyncio.sleep(0.01)
                # "Ready": the index is complete; a request for the last file generated hits.
                last = orjson.dumps(
                    {"model": "gpt-4o", "messages": [{"role": "user", "content": f"question {count - 1}"}]}
                )
                while time.perf_counter() - started < 300:
                    async with session.post(
                        f"http://127.0.0.1:{port}/v1/chat/completions",
                        data=last,
                        headers={"Content-Type": "application/json"},
                    ) as response:
                        await response.read()
                        if response.status == 200:
                            ready = time.perf_counter() - started
                            break
            rss = rss_mb(process.pid)
        finally:
            stop(process)
        size_mb = sum(p.stat().st_size for p in Path(tmp).rglob("*.json")) / 1e6
    return {"recordings": count, "first_served_s": first_served, "ready_s": ready, "rss_mb": rss, "files_mb": size_mb}


async def main_async(args: argparse.Namespace) -> None:
    scenarios = QUICK if args.quick else SCENARIOS
    disk = settle_disk()
    with tempfile.TemporaryDirectory(prefix="llmproxy-bench-rec-", dir=args.dir) as recordings:
        upstream = Target("direct", ["-m", "bench.upstream", "--port", str(port := free_port())], port)
        upstream.start()
        passthrough = Target(
            "passthrough", ["-m", "bench.passthrough", "--port", str(p := free_port()), "--upstream", upstream.url], p
        )
        tee_dir = Path(recordings) / "tee"
        tee_dir.mkdir()
        tee = Target(
            "tee",
            ["-m", "bench.passthrough", "--port", str(t := free_port()), "--upstream", upstream.url]
            + ["--tee", str(tee_dir)],
            t,
            str(tee_dir),
        )
        record = llmproxy_target("record", "record", str(Path(recordings) / "record"), upstream.url)
        forward = llmproxy_target("forward", "replay", str(Path(recordings) / "nothing"))
        forward.args += ["--on-miss", "forward", "--allow-empty", "--upstream", upstream.url]
        bare = Target("bare", ["-m", "bench.bare_replay", "--port", str(b := free_port())], b)
        for target in (passthrough, tee, forward, record, bare):
            target.start()
        print(
            f"machine: {platform.machine()}, {platform.python_implementation()} {platform.python_version()}, "
            f"uvloop {'on' if _has_uvloop() else 'off'}, disk: {disk}",
            file=sys.stderr,
        )
        try:
            print("record phase (direct, pass-through, tee, llmproxy forward, llmproxy record)", file=sys.stderr)
            results = await run_rounds([upstream, passthrough, tee, forward, record], scenarios, args.rounds)
            forward.stop()
            record_memory = await memory_growth(record, scenarios)
            record.stop()
            # Replay serves a directory where each distinct request was recorded once (the record
            # phase above recorded every repeat, which replay would serve one by one, in order).
            once = str(Path(recordings) / "once")
            recorder = llmproxy_target("record-once", "record", once, upstream.url)
            recorder.recordings = None  # the salts replay asks for, not distinct ones
            recorder.start()
            for scenario in [
                *scenarios,
                Scenario("sse5000-c10", Spec("sse", chunks=5000), 10, 10, distinct=10),
                Scenario("json-c16", Spec("json"), 16, 64),
            ]:
                distinct = Scenario(scenario.name, scenario.spec, 4, scenario.distinct, scenario.distinct)
                await measure(recorder, distinct)
            recorder.stop()
            replay = llmproxy_target("replay", "replay", once)
            replay.start()
            print("replay phase (llmproxy replay, bare handler)", file=sys.stderr)
            results.update(await run_rounds([replay, bare], [replay_scenario(s) for s in scenarios], args.rounds))
            replay_memory = await memory_growth(replay, scenarios)
            replay.stop()
        finally:
            for target in (upstream, passthrough, tee, forward, record, bare):
                target.stop()
    print(table(results, scenarios))
    print()
    print(f"RSS llmproxy record (MB): {record_memory}")
    print(f"RSS llmproxy replay (MB): {replay_memory}")
    loading = []
    if args.loading:
        for count in args.loading:
            loading.append(await time_loading(count))
            print(f"loading: {loading[-1]}")
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / f"bench-{int(time.time())}.json").write_bytes(
        orjson.dumps(
            {"results": results, "record_memory": record_memory, "replay_memory": replay_memory, "loading": loading},
            option=orjson.OPT_INDENT_2,
        )
    )


def _has_uvloop() -> bool:
    with contextlib.suppress(ImportError):
        import uvloop  # noqa: F401

        return True
    return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="fewer, smaller scenarios")
    parser.add_argument("--dir", help="where the record-side targets write (default: the temp directory)")
    parser.add_argument(
        "--loading",
        type=int,
        nargs="*",
        default=[10_000, 100_000],
        help="recordings counts to time loading for (none to skip)",
    )
    args = parser.parse_args()
    if _has_uvloop():
        import uvloop

        uvloop.install()
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
