"""The reference: a minimal aiohttp pass-through proxy, the floor for this stack.

python -m bench.passthrough --port 9002 --upstream http://127.0.0.1:9001
python -m bench.passthrough --port 9002 --upstream http://127.0.0.1:9001 --tee DIR   # refproxy-tee

With --tee it is the naive recorder: each response is kept whole while it is passed through,
then written as one file (request and response bytes, no parsing, no scan) at its end.
"""

from __future__ import annotations

import argparse
import itertools
import os

import aiohttp
from aiohttp import web

from bench.common import use_uvloop

HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "host", "content-length"}


def build(upstream: str, tee: str | None = None) -> web.Application:
    numbers = itertools.count()

    async def start(app: web.Application) -> None:
        app["session"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))

    async def close(app: web.Application) -> None:
        await app["session"].close()

    async def handle(request: web.Request) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        body = await request.read()
        session: aiohttp.ClientSession = request.app["session"]
        async with session.request(request.method, upstream + request.path_qs, headers=headers, data=body) as up:
            out_headers = {k: v for k, v in up.headers.items() if k.lower() not in HOP | {"content-encoding"}}
            response = web.StreamResponse(status=up.status, headers=out_headers)
            await response.prepare(request)
            kept: list[bytes] = []
            async for data in up.content.iter_any():
                await response.write(data)
                if tee is not None:
                    kept.append(data)
            await response.write_eof()
            if tee is not None:
                with open(os.path.join(tee, f"{next(numbers)}.bin"), "wb") as handle:
                    handle.write(body + b"\n" + b"".join(kept))
            return response

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", handle)
    app.on_startup.append(start)
    app.on_cleanup.append(close)
    return app


def main() -> None:
    use_uvloop()
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--tee", help="write each exchange to a file in this directory")
    args = parser.parse_args()
    web.run_app(build(args.upstream, args.tee), host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
