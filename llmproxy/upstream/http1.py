"""A lean HTTP/1.1 upstream client on asyncio protocols (see upstream.base.Upstream).

It does what the proxy needs and no more: one request at a time per pooled keep-alive
connection, bodies framed by Content-Length, chunked encoding or the connection's end,
gzip and deflate decoded, TLS verified against the system's trust store (SSL_CERT_FILE and
SSL_CERT_DIR apply). It sends what aiohttp's client sent (the same URL encoding, Host, Accept
and Accept-Encoding). aiohttp's client session was the largest cost on record mode's event loop
after the server itself; with this client the loop's CPU per recorded exchange went from 953 to
627 µs (`python -m bench.variants`, small JSON, 16 clients). `upstream_client = "aiohttp"`
switches back to aiohttp's client.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import re
import ssl
import time
import zlib
from collections.abc import AsyncIterator

import structlog
from yarl import URL

from llmproxy.call import Call
from llmproxy.upstream.base import UpstreamBroken, UpstreamFailure, prepared_request
from llmproxy.upstream.client import safe_url

log = structlog.get_logger("llmproxy.upstream")

ACCEPT_ENCODING = "gzip, deflate"  # what the body decoder below understands
MAX_HEAD_BYTES = 64 * 1024  # status line and headers; more is not an HTTP upstream we can serve
MAX_CONTROL_LINE = 4096  # a chunk-size line or a trailer line
# Decoded bytes waiting for the pipeline before the socket stops being read: backpressure
# reaches the upstream instead of piling up here.
READ_HIGH_WATER = 256 * 1024
DECODE_STEP = 64 * 1024  # decoded bytes per decompress call
MAX_GZIP_MEMBERS = 1024  # as aiohttp
MAX_INTERIM = 100  # 1xx responses before the final one: more is an upstream stuck in a loop
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
IDLE_SECONDS = 15.0  # a pooled connection unused this long is closed (aiohttp's keepalive_timeout)
BODYLESS_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # a header name (RFC 9110 5.1)
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # never in a header value (HTAB is fine)
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")


class _Framing(enum.Enum):
    NONE = "none"
    LENGTH = "length"
    CHUNKED = "chunked"
    UNTIL_CLOSE = "until-close"


class _Chunk(enum.Enum):
    SIZE = "size"
    DATA = "data"
    DATA_END = "data-end"
    TRAILER = "trailer"


class _Stale(Exception):
    """A connection ended before a byte of the response came (a pooled connection the
    upstream had closed meanwhile): the request may go again on a new connection."""


class _BadResponse(Exception):
    """The upstream's bytes are not HTTP/1.1 this client can read."""


