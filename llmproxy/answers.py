"""A replayed answer written to the client in one go.

aiohttp's `web.Response` builds, checks and serializes the same headers again for every
request (about a quarter of the event loop's time per replayed request). A recording's status
line and headers are known when it is loaded: they are serialized once, with the recording,
and each request adds only its Date and, when the client asked to close, `Connection: close`.

The object is what aiohttp's server expects of a handler's answer (`prepare`, `write_eof`,
`keep_alive`); aiohttp's own response is used wherever HTTP has special cases (HEAD, 204, 304,
HTTP/1.0), so those keep aiohttp's handling.
"""

from __future__ import annotations

from collections.abc import Iterable
from http import HTTPStatus

from aiohttp import HttpVersion11, web
from aiohttp.helpers import rfc822_formatted_time

# A body this small is sent with its head in one write (one system call); a larger one
# follows it, to spare copying it.
JOIN_BELOW = 64 * 1024
WRITE_SLICE = 256 * 1024


def wire_head(status: int, headers: Iterable[tuple[str, str]], length: int) -> bytes:
    """The status line's tail and the header block of an answer, Date excepted.
    The headers were checked before (a recording's when it was rendered, an upstream's by the
    parser): names are tokens, values have no CR, LF or control characters. They are encoded as
    aiohttp encodes them (UTF-8); bytes an upstream sent that are not UTF-8 go back as they came."""
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = ""
    lines = [f" {status} {reason}\r\n"]
    lines += [f"{name}: {value}\r\n" for name, value in headers]
    lines.append(f"Content-Length: {length}\r\n")
    return "".join(lines).encode("utf-8", "surrogateescape")


class PreparedAnswer:
    """One whole answer (replayed, or a recorded call's body once complete): `head` from
    `wire_head`, `dated` when the answer has its own Date."""

    __slots__ = ("_head", "_body", "_dated", "keep_alive")

    def __init__(self, head: bytes, body: bytes, dated: bool) -> None:
        self._head = head
        self._body = body
        self._dated = dated
        self.keep_alive = True

    async def prepare(self, request: web.BaseRequest) -> None:
        self.keep_alive = keep_alive = request.keep_alive
        head = b"HTTP/1.1" + self._head
        if not self._dated:  # aiohttp's, formatted once a second
            head += b"Date: " + rfc822_formatted_time().encode("ascii") + b"\r\n"
        head += b"\r\n" if keep_alive else b"Connection: close\r\n\r\n"
        body = self._body
        writer = request.writer
        if len(body) < JOIN_BELOW:
            await writer.write(head + body)
            return
        await writer.write(head, drain=False)
        # In slices, each written once the client took the one before (the writer drains): the
        # transport would otherwise copy all it cannot send at once, a whole body per slow reader.
        view = memoryview(body)
        for start in range(0, len(body), WRITE_SLICE):
            await writer.write(view[start : start + WRITE_SLICE])

    async def write_eof(self, data: bytes = b"") -> None:
        """Everything was written by `prepare`."""


def fits(request: web.BaseRequest, status: int) -> bool:
    """Whether a PreparedAnswer answers this request as aiohttp's Response would."""
    return request.version == HttpVersion11 and request.method != "HEAD" and status not in (204, 304)
