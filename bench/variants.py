"""Same-run comparison of `llmproxy record` configurations against pass-through and tee.

    python -m bench.variants                                   # record, as configured by default
    python -m bench.variants --variant "--config thread.toml"  # and with another config file
    python -m bench.variants --variant "CWD=/path/to/other/checkout" --scenario sse

Each --variant is one more `llmproxy record` target: words with `=` set environment variables
(CWD=<dir> runs the llmproxy of that checkout, e.g. the previous commit in a git worktree),
the others are command-line arguments. Rounds are interleaved, as in `bench.run`, and every
record target gets distinct bodies and is measured until every recording is on disk. Printed per
target: throughput, CPU per request (process tree, the file writer included), p99 latency and
TTFB, each against pass-through or tee, and the CPU per request of each thread of the proxy's
process ("main" is the event loop's).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.common import Spec, free_port, settle_disk, start
from bench.run import Scenario, Target, llmproxy_target, measure

SCENARIOS = {
    "json": Scenario("json-c16", Spec("json"), 16, 1500),
    "sse": Scenario("sse100-c16", Spec("sse", chunks=100), 16, 300),
    "sse5000": Scenario("sse5000-c10", Spec("sse", chunks=5000), 10, 10, distinct=10),
    "paced": Scenario("paced-c16", Spec("sse", chunks=20, delay_ms=20), 16, 64),
}


def thread_seconds(pid: int) -> dict[str, float]:
    """CPU seconds per thread of `pid` ("main": the thread whose id is the pid)."""
    found: dict[str, float] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        name = "main" if tid == str(pid) else f"thread {tid}"
        found[name] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return found


class Variant(Target):
    def __init__(self, name: str, base: Target, words: list[str]) -> None:
        super().__init__(name, base.args, base.port, str(base.recordings))
        self.env = dict(word.split("=", 1) for word in words if "=" in word and not word.startswith("-"))
        self.args = [*base.args, *(word for word in words if not ("=" in word and not word.startswith("-")))]  # type: ignore[misc]

    def start(self) -> None:
        env = dict(self.env)
        cwd = env.pop("CWD", None)
        self.process = start(self.args or [], self.port, env=env, **({"cwd": Path(cwd)} if cwd else {}))


async def compare(scenario: Scenario, rounds: int, variants: list[str], directory: str | None) -> None:
    threads: dict[str, dict[str, list[float]]] = {}

    async def measured(target: Target, run: Scenario) -> dict[str, Any]:
        before = thread_seconds(target.process.pid) if target.process else {}
        result = await measure(target, run)
        if target.process:
            for name, seconds in thread_seconds(target.process.pid).items():
                per_request = (seconds - before.get(name, 0.0)) / run.requests * 1e6
                threads.setdefault(target.name, {}).setdefault(name, []).append(per_request)
        return result

    print(f"disk: {settle_disk()}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="llmproxy-variants-", dir=directory) as recordings:
        root = Path(recordings)
        upstream = Target("direct", ["-m", "bench.upstream", "--port", str(port := free_port())], port)
        upstream.start()
        passthrough = Target(
            "pass-through", ["-m", "bench.passthrough", "--port", str(p := free_port()), "--upstream", upstream.url], p
        )
        (root / "tee").mkdir()
        tee_args = ["-m", "bench.passthrough", "--port", str(t := free_port()), "--upstream", upstream.url]
        tee = Target("tee", [*tee_args, "--tee", str(root / "tee")], t, str(root / "tee"))
        targets = [passthrough, tee, llmproxy_target("record", "record", str(root / "record"), upstream.url)]
        for number, words in enumerate(variants):
            base = llmproxy_target("record", "record", str(root / f"variant-{number}"), upstream.url)
            targets.append(Variant(f"record {words}", base, words.split()))
        try:
            for target in targets:
                target.start()
            warm = Scenario(scenario.name, scenario.spec, scenario.concurrency, min(200, scenario.requests), 200)
            for target in targets:
                await measure(target, warm)
            results: dict[str, list[dict[str, Any]]] = {target.name: [] for target in targets}
            for _ in range(rounds):
                for target in targets:
                    results[target.name].append(await measured(target, scenario))
        finally:
            for target in [upstream, *targets]:
                target.stop()
    medians = {name: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for name, rs in results.items()}
    floor, naive = medians["pass-through"], medians["tee"]
    for name, m in medians.items():
        print(
            f"{name:32s} {m['throughput']:7.0f} req/s ({m['throughput'] / floor['throughput']:.2f}x pass-through, "
            f"{m['throughput'] / naive['throughput']:.2f}x tee)  CPU {m['cpu_ms'] * 1000:6.0f} µs/req "
            f"({m['cpu_ms'] / naive['cpu_ms']:.2f}x tee)  p99 {m['p99_ms']:.1f} ms "
            f"({m['p99_ms'] / floor['p99_ms']:.1f}x pass-through)  TTFB {m['ttfb_ms']:.2f} ms"
        )
    for name, by_thread in threads.items():
        shown = ", ".join(f"{thread} {statistics.median(values):.0f}" for thread, values in by_thread.items())
        print(f"    {name}: CPU µs/req by thread: {shown}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default="json")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, help="requests per round (default: the scenario's)")
    parser.add_argument("--variant", action="append", default=[], help="one more record target (see above)")
    parser.add_argument("--dir", help="where the recordings go (default: the temp directory)")
    args = parser.parse_args()
    scenario = SCENARIOS[args.scenario]
    if args.requests:
        scenario = Scenario(scenario.name, scenario.spec, scenario.concurrency, args.requests, scenario.distinct)
    asyncio.run(compare(scenario, args.rounds, args.variant, args.dir))


if __name__ == "__main__":
    main()
