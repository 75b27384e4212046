"""Replay from a bucket vs from a directory: start-up time for N recordings, throughput once cached.

python -m bench.remote_store                 # 10,000 recordings, moto's S3 server on 127.0.0.1
python -m bench.remote_store --count 1000    # a quick run

The S3-compatible server is moto in server mode (pure Python, so a slow server: MinIO or a real
bucket list and read faster). One recording is made through `llmproxy record`, then cloned
with other prompts into N files; the directory is synced to the bucket with `llmproxy sync`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from bench.common import free_port, wait_for_port
from llmproxy.config import load_settings
from llmproxy.logs import configure_logging
from llmproxy.server import ProxyServer
from llmproxy.store.base import open_store
from llmproxy.store.directory import RecordingStore
from llmproxy.store.index import RecordingIndex
from llmproxy.tools.sync import sync

TEMPLATE: dict[str, Any] = {
    "request": {
        "method": "POST",
        "url": "https://api.openai.com/v1/chat/completions",
        "endpoint": "/v1/chat/completions",
        "route": "openai",
        "model": "gpt-4o",
        "headers": {"content-type": "application/json"},
        "body": {"model": "gpt-4o", "messages": [{"role": "user", "content": ""}]},
    },
    "response": {
        "status": 200,
        "headers": {"content-type": "application/json"},
        "body": {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": 1,
            "model": "gpt-4o-2024-08-06",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": ""}, "finish_reason": "stop"}],
        },
    },
}


def prompt(number: int) -> str:
    return f"benchmark prompt number {number}"


def make_recordings(directory: Path, count: int) -> None:
    """`count` recordings under the names llmproxy gives them (which carry the request key)."""
    store = RecordingStore(directory)
    index = RecordingIndex(load_settings(None, {"recordings": str(directory)}).router())
    for number in range(count):
        document = orjson.loads(orjson.dumps(TEMPLATE))
        document["request"]["body"]["messages"][0]["content"] = prompt(number)
        document["response"]["body"]["choices"][0]["message"]["content"] = f"answer {number} " + "x" * 400
        key = index.load_document(document).canonical.key
        name = store.name_for(route="openai", path="/v1/chat/completions", model="gpt-4o", key=key)
        store.write(name, document)


async def startup(location: str, count: int, sample: int = 100, concurrency: int = 16) -> tuple[float, float, float]:
    """From a cold start of `llmproxy replay` (serving while it loads): seconds until the first
    of `sample` requests for random recordings was answered, until all of them were, and until
    every recording was indexed."""
    settings = load_settings(None, {"recordings": location, "port": 0, "log_level": "warning"})
    server = ProxyServer(settings, "replay")
    wanted = random.Random(7).sample(range(count), sample)
    url_path = "/v1/chat/completions"
    headers = {"Content-Type": "application/json"}
    answered: list[float] = []
    started = time.perf_counter()
    await server.start(wait_ready=False)
    url = f"http://127.0.0.1:{server.port}{url_path}"
    try:
        async with aiohttp.ClientSession() as session:

            async def worker() -> None:
                while wanted:
                    number = wanted.pop()
                    body = orjson.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": prompt(number)}]})
                    async with session.post(url, data=body, headers=headers) as response:
                        assert response.status == 200, await response.text()
                        assert f"answer {number} ".encode() in await response.read()
                    answered.append(time.perf_counter() - started)

            await asyncio.gather(*(worker() for _ in range(concurrency)))
            await server.pipeline.wait_ready()
            indexed = time.perf_counter() - started
            index = server.pipeline.index
            assert len(index) == count and not index.problems, (len(index), index.problems[:3])
    finally:
        await server.stop()
    return min(answered), max(answered), indexed


async def throughput(location: str, distinct: int, requests: int, concurrency: int = 32) -> float:
    """Replayed requests per second over `distinct` recordings, once each was served (cached)."""
    settings = load_settings(None, {"recordings": location, "port": 0, "log_level": "warning"})
    server = ProxyServer(settings, "replay")
    await server.start()
    bodies = [
        orjson.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": prompt(n)}]}) for n in range(distinct)
    ]
    url = f"http://127.0.0.1:{server.port}/v1/chat/completions"
    headers = {"Content-Type": "application/json"}
    try:
        async with aiohttp.ClientSession() as session:

            async def one(body: bytes) -> None:
                async with session.post(url, data=body, headers=headers) as response:
                    assert response.status == 200, await response.text()
                    await response.read()

            await asyncio.gather(*(one(body) for body in bodies))  # warm: bodies fetched and cached
            queue = [bodies[i % distinct] for i in range(requests)]

            async def worker() -> None:
                while queue:
                    await one(queue.pop())

            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            return requests / (time.perf_counter() - started)
    finally:
        await server.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=5_000)
    parser.add_argument("--distinct", type=int, default=500)
    args = parser.parse_args()
    configure_logging(level="warning")
    port = free_port()
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
    )
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    workdir = Path(tempfile.mkdtemp(prefix="llmproxy-bench-"))
    try:
        wait_for_port(port)
        import boto3

        boto3.client("s3").create_bucket(Bucket="llmproxy-bench")
        directory, bucket = workdir / "recordings", "s3://llmproxy-bench/recordings"
        make_recordings(directory, args.count)
        started = time.perf_counter()
        source, target = open_store(directory), open_store(bucket)
        result = sync(source, target)
        upload = time.perf_counter() - started
        target.close()
        assert len(result.copied) == args.count and not result.failed
        rows = [
            (
                "directory",
                asyncio.run(startup(str(directory), args.count)),
                asyncio.run(throughput(str(directory), args.distinct, args.requests)),
            ),
            (
                "bucket (moto)",
                asyncio.run(startup(bucket, args.count)),
                asyncio.run(throughput(bucket, args.distinct, args.requests)),
            ),
        ]
        print(f"{args.count} recordings; llmproxy sync directory -> bucket: {upload:.1f} s")
        print(
            "| store | from a cold start: first of 100 random recordings served "
            "| all 100 served | all indexed | replay req/s once cached |"
        )
        print("|---|---|---|---|---|")
        for name, (first, hundred, indexed), rate in rows:
            print(f"| {name} | {first:.2f} s | {hundred:.2f} s | {indexed:.1f} s | {rate:,.0f} |")
    finally:
        server.terminate()
        server.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
