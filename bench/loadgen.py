"""The load generator: drive a scenario at a concurrency, check every byte, time every request."""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field

import aiohttp

from bench.common import Spec, expected_bytes


@dataclass(frozen=True)
class Scenario:
    name: str
    spec: Spec
    concurrency: int
    requests: int
    distinct: int = 64  # request bodies cycle through this many salts (so replay can hit them)
    unique: bool = False  # every request its own body (record: real traffic is distinct)


@dataclass
class Result:
    latencies: list[float] = field(default_factory=list)
    ttfb: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    wall: float = 0.0

    @property
    def throughput(self) -> float:
        return len(self.latencies) / self.wall if self.wall else 0.0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


_runs = itertools.count()


async def drive(session: aiohttp.ClientSession, base_url: str, scenario: Scenario) -> Result:
    result = Result()
    if scenario.unique:  # salts never seen before by this process's targets
        run = f"{scenario.name}-{time.time_ns()}-{next(_runs)}"
        salts = [f"{run}-{i}" for i in range(scenario.requests)]
    else:
        salts = [f"{scenario.name}-{i}" for i in range(scenario.distinct)]
    bodies = [scenario.spec.request_body(salt) for salt in salts]
    expected = [expected_bytes(scenario.spec, salt) for salt in salts]
    counter = iter(range(scenario.requests))
    url = base_url + "/v1/chat/completions"

    async def worker() -> None:
        for number in counter:
            which = number % len(salts)
            started = time.perf_counter()
            try:
                async with session.post(
                    url, data=bodies[which], headers={"Content-Type": "application/json"}
                ) as response:
                    first = await response.content.readany()
                    first_at = time.perf_counter()
                    rest = await response.read()
                    done = time.perf_counter()
                    if response.status != 200:
                        result.errors.append(f"status {response.status}: {first[:200]!r}")
                        continue
                    if first + rest != expected[which]:
                        result.errors.append(f"body differs for {scenario.name} #{which}")
                        continue
            except (TimeoutError, aiohttp.ClientError) as exc:
                result.errors.append(f"{type(exc).__name__}: {exc}")
                continue
            result.latencies.append(done - started)
            result.ttfb.append(first_at - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(scenario.concurrency)))
    result.wall = time.perf_counter() - started
    return result