@functools.lru_cache(maxsize=4096)
def _target(url: str | URL) -> tuple[str, str, int, str, str]:
    """(scheme, host, port, Host header, path and query) for a URL, encoded as aiohttp encodes it
    (a yarl URL, e.g. one a provider signed, is sent exactly as it is)."""
    parsed = url if isinstance(url, URL) else URL(url)
    if parsed.scheme not in ("http", "https") or not parsed.raw_host or parsed.port is None:
        raise ValueError(f"not an http(s) URL: {safe_url(str(url))}")
    if any(char <= " " or char == "\x7f" for char in parsed.raw_path_qs):
        raise ValueError("the path holds a space or a control character, which cannot be sent")
    return parsed.scheme, parsed.raw_host, parsed.port, parsed.host_port_subcomponent or "", parsed.raw_path_qs


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection to an upstream: at most one response at a time."""

    def __init__(self, key: tuple[str, str, int], opened: set[_Connection]) -> None:
        self.key = key
        self._opened = opened  # the upstream's set of open connections: left when this one ends
        self.transport: asyncio.Transport | None = None
        self.response: Http1Response | None = None
        self.lost = False
        self.reused = False
        self.idle_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is None or response.done:
            self.close()  # bytes nobody asked for: this connection's framing cannot be trusted
            return
        response.feed(data)

    def eof_received(self) -> bool:
        if self.response is not None:
            self.response.feed_end(None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._opened.discard(self)
        if self.response is not None:
            self.response.feed_end(exc)

    def usable(self) -> bool:
        return not self.lost and self.transport is not None and not self.transport.is_closing()

    def close(self) -> None:
        self.lost = True
        if self.transport is not None:
            self.transport.close()


class Http1Response:
    """The response on one connection: its head, then its body as it arrives."""

    def __init__(self, upstream: Http1Upstream, connection: _Connection, method: str, url: str, started: float) -> None:
        self._upstream = upstream
        self._connection = connection
        self._loop = upstream.loop
        self._method = method
        self.url = url
        self._started = started
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self.headers_ms = 0.0
        self.done = False  # the body is complete
        self._head_seen = False
        self._any_byte = False
        self._keep_alive = False
        self._framing = _Framing.NONE
        self._remaining = 0  # LENGTH: body bytes still to come; CHUNKED: of the current chunk
        self._chunk = _Chunk.SIZE
        self._partial = b""  # an incomplete head, chunk-size or trailer line
        self._encoding = ""  # "gzip" or "deflate" when the body is decoded here
        self._decoder: zlib._Decompress | None = None  # made at the body's first byte
        self._undecoded = b""  # compressed bytes waiting for the reader to take what was decoded
        self._ending = False  # the body ended, but _undecoded still waits
        self._members = 1
        self._interim = 0  # 1xx responses skipped
        self._pieces: list[bytes] = []
        self._buffered = 0
        self._paused = False
        self._error: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._last_read = self._loop.time()
        self._timer: asyncio.TimerHandle | None = None

    # -- fed by the connection ---------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        self._any_byte = True
        try:
            if not self._head_seen:
                # Until the final head, read_timeout runs from the request: interim responses
                # or a head sent a byte at a time do not extend it.
                data = self._feed_head(data)
                if not self._head_seen or not data:
                    return
            else:
                self._last_read = self._loop.time()
            if self._framing is _Framing.CHUNKED:
                self._feed_chunked(data)
            elif self._framing is _Framing.LENGTH:
                if len(data) >= self._remaining:
                    if len(data) > self._remaining:
                        self._keep_alive = False  # bytes past the body: do not trust this connection
                        data = data[: self._remaining]
                    self._remaining = 0
                    self._take(data)
                    self._finish()
                else:
                    self._remaining -= len(data)
                    self._take(data)
            elif self._framing is _Framing.UNTIL_CLOSE:
                self._take(data)
            else:
                self._keep_alive = False  # a body after a bodyless response
        except _BadResponse as exc:
            self._fail(exc)
        except ValueError as exc:  # nothing above should raise it; a bad byte must not kill the connection's callback
            self._fail(_BadResponse(str(exc)))

    def feed_end(self, exc: Exception | None) -> None:
        """The connection ended (EOF or lost)."""
        if self.done or self._error is not None or self._ending:
            return  # (ending: the body is all here, its decoding waits for the reader)
        if self._head_seen and self._framing is _Framing.UNTIL_CLOSE:
            try:
                self._finish()
            except _BadResponse as error:
                self._fail(error)
            return
        if not self._any_byte:
            self._fail(_Stale(str(exc) if exc else "the upstream closed the connection"))
        elif not self._head_seen:
            self._fail(_BadResponse("the upstream closed the connection in the middle of the response headers"))
        else:
            detail = f": {exc}" if exc else ""
            self._fail(UpstreamBroken(f"the upstream closed the connection before the end of the body{detail}"))

    # -- parsing -----------------------------------------------------------------------------

    def _feed_head(self, data: bytes) -> bytes:
        """Parse what completes the head (skipping interim 1xx responses); the rest is body."""
        if self._partial:
            data = self._partial + data
            self._partial = b""
        while True:
            end, after = _head_end(data)
            if end < 0 or end > MAX_HEAD_BYTES:
                if len(data) > MAX_HEAD_BYTES:
                    raise _BadResponse(f"response headers larger than {MAX_HEAD_BYTES} bytes")
                self._partial = data
                return b""
            head, data = data[:end], data[after:]
            status, headers, version = _parse_head(head)
            if 100 <= status < 200:
                if status == 101:
                    raise _BadResponse("the upstream switched protocols (101)")
                self._interim += 1
                if self._interim > MAX_INTERIM:
                    raise _BadResponse(f"more than {MAX_INTERIM} interim (1xx) responses")
                continue  # 100 Continue, 103 Early Hints: the real response follows
            break
        self.status = status
        self.headers = headers
        self.headers_ms = (time.monotonic() - self._started) * 1000
        self._last_read = self._loop.time()
        self._frame(headers, version)
        self._head_seen = True
        self._wake()
        if self._framing is _Framing.NONE:
            self._finish()
        return data

    def _frame(self, headers: list[tuple[str, str]], version: str) -> None:
        length: str | None = None
        codings: list[str] = []
        transfer_coded = False
        connection = ""
        encoding = ""
        for name, value in headers:
            lowered = name.lower()
            if lowered == "content-length":
                if length is not None:  # even two equal ones, as aiohttp: one response, one length
                    raise _BadResponse("more than one Content-Length header")
                length = value.strip()
            elif lowered == "transfer-encoding":
                transfer_coded = True
                codings += [coding.strip() for coding in value.lower().split(",")]
            elif lowered == "connection":
                connection += "," + value.lower()
            elif lowered == "content-encoding":
                encoding = value.strip().lower()
        tokens = {token.strip() for token in connection.split(",")}
        self._keep_alive = "keep-alive" in tokens if version == "HTTP/1.0" else "close" not in tokens
        if self._method == "HEAD" or self.status in (204, 304):
            self._framing = _Framing.NONE
            return
        if transfer_coded:
            chunked = codings[-1] == "chunked"
            undecoded = [coding for coding in codings if coding not in ("chunked", "identity")]
            if undecoded:  # passed on, the body would reach the client still encoded
                raise _BadResponse(f"Transfer-Encoding {', '.join(undecoded)!r}, which is not decoded here")
            if length is not None:  # RFC 9112 6.3: a sign of response splitting, handled as an error
                raise _BadResponse("both Transfer-Encoding and Content-Length")
            self._framing = _Framing.CHUNKED if chunked else _Framing.UNTIL_CLOSE
        elif length is not None:
            if not length.isdigit() or not length.isascii() or len(length) > 19:
                raise _BadResponse(f"invalid Content-Length {length[:40]!r}")
            self._remaining = int(length)
            self._framing = _Framing.LENGTH if self._remaining else _Framing.NONE
        else:
            self._framing = _Framing.UNTIL_CLOSE
        if self._framing is _Framing.UNTIL_CLOSE:
            self._keep_alive = False
        if encoding in ("gzip", "x-gzip"):
            self._encoding = "gzip"
        elif encoding == "deflate":
            self._encoding = "deflate"
        elif encoding and encoding != "identity" and self._framing is not _Framing.NONE:
            # Passed on, its bytes would reach the client (and the recording) still encoded, with
            # nothing saying so: only what was asked for (gzip, deflate) can be answered.
            raise _BadResponse(f"a body in Content-Encoding {encoding!r}, which was not asked for")

    def _feed_chunked(self, data: bytes) -> None:
        # One take per network read, however many chunks it holds (a stream of tiny chunks
        # would otherwise cost a wake-up each).
        taken: list[bytes] = []
        try:
            complete = self._dechunk(data, taken)
        finally:
            if taken:
                self._take(taken[0] if len(taken) == 1 else b"".join(taken))
        if complete:
            self._finish()

    def _dechunk(self, data: bytes, taken: list[bytes]) -> bool:
        """Append the chunks' data in `data` to `taken`; True once the body is complete."""
        if self._partial:
            data = self._partial + data
            self._partial = b""
        position, size = 0, len(data)
        while position < size:
            state = self._chunk
            if state is _Chunk.DATA:
                take = min(self._remaining, size - position)
                taken.append(data if take == size else data[position : position + take])
                position += take
                self._remaining -= take
                if not self._remaining:
                    self._chunk = _Chunk.DATA_END
                continue
            end = data.find(b"\n", position)
            if end < 0:
                self._partial = data[position:]
                if len(self._partial) > MAX_CONTROL_LINE:
                    raise _BadResponse("chunk-size or trailer line too long")
                return False
            line = data[position : end - 1 if end > position and data[end - 1] == 13 else end]  # CRLF or a bare LF
            position = end + 1
            if state is _Chunk.DATA_END:
                if line:
                    raise _BadResponse("a chunk is longer than its size")
                self._chunk = _Chunk.SIZE
            elif state is _Chunk.SIZE:
                digits = line.split(b";", 1)[0].rstrip(b" \t")  # whitespace may precede an extension
                if not _HEX.fullmatch(digits):
                    raise _BadResponse(f"invalid chunk size {bytes(line[:40])!r}")
                chunk_size = int(digits, 16)
                if chunk_size:
                    self._remaining = chunk_size
                    self._chunk = _Chunk.DATA
                else:
                    self._chunk = _Chunk.TRAILER
            elif not line:  # the empty line after the trailers: the body is complete
                if position < size:
                    self._keep_alive = False
                return True
        return False

    def _take(self, data: bytes) -> None:
        if self._encoding:
            self._take_encoded(data)
            return
        self._pieces.append(data)
        self._buffered += len(data)
        self._pause_if_full()
        self._wake()

    def _take_encoded(self, data: bytes) -> None:
        if not data:
            return
        if self._undecoded:  # decoding waits for the reader: this waits with it
            self._undecoded += data
            return
        if self._decoder is None:
            # Some servers send raw deflate for "deflate": the first byte tells (as aiohttp does).
            raw = self._encoding == "deflate" and data[0] & 0x0F != 8
            self._decoder = zlib.decompressobj(-zlib.MAX_WBITS if raw else _WBITS[self._encoding])
        self._decode(data)

    def _decode(self, data: bytes) -> None:
        """Decode at most what fits below the high-water mark; the rest waits for the reader (a
        small body that decodes to gigabytes never sits in memory whole)."""
        decoder = self._decoder
        assert decoder is not None
        while data:
            try:
                out = decoder.decompress(data, DECODE_STEP)
            except zlib.error as exc:
                raise _BadResponse(f"cannot decode the {self._encoding} body: {exc}") from None
            if out:
                self._pieces.append(out)
                self._buffered += len(out)
            data = decoder.unconsumed_tail
            if decoder.eof and decoder.unused_data and self._encoding == "gzip":
                self._members += 1  # concatenated gzip members are one body
                if self._members > MAX_GZIP_MEMBERS:
                    raise _BadResponse(f"gzip body of more than {MAX_GZIP_MEMBERS} members")
                data = decoder.unused_data
                decoder = self._decoder = zlib.decompressobj(_WBITS["gzip"])
            if data and self._buffered >= READ_HIGH_WATER:
                self._undecoded = data
                break
        self._pause_if_full()
        self._wake()

    def _decode_more(self) -> None:
        data, self._undecoded = self._undecoded, b""
        try:
            self._decode(data)
            if not self._undecoded and self._ending:
                self._finish()
        except _BadResponse as exc:
            self._fail(exc)

    def _pause_if_full(self) -> None:
        if (self._buffered > READ_HIGH_WATER or self._undecoded) and not self._paused:
            transport = self._connection.transport
            if transport is not None:
                self._paused = True
                transport.pause_reading()

    def _finish(self) -> None:
        if self._undecoded:
            self._ending = True  # complete once what waits is decoded
            return
        self._ending = False
        if self._decoder is not None:
            try:
                rest = self._decoder.flush()
            except zlib.error as exc:
                raise _BadResponse(f"cannot decode the {self._encoding} body: {exc}") from None
            if rest:
                self._pieces.append(rest)
                self._buffered += len(rest)
            if not self._decoder.eof:
                raise _BadResponse(f"the {self._encoding} body ends before its compressed stream does")
        self.done = True
        self._cancel_timer()
        self._wake()

    def _fail(self, exc: Exception) -> None:
        if self._error is None and not self.done:
            self._error = exc
            self._keep_alive = False
            self._cancel_timer()
            self._wake()

    # -- the pipeline's side -----------------------------------------------------------------

    async def head(self) -> None:
        """Until the status and headers are here; raises what ended the response before that."""
        while not self._head_seen:
            if self._error is not None:
                raise self._error
            await self._wait()
        if isinstance(self._error, _BadResponse):
            raise self._error  # already malformed in what came with the head: a 502, as aiohttp gives

    async def chunks(self) -> AsyncIterator[bytes]:
        while True:
            pieces = self._pieces
            if pieces:
                data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
                self._pieces = []
                self._buffered = 0
                if self._undecoded:
                    self._decode_more()
                if self._paused and not self._undecoded:
                    self._paused = False
                    self._last_read = self._loop.time()  # the upstream waited on us, not we on it
                    if self._connection.transport is not None:
                        self._connection.transport.resume_reading()
                yield data
                continue
            if self.done:
                return
            if self._error is not None:
                error = self._error
                raise error if isinstance(error, UpstreamBroken) else UpstreamBroken(str(error))
            await self._wait()

    def close(self) -> None:
        self._cancel_timer()
        connection = self._connection
        connection.response = None
        if self.done and self._keep_alive and not self._pieces:
            self._upstream._release(connection)
        else:
            # Closing is what tells an upstream still sending (or still thinking) that nobody
            # listens any more.
            connection.close()

    async def _wait(self) -> None:
        waiter = self._waiter = self._loop.create_future()
        if self._timer is None:
            self._timer = self._loop.call_at(self._last_read + self._upstream.read_timeout, self._check_timeout)
        try:
            await waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _check_timeout(self) -> None:
        self._timer = None
        if self.done or self._error is not None:
            return
        due = self._last_read + self._upstream.read_timeout
        if self._loop.time() < due:
            self._timer = self._loop.call_at(due, self._check_timeout)
        elif self._waiter is not None:
            self._fail(TimeoutError(f"no data from the upstream for {self._upstream.read_timeout:g} s"))

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def _head_end(data: bytes) -> tuple[int, int]:
    """Where the head ends and the body begins; lines may end in a bare LF (as aiohttp accepts).
    Only the first MAX_HEAD_BYTES are searched: a longer head is refused anyway."""
    crlf = data.find(b"\n\r\n", 0, MAX_HEAD_BYTES + 3)
    lf = data.find(b"\n\n", 0, MAX_HEAD_BYTES + 2)
    if lf >= 0 and (crlf < 0 or lf < crlf):
        return lf + 1, lf + 2
    return (crlf + 1, crlf + 3) if crlf >= 0 else (-1, -1)


