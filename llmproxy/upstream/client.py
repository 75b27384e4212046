"""Forwarding: send a routed call to its upstream and pass the answer through as it arrives.

The client is served first: every upstream read is written to the client before anything else
happens to it. What was received is handed back as an Exchange, for the recorder to tee.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode

import aiohttp
import structlog
from aiohttp import web

from llmproxy.call import Call, Outcome, error_response
from llmproxy.canonical import public_query
from llmproxy.headers import client_response_headers, forward_request_headers
from llmproxy.wire.registry import codec_for_content_type

log = structlog.get_logger("llmproxy.forward")


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


def safe_url(url: str) -> str:
    """A URL for a log line or a file: secret query parameters removed."""
    base, _, query = url.partition("?")
    if not query:
        return base
    kept = public_query(parse_qsl(query, keep_blank_values=True))
    return f"{base}?{urlencode(kept)}" if kept else base


class Forwarder:
    def __init__(
        self,
        outcome: Outcome,
        *,
        connect_timeout: float = 10.0,
        read_timeout: float = 600.0,
        drain_on_disconnect: bool = False,
    ) -> None:
        self.outcome = outcome
        # When a client leaves mid-stream: read the rest anyway so the exchange is recorded
        # whole (drain), or close the upstream request at once and record nothing (default).
        self.drain_on_disconnect = drain_on_disconnect
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

    async def forward(self, request: web.Request, call: Call) -> tuple[web.StreamResponse, Exchange | None]:
        """The client's response, and the exchange when it completed (None if it failed)."""
        assert self._session is not None, "Forwarder.start() was not awaited"
        route = call.route
        try:
            url = route.upstream_url(call.path, call.query_string)
            target, headers = route.provider.prepare_upstream(
                call.method, url, forward_request_headers(request.headers.items()), call.body
            )
        except LookupError as exc:  # no upstream, or the provider cannot prepare the request
            return error_response(route, 502, str(exc), getattr(exc, "code", "no_upstream")), None
        started = time.monotonic()
        try:
            upstream = await self._session.request(
                call.method,
                target,
                headers=headers,
                data=call.body if call.body else None,
                allow_redirects=False,
            )
        except TimeoutError:
            self.outcome.errors += 1
            log.error("upstream timeout", route=route.name, url=safe_url(url))
            return error_response(route, 504, f"upstream {route.name} did not answer in time", "upstream_timeout"), None
        except aiohttp.ClientError as exc:
            self.outcome.errors += 1
            log.error("upstream unreachable", route=route.name, url=safe_url(url), error=str(exc))
            message = f"cannot reach upstream {route.name}: {exc}"
            return error_response(route, 502, message, "upstream_unreachable"), None
        async with upstream:
            headers_ms = (time.monotonic() - started) * 1000
            reads: list[tuple[int, float]] = []
            parts: list[bytes] = []
            response_headers = client_response_headers(upstream.headers.items())
            streamed: web.StreamResponse | None = None
            complete = True

            def exchange() -> Exchange:
                return Exchange(
                    call=call,
                    url=url,
                    status=upstream.status,
                    headers=list(upstream.headers.items()),
                    body=b"".join(parts),
                    reads=reads,
                    headers_ms=headers_ms,
                    complete=complete,
                )

            try:
                if codec_for_content_type(upstream.headers.get("Content-Type", "")).streaming:
                    streamed = web.StreamResponse(status=upstream.status, headers=response_headers)
                    await streamed.prepare(request)
                    await _pump(upstream, streamed, parts, reads, started)
                    response: web.StreamResponse = streamed
                else:
                    data = await upstream.read()
                    parts.append(data)
                    reads.append((len(data), (time.monotonic() - started) * 1000))
                    response = web.Response(status=upstream.status, body=data, headers=response_headers)
            except ConnectionResetError:
                # The client left (aiohttp's ClientConnectionResetError is one of these too).
                if not self.drain_on_disconnect or streamed is None:
                    log.warning("client went away mid-stream; upstream closed, nothing recorded", path=call.path)
                    return streamed or web.Response(status=499), None
                log.warning("client went away mid-stream; draining the upstream to record it", path=call.path)
                try:
                    await _drain(upstream, parts, reads, started)
                except (TimeoutError, aiohttp.ClientError):
                    return streamed, None
                self.outcome.forwarded += 1
                return streamed, exchange()
            except (TimeoutError, aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
                self.outcome.errors += 1
                complete = False
                log.error("upstream broke off the response", route=route.name, error=str(exc) or type(exc).__name__)
                if streamed is not None:
                    _abort(request)  # the client already has part of a stream: cut it off too
                    return streamed, exchange()
                message = f"upstream {route.name} broke off: {exc}"
                return error_response(route, 502, message, "upstream_broken"), exchange()
            self.outcome.forwarded += 1
            return response, exchange()


async def _pump(
    upstream: aiohttp.ClientResponse,
    client: web.StreamResponse,
    parts: list[bytes],
    reads: list[tuple[int, float]],
    started: float,
) -> None:
    total = 0
    async for data in upstream.content.iter_any():
        parts.append(data)  # kept before the write: a client leaving mid-write loses it no byte
        total += len(data)
        await client.write(data)  # then straight on: the client's time to first token is the upstream's
        reads.append((total, (time.monotonic() - started) * 1000))
    try:
        await client.write_eof()
    except ConnectionResetError:
        # The SDKs stop reading at the end marker ([DONE]) and may close before the upstream's
        # final empty chunk: the client had everything, and so does the exchange.
        pass


async def _drain(
    upstream: aiohttp.ClientResponse, parts: list[bytes], reads: list[tuple[int, float]], started: float
) -> None:
    total = sum(len(part) for part in parts)
    async for data in upstream.content.iter_any():
        parts.append(data)
        total += len(data)
        reads.append((total, (time.monotonic() - started) * 1000))


def _abort(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.close()
