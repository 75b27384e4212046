"""How fast the recordings browser paints with many recordings.

    python -m bench.ui_list [COUNT]

Writes COUNT recordings (default 10,000) to a temp directory, starts `llmproxy ui`'s server
in-process, and times: the catalog load, the first list page, a full-text search, a sort by
cost, and the page itself.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from llmproxy.config import load_settings
from llmproxy.tools.ui import UIServer
from tests.ui_support import many_recordings


async def measure(root: Path) -> None:
    server = UIServer(root, load_settings(None, {}).router(), port=0)
    started = time.perf_counter()
    await server.start()
    base = f"http://127.0.0.1:{server.port}/"
    async with aiohttp.ClientSession() as session:

        async def timed(path: str) -> tuple[float, dict]:
            begin = time.perf_counter()
            async with session.get(base + path) as response:
                data = await response.json() if path.startswith("api/") else {"bytes": len(await response.read())}
            return (time.perf_counter() - begin) * 1000, data

        page_ms, _ = await timed("")
        first_ms, first = await timed("api/recordings?limit=100")
        print(f"page: {page_ms:.1f} ms; first list page while loading: {first_ms:.1f} ms ({first['loaded']} loaded)")
        await asyncio.to_thread(server.catalog.loaded.wait)
        print(f"catalog of {len(server.catalog.rows)} recordings loaded in {time.perf_counter() - started:.2f} s")
        for label, path in (
            ("first page", "api/recordings?limit=100"),
            ("search", "api/recordings?limit=100&q=squared%2042"),
            ("sort by cost, desc", "api/recordings?limit=100&sort=cost_usd&order=desc"),
            ("filter model + page 50", "api/recordings?limit=100&model=mini&offset=5000"),
        ):
            ms, data = await timed(path)
            print(f"{label}: {ms:.1f} ms ({data['total']} match)")
    await server.stop()


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    with tempfile.TemporaryDirectory() as temp:
        root = Path(temp)
        begin = time.perf_counter()
        many_recordings(root, count)
        print(f"wrote {count} recordings in {time.perf_counter() - begin:.1f} s")
        asyncio.run(measure(root))


if __name__ == "__main__":
    main()
