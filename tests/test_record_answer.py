"""Record mode's whole (non-streamed) answer, written by the proxy as one prepared head and body
(answers.PreparedAnswer) instead of aiohttp's Response: what a client receives, byte for byte,
for what an upstream sends, and that replay later serves the same body.

The upstream is a raw asyncio server (tests.test_upstream_wire.RawUpstream) so each test decides
the exact bytes; the client is a raw socket, so nothing between it and the proxy tidies the wire.
Each test runs once per upstream client (llmproxy's http1 and aiohttp).
"""

from __future__ import annotations

import gzip
import json
import re
import socket
from email.utils import parsedate_to_datetime
from pathlib import Path

import pytest
import structlog

from tests.support import LoopThread, files_under, wait_until
from tests.test_upstream_wire import Arrived, RawUpstream, answer, response_head, running, upstream_client

__all__ = ["upstream_client"]  # the fixture, parametrized over both upstream clients

BODY = b'{"id":"chatcmpl-1","object":"chat.completion","choices":[]}'


def _sized(size: int) -> bytes:
    """A JSON body of exactly `size` bytes."""
    return b'{"pad":"' + b"x" * (size - len(b'{"pad":""}')) + b'"}'


def _request(content: str, *, version: str = "1.1", close: bool = True) -> bytes:
    body = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": content}]}).encode()
    head = (
        f"POST /v1/chat/completions HTTP/{version}\r\nHost: proxy\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer sk-test\r\nContent-Length: {len(body)}\r\n"
    )
    return (head + ("Connection: close\r\n" if close else "") + "\r\n").encode() + body