def _parse_head(head: bytes) -> tuple[int, list[tuple[str, str]], str]:
    text = head.decode("utf-8", "surrogateescape")
    lines = text.split("\n")  # each line's "\r" is removed below: a bare LF ends a line too
    status_line = lines[0].rstrip("\r")
    version, _, rest = status_line.partition(" ")
    code = rest[:3]
    if version not in ("HTTP/1.1", "HTTP/1.0") or len(code) != 3 or not code.isdigit() or rest[3:4] not in ("", " "):
        raise _BadResponse(f"not an HTTP/1.1 status line: {status_line[:80]!r}")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        line = line.removesuffix("\r")
        if not line:
            continue
        if line[0] in " \t" and headers:  # obsolete line folding: the previous value goes on
            if _CONTROL.search(line):
                raise _BadResponse(f"invalid response header line {line[:80]!r}")
            name, value = headers[-1]
            headers[-1] = (name, (value + " " + line.strip(" \t")).strip())
            continue
        name, colon, value = line.partition(":")
        if not colon or not _TOKEN.fullmatch(name) or _CONTROL.search(value):
            raise _BadResponse(f"invalid response header line {line[:80]!r}")
        headers.append((name, value.strip(" \t")))
    return int(code), headers, version


class Http1Upstream:
    """Sends calls to their route's upstream over pooled keep-alive HTTP/1.1 connections."""

    def __init__(self, *, connect_timeout: float = 10.0, read_timeout: float = 600.0) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._open: set[_Connection] = set()
        self._ssl: ssl.SSLContext | None = None
        self._sweep: asyncio.TimerHandle | None = None
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # set by start()

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()

    async def close(self) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for connection in list(self._open):
            connection.close()
        self._open.clear()
        self._idle.clear()

    async def send(self, call: Call) -> Http1Response:
        assert self.loop is not None, "Http1Upstream.start() was not awaited"
        route = call.route
        url, target, headers = await prepared_request(call)
        try:
            scheme, host, port, host_header, path_qs = _target(target)
        except ValueError as exc:
            raise UpstreamFailure(502, "no_upstream", f"upstream {route.name}: {exc}") from None
        request = _request_bytes(call.method, path_qs, host_header, headers, call.body)
        key = (scheme, host, port)
        started = time.monotonic()
        for attempt in (1, 2):
            connection = self._reused(key) if attempt == 1 else None
            if connection is None:
                connection = await self._connect(key, route.name, url)
            response = Http1Response(self, connection, call.method, url, started)
            connection.response = response
            connection.transport.write(request)  # type: ignore[union-attr]
            try:
                await response.head()
            except _Stale as exc:
                connection.response = None
                connection.close()
                if connection.reused and attempt == 1 and call.method in IDEMPOTENT_METHODS:
                    # The upstream had closed this pooled connection: once more, on a new one. A
                    # POST is not sent twice (as aiohttp): the upstream may have acted on it.
                    continue
                log.error("upstream closed the connection", route=route.name, url=safe_url(url), error=str(exc))
                message = f"upstream {route.name} closed the connection without answering"
                raise UpstreamFailure(502, "upstream_unreachable", message) from None
            except TimeoutError:
                response.close()
                log.error("upstream timeout", route=route.name, url=safe_url(url))
                message = f"upstream {route.name} did not answer in time"
                raise UpstreamFailure(504, "upstream_timeout", message) from None
            except _BadResponse as exc:
                response.close()
                log.error("upstream sent a malformed response", route=route.name, url=safe_url(url), error=str(exc))
                message = f"upstream {route.name} sent a malformed response: {exc}"
                raise UpstreamFailure(502, "upstream_unreachable", message) from None
            except asyncio.CancelledError:
                response.close()
                raise
            return response
        raise AssertionError("unreachable")  # pragma: no cover

    def _reused(self, key: tuple[str, str, int]) -> _Connection | None:
        idle = self._idle.get(key)
        while idle:
            connection = idle.pop()
            if connection.usable():
                connection.reused = True
                return connection
            self._open.discard(connection)
        return None

    async def _connect(self, key: tuple[str, str, int], route_name: str, url: str) -> _Connection:
        scheme, host, port = key
        context = self._ssl_context() if scheme == "https" else None
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, connection = await self.loop.create_connection(
                    functools.partial(_Connection, key, self._open),
                    host,
                    port,
                    ssl=context,
                    server_hostname=host if context else None,
                )
        except TimeoutError:
            log.error("upstream timeout", route=route_name, url=safe_url(url))
            message = f"upstream {route_name} did not answer in time (connecting to {host}:{port})"
            raise UpstreamFailure(504, "upstream_timeout", message) from None
        except (OSError, ssl.SSLError, ValueError) as exc:
            log.error("upstream unreachable", route=route_name, url=safe_url(url), error=str(exc))
            message = f"cannot reach upstream {route_name}: cannot connect to {host}:{port}: {exc}"
            raise UpstreamFailure(502, "upstream_unreachable", message) from None
        if not connection.lost:
            self._open.add(connection)
        return connection

    def _release(self, connection: _Connection) -> None:
        if not connection.usable():
            self._open.discard(connection)
            return
        connection.idle_since = self.loop.time()
        self._idle.setdefault(connection.key, []).append(connection)
        if self._sweep is None:
            self._sweep = self.loop.call_later(IDLE_SECONDS, self._close_idle)

    def _close_idle(self) -> None:
        self._sweep = None
        oldest_kept = self.loop.time() - IDLE_SECONDS
        for key, idle in list(self._idle.items()):
            kept = [connection for connection in idle if connection.idle_since > oldest_kept and connection.usable()]
            for connection in idle:
                if connection not in kept:
                    connection.close()
                    self._open.discard(connection)
            if kept:
                self._idle[key] = kept
            else:
                del self._idle[key]
        if self._idle:
            self._sweep = self.loop.call_later(IDLE_SECONDS, self._close_idle)

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
            self._ssl.set_alpn_protocols(["http/1.1"])
        return self._ssl


def _request_bytes(method: str, path_qs: str, host: str, headers: list[tuple[str, str]], body: bytes) -> bytes:
    lines = [f"{method} {path_qs} HTTP/1.1", ""]
    has_accept = False
    for name, value in headers:
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name or ":" in name:
            raise UpstreamFailure(502, "internal_error", f"header {name!r} cannot be sent: it holds a line break")
        lowered = name.lower()
        if lowered == "accept":
            has_accept = True
        elif lowered == "host":
            host = value  # a provider's hook that set it (e.g. signed it) keeps it
            continue
        elif lowered in ("content-length", "accept-encoding", "transfer-encoding", "connection"):
            continue  # framed and negotiated here
        lines.append(f"{name}: {value}")
    lines[1] = f"Host: {host}"
    if not has_accept:
        lines.append("Accept: */*")
    lines.append(f"Accept-Encoding: {ACCEPT_ENCODING}")
    if body or method not in BODYLESS_METHODS:
        lines.append(f"Content-Length: {len(body)}")
    lines.append("\r\n")
    head = "\r\n".join(lines).encode("utf-8", "surrogateescape")
    return head + body if body else head
