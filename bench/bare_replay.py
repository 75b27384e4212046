"""The replay reference: a bare aiohttp handler serving the expected bytes from memory.

python -m bench.bare_replay --port 9003
"""

from __future__ import annotations

import argparse

import orjson
from aiohttp import web

from bench.common import expected_bytes, salt_of, spec_of, use_uvloop

_cache: dict[bytes, tuple[bytes, str]] = {}


async def chat(request: web.Request) -> web.Response:
    raw = await request.read()
    cached = _cache.get(raw)
    if cached is None:
        body = orjson.loads(raw)
        spec = spec_of(body)
        content_type = "application/json" if spec.kind == "json" else "text/event-stream; charset=utf-8"
        cached = _cache[raw] = (expected_bytes(spec, salt_of(body)), content_type)
    return web.Response(body=cached[0], headers={"Content-Type": cached[1]})


def main() -> None:
    use_uvloop()
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/chat/completions", chat)
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
