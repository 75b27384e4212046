"""Helpers for the provider tests: a routes config pointing at fake upstreams, and the check
that replayed bytes equal what the upstream sent (apart from JSON whitespace inside events)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from tests.support import LoopThread

_LINE = re.compile(rb"(.*?)(\r\n|\n|$)")


def write_config(path: Path, routes: list[dict[str, Any]]) -> Path:
    lines = []
    for route in routes:
        lines.append("[[routes]]")
        for key, value in route.items():
            if isinstance(value, list):
                items = ", ".join(f'"{item}"' for item in value)
                lines.append(f"{key} = [{items}]")
            else:
                lines.append(f'{key} = "{value}"')
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def normalise_json_whitespace(raw: bytes) -> bytes:
    """Re-serialise JSON found in `data:` lines, NDJSON lines or a whole JSON body."""
    try:
        return orjson.dumps(orjson.loads(raw))
    except orjson.JSONDecodeError:
        pass
    out = []
    for match in _LINE.finditer(raw):
        line, ending = match.group(1), match.group(2)
        if not line and not ending:
            continue
        prefix = b"data: " if line.startswith(b"data: ") else b""
        try:
            line = prefix + orjson.dumps(orjson.loads(line[len(prefix) :]))
        except orjson.JSONDecodeError:
            pass
        out.append(line + ending)
    return b"".join(out)


def replayed_bytes_equal_upstream(loop: LoopThread, upstream: Any, proxy_url: str, prefix: str = "") -> int:
    """Send every request the upstream logged to the replay proxy, raw, and compare bytes."""

    async def check() -> int:
        compared = 0
        async with aiohttp.ClientSession(auto_decompress=False) as session:
            for request, sent in zip(upstream.requests, upstream.sent, strict=True):
                headers = {"Content-Type": request["headers"].get("Content-Type", "application/json")}
                for name in ("anthropic-version",):
                    if name in request["headers"]:
                        headers[name] = request["headers"][name]
                async with session.request(
                    request["method"],
                    proxy_url + prefix + request["path_qs"],
                    data=request["raw"] or None,
                    headers=headers,
                ) as response:
                    got = await response.read()
                    assert response.status == 200, got[:300]
                    assert "Content-Encoding" not in response.headers
                    assert normalise_json_whitespace(got) == normalise_json_whitespace(sent), (
                        request["path_qs"],
                        got[:300],
                        sent[:300],
                    )
                compared += 1
        return compared

    return loop.run(check())
