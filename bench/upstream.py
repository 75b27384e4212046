"""A fast local OpenAI-style upstream for the benchmark: JSON or SSE, sized and paced on request.

python -m bench.upstream --port 9001
"""

from __future__ import annotations

import argparse
import asyncio

import orjson
from aiohttp import web

from bench.common import json_body, salt_of, spec_of, sse_events, use_uvloop


async def chat(request: web.Request) -> web.StreamResponse:
    body = orjson.loads(await request.read())
    spec, salt = spec_of(body), salt_of(body)
    if spec.kind == "json":
        return web.Response(body=json_body(spec, salt), content_type="application/json")
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
    await response.prepare(request)
    events = sse_events(spec, salt)
    if spec.delay_ms:
        for event in events:
            await response.write(event)
            await asyncio.sleep(spec.delay_ms / 1000)
    else:
        # Unpaced streams are written in batches, as a real server's buffers would send them.
        for start in range(0, len(events), 50):
            await response.write(b"".join(events[start : start + 50]))
    await response.write_eof()
    return response


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