def _exchange(port: int, data: bytes) -> bytes:
    """Send `data`, read until the proxy closes the connection (the last request asks it to)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


def _split(received: bytes) -> list[tuple[list[bytes], bytes]]:
    """Responses framed by Content-Length, one after the other: (head lines, body) each."""
    answers = []
    while received:
        head, _, rest = received.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        lengths = [int(line.split(b":")[1]) for line in lines if line.lower().startswith(b"content-length:")]
        assert len(lengths) == 1, lines
        answers.append((lines, rest[: lengths[0]]))
        received = rest[lengths[0] :]
    return answers


def _recordings(directory: Path) -> list[Path]:
    """The recording files (the journal is a dot-file beside them)."""
    return [path for path in files_under(directory) if path.suffix == ".json"]


def _without_date(lines: list[bytes]) -> list[bytes]:
    """The head lines but Date, which must be there once and be a valid HTTP date."""
    dates = [line for line in lines if line.lower().startswith(b"date:")]
    assert len(dates) == 1, lines
    parsedate_to_datetime(dates[0].split(b":", 1)[1].strip().decode())
    return [line for line in lines if not line.lower().startswith(b"date:")]


JSON_LENGTH = b"Content-Length: %d" % len(BODY)
GZIPPED = gzip.compress(BODY)

# upstream bytes -> the head lines the client must get (Date apart, checked on its own)
CASES: dict[str, tuple[bytes, list[bytes]]] = {
    "repeated headers": (
        response_head(
            b"Content-Type: application/json",
            b"Set-Cookie: a=1; Path=/",
            b"Set-Cookie: b=2; Path=/",
            b"Link: <https://a>; rel=a",
            b"Link: <https://b>; rel=b",
            b'WWW-Authenticate: Basic realm="x"',
            b"WWW-Authenticate: Bearer",
            JSON_LENGTH,
        )
        + BODY,
        [
            b"HTTP/1.1 200 OK",
            b"Content-Type: application/json",
            b"Set-Cookie: a=1; Path=/",
            b"Set-Cookie: b=2; Path=/",
            b"Link: <https://a>; rel=a",
            b"Link: <https://b>; rel=b",
            b'WWW-Authenticate: Basic realm="x"',
            b"WWW-Authenticate: Bearer",
            JSON_LENGTH,
            b"Connection: close",
        ],
    ),
    "latin-1 and UTF-8 values": (
        response_head(b"Content-Type: application/json", b"X-Name: caf\xe9", b"X-Utf: caf\xc3\xa9", JSON_LENGTH) + BODY,
        [
            b"HTTP/1.1 200 OK",
            b"Content-Type: application/json",
            b"X-Name: caf\xe9",
            b"X-Utf: caf\xc3\xa9",
            JSON_LENGTH,
            b"Connection: close",
        ],
    ),
    "upstream's Date and Server": (
        response_head(
            b"Date: Mon, 01 Jan 2001 00:00:00 GMT",
            b"Server: upstream/1",
            b"Content-Type: application/json",
            JSON_LENGTH,
        )
        + BODY,
        [
            b"HTTP/1.1 200 OK",
            b"Server: upstream/1",
            b"Content-Type: application/json",
            JSON_LENGTH,
            b"Connection: close",
        ],
    ),
    "unknown status 299": (
        response_head(b"Content-Type: application/json", JSON_LENGTH, status=b"299 Whatever") + BODY,
        [b"HTTP/1.1 299 ", b"Content-Type: application/json", JSON_LENGTH, b"Connection: close"],
    ),
    "unknown status 420": (
        response_head(b"Content-Type: application/json", JSON_LENGTH, status=b"420 Enhance Your Calm") + BODY,
        [b"HTTP/1.1 420 ", b"Content-Type: application/json", JSON_LENGTH, b"Connection: close"],
    ),
    "interim 100 and 103 first": (
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </x>; rel=preload\r\n\r\n"
        + response_head(b"Content-Type: application/json", JSON_LENGTH)
        + BODY,
        [b"HTTP/1.1 200 OK", b"Content-Type: application/json", JSON_LENGTH, b"Connection: close"],
    ),
    "chunked": (
        response_head(b"Content-Type: application/json", b"Transfer-Encoding: chunked")
        + b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (7, BODY[:7], len(BODY) - 7, BODY[7:]),
        [b"HTTP/1.1 200 OK", b"Content-Type: application/json", JSON_LENGTH, b"Connection: close"],
    ),
    "gzip": (
        response_head(
            b"Content-Type: application/json", b"Content-Encoding: gzip", b"Content-Length: %d" % len(GZIPPED)
        )
        + GZIPPED,
        [b"HTTP/1.1 200 OK", b"Content-Type: application/json", JSON_LENGTH, b"Connection: close"],
    ),
    # aiohttp's Response added its default content type (and still does for HTTP/1.0 and HEAD)
    "no content type": (
        response_head(b"Content-Length: 5") + b"hello",
        [b"HTTP/1.1 200 OK", b"Content-Type: application/octet-stream", b"Content-Length: 5", b"Connection: close"],
    ),
    "empty body": (
        response_head(b"Content-Type: application/json", b"Content-Length: 0"),
        [b"HTTP/1.1 200 OK", b"Content-Type: application/json", b"Content-Length: 0", b"Connection: close"],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_whole_answer_reaches_the_client_as_the_upstream_sent_it(
    loop_thread: LoopThread, tmp_path: Path, upstream_client: str, case: str
) -> None:
    sent, expected = CASES[case]
    upstream = RawUpstream(loop_thread, answer(sent)).start()
    try:
        with running(loop_thread, "record", tmp_path, upstream_client, upstream=upstream.url) as proxy:
            [(lines, body)] = _split(_exchange(proxy.server.port, _request(case)))
            expected_body = b"hello" if case == "no content type" else b"" if case == "empty body" else BODY
            assert body == expected_body
            assert _without_date(lines) == expected
            if case == "upstream's Date and Server":
                assert b"Date: Mon, 01 Jan 2001 00:00:00 GMT" in lines  # the upstream's, not a second one
    finally:
        upstream.stop()


def test_an_obsolete_folded_header_reaches_the_client_unfolded(
    loop_thread: LoopThread, tmp_path: Path, upstream_client: str
) -> None:
    sent = response_head(b"Content-Type: application/json", b"X-Folded: a", b"  b", JSON_LENGTH) + BODY
    upstream = RawUpstream(loop_thread, answer(sent)).start()
    try:
        with running(loop_thread, "record", tmp_path, upstream_client, upstream=upstream.url) as proxy:
            [(lines, body)] = _split(_exchange(proxy.server.port, _request("folded")))
        assert body == BODY
        folded = [line for line in lines if line.startswith(b"X-Folded:")]
        assert len(folded) == 1 and re.fullmatch(rb"X-Folded: a +b", folded[0]), lines  # one line, no CR/LF in it
    finally:
        upstream.stop()


def test_http10_and_http11_clients_get_the_same_headers_without_content_type(
    loop_thread: LoopThread, tmp_path: Path, upstream_client: str
) -> None:
    """HTTP/1.0 still gets aiohttp's Response: both paths answer with the same Content-Type."""
    upstream = RawUpstream(loop_thread, answer(response_head(b"Content-Length: 5") + b"hello")).start()
    try:
        with running(loop_thread, "record", tmp_path, upstream_client, upstream=upstream.url) as proxy:
            heads = {}
            for version in ("1.0", "1.1"):
                [(lines, body)] = _split(_exchange(proxy.server.port, _request(version, version=version)))
                assert body == b"hello"
                heads[version] = [line for line in lines if line.lower().startswith(b"content-type:")]
        assert heads["1.0"] == heads["1.1"] == [b"Content-Type: application/octet-stream"]
    finally:
        upstream.stop()


