"""Record mode: forward each call upstream, pass the answer through as it arrives, tee it to disk.

The client is served first: every upstream read is written to the client before anything else
happens to it. Parsing the stream into chunks, checking the framing and writing the file all
happen after the response is complete, in a worker thread, off the event loop.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from datetime import datetime, timezone
from typing import Any
from urllib.parse import parse_qsl, urlencode

import aiohttp
import orjson
import structlog
from aiohttp import web

from llmproxy import __version__
from llmproxy.codecs import parse_sse_event, split_stream
from llmproxy.framing import CapturedBody, capture, capture_opaque, render_segments
from llmproxy.headers import (
    client_response_headers,
    forward_request_headers,
    recorded_response_headers,
)
from llmproxy.matching import RawBody, public_query
from llmproxy.modes.base import Call, Outcome, error_response
from llmproxy.providers import Provider
from llmproxy.recording import TOOL_NAME, RecordedRequest, RecordedResponse, Recording, to_document
from llmproxy.store import RecordingStore

log = structlog.get_logger("llmproxy.record")


def body_format(content_type: str) -> str:
    """How a response body is framed, from its content type."""
    media = content_type.split(";", 1)[0].strip().lower()
    if media == "text/event-stream":
        return "sse"
    if media in ("application/x-ndjson", "application/jsonl", "application/json-seq"):
        return "ndjson"
    if media == "application/json" or media.endswith("+json"):
        return "json"
    return "opaque"


class RecordMode:
    name = "record"

    def __init__(self, store: RecordingStore, *, connect_timeout: float = 10.0, read_timeout: float = 600.0) -> None:
        self.store = store
        self.outcome = Outcome()
        self._timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout, sock_read=read_timeout)
        self._session: aiohttp.ClientSession | None = None
        self._writes: set[asyncio.Future[Any]] = set()
        # How often each key was recorded in this run: repeats become sequence 2, 3, ...
        self._sequences: dict[str, int] = {}

    async def start(self) -> None:
        # One pooled session for the whole run; aiohttp decompresses, so stored and replayed
        # bodies never carry a Content-Encoding that does not match their bytes.
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=self._timeout, auto_decompress=True, skip_auto_headers=("User-Agent",)
        )

    async def close(self) -> None:
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    async def handle(self, request: web.Request, call: Call) -> web.StreamResponse:
        assert self._session is not None, "RecordMode.start() was not awaited"
        route = call.route
        try:
            url = route.upstream_url(call.path, call.query_string)
        except LookupError as exc:
            return error_response(route, 502, str(exc), "no_upstream")
        started = time.monotonic()
        try:
            upstream = await self._session.request(
                call.method,
                url,
                headers=forward_request_headers(request.headers.items()),
                data=call.body if call.body else None,
                allow_redirects=False,
            )
        except asyncio.TimeoutError:
            self.outcome.errors += 1
            log.error("upstream timeout", route=route.name, url=_safe_url(url))
            return error_response(route, 504, f"upstream {route.name} did not answer in time", "upstream_timeout")
        except aiohttp.ClientError as exc:
            self.outcome.errors += 1
            log.error("upstream unreachable", route=route.name, url=_safe_url(url), error=str(exc))
            return error_response(route, 502, f"cannot reach upstream {route.name}: {exc}", "upstream_unreachable")
        async with upstream:
            headers_ms = (time.monotonic() - started) * 1000
            fmt = body_format(upstream.headers.get("Content-Type", ""))
            reads: list[tuple[int, float]] = []
            parts: list[bytes] = []
            response_headers = client_response_headers(upstream.headers.items())
            streamed: web.StreamResponse | None = None
            try:
                if fmt in ("sse", "ndjson"):
                    streamed = web.StreamResponse(status=upstream.status, headers=response_headers)
                    await streamed.prepare(request)
                    await _pump(upstream, streamed, parts, reads, started)
                    response: web.StreamResponse = streamed
                else:
                    data = await upstream.read()
                    parts.append(data)
                    reads.append((len(data), (time.monotonic() - started) * 1000))
                    response = web.Response(status=upstream.status, body=data, headers=response_headers)
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, asyncio.TimeoutError) as exc:
                self.outcome.errors += 1
                log.error("upstream broke off the response", route=route.name, error=str(exc) or type(exc).__name__)
                if streamed is not None:
                    _abort(request)  # the client already has part of a stream: cut it off too
                    return streamed
                return error_response(route, 502, f"upstream {route.name} broke off: {exc}", "upstream_broken")
            except ConnectionResetError:
                log.warning("client went away mid-stream; nothing recorded", route=route.name, path=call.path)
                _abort(request)
                return streamed or web.Response(status=499)
            exchange = (call, url, upstream.status, list(upstream.headers.items()), b"".join(parts), reads, headers_ms)
        self.outcome.forwarded += 1
        self._schedule_write(exchange)
        return response

    def _schedule_write(self, exchange: tuple[Any, ...]) -> None:
        key = exchange[0].canonical.key
        sequence = self._sequences[key] = self._sequences.get(key, 0) + 1
        future = asyncio.get_running_loop().run_in_executor(None, self._write, *exchange, sequence)
        self._writes.add(future)
        future.add_done_callback(self._writes.discard)

    def _write(
        self,
        call: Call,
        url: str,
        status: int,
        headers: list[tuple[str, str]],
        raw: bytes,
        reads: list[tuple[int, float]],
        headers_ms: float,
        sequence: int,
    ) -> None:
        try:
            recording = build_recording(call, url, status, headers, raw, reads, headers_ms)
            recording.request.sequence = sequence
            relative = self.store.name_for(
                route=call.route.name,
                path=call.path,
                model=recording.request.model,
                key=call.canonical.key,
                sequence=sequence,
            )
            path = self.store.write(relative, to_document(recording))
        except Exception:
            self.outcome.errors += 1
            log.exception("recording not written", route=call.route.name, path=call.path)
            return
        self.outcome.recorded += 1
        log.info(
            "recorded",
            route=call.route.name,
            method=call.method,
            path=call.path,
            status=status,
            file=str(path),
            key=call.canonical.key[:16],
        )


async def _pump(
    upstream: aiohttp.ClientResponse,
    client: web.StreamResponse,
    parts: list[bytes],
    reads: list[tuple[int, float]],
    started: float,
) -> None:
    total = 0
    async for data in upstream.content.iter_any():
        await client.write(data)  # the client first: its time to first token is the upstream's
        parts.append(data)
        total += len(data)
        reads.append((total, (time.monotonic() - started) * 1000))
    await client.write_eof()


def _abort(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.close()


def _safe_url(url: str) -> str:
    """A URL for a log line: secret query parameters removed."""
    base, _, query = url.partition("?")
    if not query:
        return base
    kept = public_query(parse_qsl(query, keep_blank_values=True))
    return f"{base}?{urlencode(kept)}" if kept else base


def capture_response(provider: Provider, path: str, fmt: str, raw: bytes) -> CapturedBody:
    """Chunks and framing for a response body, checked to frame back to what was received."""
    streaming = fmt in ("sse", "ndjson")
    if fmt == "opaque":
        return capture_opaque(raw)
    captured = capture(fmt, raw, lambda value: provider.label(path, streaming, value))
    if captured.framing.get("format") == "json":
        value = provider.json_value(captured.body)
        packed = provider.pack_json(path, value)
        if packed is not None and provider.json_value(packed) == value:
            captured.body = packed
    if not frames_back(captured, raw, provider):
        log.warning("stream does not frame back exactly; stored as text", path=path, format=fmt)
        return capture_opaque(raw)
    return captured


def frames_back(captured: CapturedBody, raw: bytes, provider: Provider) -> bool:
    """Whether replaying the capture gives the received bytes, JSON whitespace aside."""
    rendered = b"".join(render_segments(captured.body, captured.framing, provider.json_value))
    if rendered == raw:
        return True
    fmt = captured.framing.get("format")
    if fmt == "json":
        return orjson.loads(rendered) == orjson.loads(raw)
    if fmt not in ("sse", "ndjson"):
        return False
    got, got_rest = split_stream(fmt, rendered)
    want, want_rest = split_stream(fmt, raw)
    if got_rest != want_rest or len(got) != len(want):
        return False
    return all(a == b or _same_event(fmt, a, b) for a, b in zip(got, want))


def _same_event(fmt: str, left: bytes, right: bytes) -> bool:
    if fmt == "ndjson":
        return orjson.loads(left) == orjson.loads(right) and left[-2:] == right[-2:]
    a, b = parse_sse_event(left.decode()), parse_sse_event(right.decode())
    if (a.event, a.comments, a.other_fields, a.line_ending) != (b.event, b.comments, b.other_fields, b.line_ending):
        return False
    return a.data is not None and b.data is not None and orjson.loads(a.data) == orjson.loads(b.data)


def build_recording(
    call: Call,
    url: str,
    status: int,
    headers: list[tuple[str, str]],
    raw: bytes,
    reads: list[tuple[int, float]],
    headers_ms: float,
) -> Recording:
    provider = call.route.provider
    content_type = next((v for k, v in headers if k.lower() == "content-type"), "")
    captured = capture_response(provider, call.path, body_format(content_type), raw)
    base, _, _ = url.partition("?")
    query = public_query(call.query)
    request = RecordedRequest(
        method=call.method,
        url=f"{base}?{urlencode(query)}" if query else base,
        path=call.path,
        query=query,
        body=call.body_value,
        raw_body=call.body if isinstance(call.body_value, RawBody) else None,
        model=call.model,
        route=call.route.name,
        headers=dict(call.canonical.headers),
    )
    read_ends = [end for end, _ in reads]
    chunk_ms = [round(reads[min(bisect.bisect_left(read_ends, end), len(reads) - 1)][1], 1) for end in captured.chunk_ends]
    timing = {"headers_ms": round(headers_ms, 1), "chunk_ms": chunk_ms} if captured.is_streaming else None
    response = RecordedResponse(
        status=status,
        headers=recorded_response_headers(headers),
        body=captured.body,
        framing=captured.framing,
        timing=timing,
    )
    provenance = {
        "tool": TOOL_NAME,
        "version": __version__,
        "recorded_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "client_user_agent": call.headers.get("user-agent", ""),
    }
    return Recording(request, response, provenance)

