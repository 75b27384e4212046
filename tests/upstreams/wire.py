"""Shared pieces of the fake upstreams: request log, exact-bytes log, JSON and stream helpers."""

from __future__ import annotations

import itertools
from typing import Any

import orjson
from aiohttp import web


class Upstream:
    """Base for fake upstreams: logs what it received and the exact bytes it sent."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.sent: list[bytes] = []
        self._ids = itertools.count(1)

    def next_id(self, prefix: str) -> str:
        return f"{prefix}{next(self._ids):06d}"

    async def note(self, request: web.Request) -> Any:
        raw = await request.read()
        content_type = request.headers.get("Content-Type", "")
        body: Any = orjson.loads(raw) if raw and content_type.startswith("application/json") else raw
        self.requests.append(
            {
                "method": request.method,
                "path": request.path,
                "path_qs": request.path_qs,
                "query": dict(request.query),
                "headers": dict(request.headers),
                "body": body,
                "raw": raw,
            }
        )
        return body

    def json(
        self,
        value: Any,
        *,
        status: int = 200,
        headers: dict[str, str] | None = None,
        content_type: str = "application/json",
        dumps: Any = orjson.dumps,
    ) -> web.Response:
        data = dumps(value)
        self.sent.append(data)
        return web.Response(status=status, body=data, headers={"Content-Type": content_type, **(headers or {})})

    async def stream(self, request: web.Request, pieces: list[bytes], headers: dict[str, str]) -> web.StreamResponse:
        response = web.StreamResponse(headers=headers)
        await response.prepare(request)
        for piece in pieces:
            await response.write(piece)
        await response.write_eof()
        self.sent.append(b"".join(pieces))
        return response
