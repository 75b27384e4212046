"""The aiohttp upstream: send a routed call to its upstream, hand back the response to read.

Nothing here writes to a client: the pipeline reads the body and passes it on. A completed
answer becomes an Exchange, for the recorder to tee.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode

import aiohttp
import structlog

from llmproxy.call import Call
from llmproxy.canonical import public_query
from llmproxy.upstream.base import UpstreamBroken, UpstreamFailure, prepared_request

log = structlog.get_logger("llmproxy.upstream")


@dataclass(slots=True)
class Exchange:
    """A complete upstream answer to one call, as received (decompressed)."""

    call: Call
    url: str
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    # (bytes received so far, ms since the request was sent) after each network read.
    reads: list[tuple[int, float]]
    headers_ms: float
    # False when the upstream broke off mid-body: only kept (marked truncated) with record_errors.
    complete: bool = True
    # Why the recorder did not write it (a NotRecorded value), for the not-recorded notes.
    dropped: str | None = None


def safe_url(url: str) -> str:
    """A URL for a log line or a file: secret query parameters removed."""
    base, _, query = url.partition("?")
    if not query:
        return base
    kept = public_query(parse_qsl(query, keep_blank_values=True))
    return f"{base}?{urlencode(kept)}" if kept else base


class AiohttpResponse:
    """An upstream response read through aiohttp (see upstream.base.UpstreamResponse)."""

    def __init__(self, response: aiohttp.ClientResponse, url: str, headers_ms: float) -> None:
        self._response = response
        self.status = response.status
        self.headers = list(response.headers.items())
        self.url = url
        self.headers_ms = headers_ms

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for data in self._response.content.iter_any():
                yield data
        except (TimeoutError, aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
            raise UpstreamBroken(str(exc) or type(exc).__name__) from None

    def close(self) -> None:
        # close() drops the connection, which is what tells an upstream still sending (or still
        # thinking) that nobody listens any more; a body read to its end goes back to the pool.
        if self._response.content.is_eof():
            self._response.release()
        else:
            self._response.close()


class AiohttpUpstream:
    """Sends calls to their route's upstream over one pooled aiohttp session."""

    def __init__(self, *, connect_timeout: float = 10.0, read_timeout: float = 600.0) -> None:
        self.read_timeout = read_timeout
        self._timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout, sock_read=read_timeout)
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        # One pooled session for the whole run; aiohttp decompresses, so stored and replayed
        # bodies never carry a Content-Encoding that does not match their bytes.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
            timeout=self._timeout,
            auto_decompress=True,
            skip_auto_headers=("User-Agent",),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(self, call: Call) -> AiohttpResponse:
        assert self._session is not None, "AiohttpUpstream.start() was not awaited"
        route = call.route
        url, target, headers = await prepared_request(call)
        started = time.monotonic()
        try:
            response = await self._session.request(
                call.method,
                target,
                headers=headers,
                data=call.body if call.body else None,
                allow_redirects=False,
            )
        except TimeoutError:
            log.error("upstream timeout", route=route.name, url=safe_url(url))
            raise UpstreamFailure(504, "upstream_timeout", f"upstream {route.name} did not answer in time") from None
        except aiohttp.ClientError as exc:
            log.error("upstream unreachable", route=route.name, url=safe_url(url), error=str(exc))
            message = f"cannot reach upstream {route.name}: {exc}"
            raise UpstreamFailure(502, "upstream_unreachable", message) from None
        return AiohttpResponse(response, url, (time.monotonic() - started) * 1000)