SIZES = {
    "small": 100,
    "just under 64 KB": 64 * 1024 - 1,
    "just over 64 KB": 64 * 1024 + 1,
    "near 1 MB": 1024 * 1024 - 3,
}


def test_pipelined_answers_on_one_connection_arrive_whole_in_order_and_replay_the_same(
    loop_thread: LoopThread, tmp_path: Path, upstream_client: str
) -> None:
    async def respond(arrived: Arrived, writer: object) -> bool:
        content = json.loads(arrived.body)["messages"][0]["content"]
        body = _sized(SIZES[content])
        writer.write(response_head(b"Content-Type: application/json", b"Content-Length: %d" % len(body)) + body)  # type: ignore[attr-defined]
        await writer.drain()  # type: ignore[attr-defined]
        return True

    names = list(SIZES)
    # Every request written at once; only the last asks the proxy to close.
    requests = b"".join(_request(name, close=index == len(names) - 1) for index, name in enumerate(names))
    upstream = RawUpstream(loop_thread, respond).start()
    try:
        with running(loop_thread, "record", tmp_path, upstream_client, upstream=upstream.url) as proxy:
            recorded = _split(_exchange(proxy.server.port, requests))
    finally:
        upstream.stop()
    assert [body for _, body in recorded] == [_sized(SIZES[name]) for name in names]
    assert [b"Connection: close" in lines for lines, _ in recorded] == [False] * (len(names) - 1) + [True]
    assert len(_recordings(tmp_path)) == len(names)
    with running(loop_thread, "replay", tmp_path, upstream_client) as proxy:
        replayed = _split(_exchange(proxy.server.port, requests))
    assert [body for _, body in replayed] == [body for _, body in recorded]


def test_a_client_leaving_in_the_middle_of_a_whole_answer_still_gets_it_recorded(
    loop_thread: LoopThread, tmp_path: Path, upstream_client: str
) -> None:
    body = _sized(1024 * 1024 - 3)  # sent whole (under WHOLE_BODY_BYTES), in slices past the first 64 KB
    sent = response_head(b"Content-Type: application/json", b"Content-Length: %d" % len(body)) + body
    upstream = RawUpstream(loop_thread, answer(sent)).start()
    try:
        with structlog.testing.capture_logs() as logs:
            with running(loop_thread, "record", tmp_path, upstream_client, upstream=upstream.url) as proxy:
                with socket.create_connection(("127.0.0.1", proxy.server.port), timeout=30) as sock:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                    sock.sendall(_request("leaves"))
                    assert sock.recv(1024).startswith(b"HTTP/1.1 200 OK\r\n")
                    # An abortive close (RST) with most of the answer unread.
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                wait_until(lambda: _recordings(tmp_path), "the recording")
    finally:
        upstream.stop()
    [path] = _recordings(tmp_path)
    assert json.loads(path.read_text())["response"]["body"]["__data__"] == json.loads(body)
    assert not [line for line in logs if line["log_level"] in ("error", "critical")], logs
