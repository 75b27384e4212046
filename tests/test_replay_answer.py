"""Replayed answers on the wire: what a client reads from a raw socket, whichever way the
answer was written (llmproxy's prepared answer for plain HTTP/1.1, aiohttp's response for
HEAD, 204/304 and HTTP/1.0), including keep-alive, Connection: close and recorded headers."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest

from llmproxy.store.document import TOOL_NAME
from tests.support import CliProxy, LoopThread, RunningProxy, start_proxy

ASK = {"model": "gpt-4o", "messages": [{"role": "user", "content": "wire"}]}
ANSWER = {"id": "chatcmpl-1", "object": "chat.completion", "choices": [{"index": 0, "message": {"content": "É"}}]}


def _recording(
    directory: Path,
    name: str,
    *,
    status: int = 200,
    headers: dict[str, str] | None = None,
    body: Any = ANSWER,
    ask: dict[str, Any] = ASK,
) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    document = {
        "provenance": {"tool": TOOL_NAME},  # llmproxy's own format: its response headers are kept
        "request": {
            "method": "POST",
            "url": "https://api.openai.com/v1/chat/completions",
            "headers": {},
            "body": ask,
            "endpoint": "/v1/chat/completions",
            "model": "gpt-4o",
        },
        "response": {
            "status": status,
            "headers": {"content-type": "application/json", **(headers or {})},
            "body": body,
            "is_streaming": False,
        },
    }
    (directory / name).write_text(json.dumps(document, indent=2))


def _request(
    ask: dict[str, Any] = ASK, *, method: bytes = b"POST", version: bytes = b"HTTP/1.1", extra: bytes = b""
) -> bytes:
    body = json.dumps(ask).encode()
    return (
        method
        + b" /v1/chat/completions "
        + version
        + b"\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        + extra
        + b"Content-Length: %d\r\n\r\n" % len(body)
        + body
    )


class Wire:
    """One client connection, read answer by answer (framed by Content-Length)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.buffer = bytearray()

    def answer(self, *, head_only: bool = False) -> tuple[str, list[tuple[str, str]], bytes]:
        while b"\r\n\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            assert chunk, f"connection closed mid-head: {self.buffer!r}"
            self.buffer += chunk
        end = self.buffer.index(b"\r\n\r\n")
        head, self.buffer = bytes(self.buffer[:end]), self.buffer[end + 4 :]
        status, *lines = head.decode("utf-8").split("\r\n")
        headers = [(name.lower(), value.strip()) for name, _, value in (line.partition(":") for line in lines)]
        length = 0 if head_only else int(dict(headers).get("content-length", "0"))
        while len(self.buffer) < length:
            chunk = self.sock.recv(65536)
            assert chunk, "connection closed mid-body"
            self.buffer += chunk
        body, self.buffer = bytes(self.buffer[:length]), self.buffer[length:]
        return status, headers, body

    def closed(self) -> bool:
        return self.sock.recv(1) == b""


@pytest.fixture
def replay(loop_thread: LoopThread, tmp_path: Path) -> Any:
    proxies: list[RunningProxy] = []

    def start(**recordings: dict[str, Any]) -> RunningProxy:
        for name, options in recordings.items():
            _recording(tmp_path / "rec", name + ".json", **options)
        proxy = start_proxy(loop_thread, "replay", tmp_path / "rec")
        proxies.append(proxy)
        return proxy

    yield start
    for proxy in proxies:
        proxy.stop()


def test_keep_alive_answers_follow_each_other_on_one_connection(replay: Any) -> None:
    proxy = replay(one={"headers": {"x-request-id": "req_1"}})
    wire = Wire(proxy.server.port)
    wire.sock.sendall(_request() + _request())  # pipelined: both answers, in order, complete
    for _ in range(2):
        status, headers, body = wire.answer()
        assert status == "HTTP/1.1 200 OK"
        names = [name for name, _ in headers]
        assert names.count("date") == 1 and names.count("content-length") == 1
        assert ("x-request-id", "req_1") in headers and "connection" not in names
        assert int(dict(headers)["content-length"]) == len(body) and json.loads(body) == ANSWER
    wire.sock.sendall(_request())  # still open
    assert json.loads(wire.answer()[2]) == ANSWER


def test_connection_close_is_said_and_done(replay: Any) -> None:
    proxy = replay(one={})
    wire = Wire(proxy.server.port)
    wire.sock.sendall(_request(extra=b"Connection: close\r\n"))
    status, headers, body = wire.answer()
    assert status == "HTTP/1.1 200 OK" and ("connection", "close") in headers and json.loads(body) == ANSWER
    assert wire.closed()


def test_a_recorded_date_is_sent_once_and_as_recorded(replay: Any) -> None:
    date = "Tue, 01 Apr 2025 10:00:00 GMT"
    proxy = replay(one={"headers": {"Date": date}})
    wire = Wire(proxy.server.port)
    wire.sock.sendall(_request())
    _, headers, _ = wire.answer()
    assert [value for name, value in headers if name == "date"] == [date]


def test_non_ascii_header_values_go_out_as_utf8_as_before(replay: Any) -> None:
    proxy = replay(one={"headers": {"x-note": "café"}})
    wire = Wire(proxy.server.port)
    wire.sock.sendall(_request())
    _, headers, _ = wire.answer()
    assert ("x-note", "café") in headers  # decoded as UTF-8 by Wire


def test_head_http10_and_bodiless_statuses_keep_http_rules(replay: Any) -> None:
    other = {**ASK, "messages": [{"role": "user", "content": "empty"}]}
    proxy = replay(one={}, empty={"status": 204, "body": "", "ask": other})
    wire = Wire(proxy.server.port)
    wire.sock.sendall(_request(method=b"HEAD"))
    status, headers, body = wire.answer(head_only=True)
    # HEAD is keyed like any other method: a recorded POST does not answer it.
    assert status.startswith("HTTP/1.1 404") and body == b""
    wire.sock.sendall(_request(other))
    status, headers, body = wire.answer()
    assert status == "HTTP/1.1 204 No Content" and body == b""
    assert "content-length" not in dict(headers)
    wire.sock.sendall(_request())  # the connection is intact after the bodiless answer
    assert json.loads(wire.answer()[2]) == ANSWER

    old = Wire(proxy.server.port)
    old.sock.sendall(_request(version=b"HTTP/1.0"))
    status, headers, body = old.answer()
    assert status == "HTTP/1.0 200 OK" and json.loads(body) == ANSWER
    assert old.closed()  # HTTP/1.0 without keep-alive


def test_a_big_answer_reaches_a_slow_reader_whole(replay: Any) -> None:
    big = {**ANSWER, "padding": "x" * 2_000_000}
    proxy = replay(one={"body": big})
    wire = Wire(proxy.server.port)
    wire.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    wire.sock.sendall(_request() + _request())
    for _ in range(2):
        status, headers, body = wire.answer()
        assert status == "HTTP/1.1 200 OK" and json.loads(body) == big


def test_a_client_gone_before_its_answer_leaves_the_proxy_serving(replay: Any) -> None:
    proxy = replay(one={"body": {**ANSWER, "padding": "x" * 1_000_000}})
    for _ in range(20):
        sock = socket.create_connection(("127.0.0.1", proxy.server.port), timeout=30)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.sendall(_request())
        sock.close()  # reset: the answer meets a closed connection
    wire = Wire(proxy.server.port)
    wire.sock.sendall(_request())
    assert wire.answer()[0] == "HTTP/1.1 200 OK"


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RSS from /proc")
def test_slow_readers_of_a_big_answer_do_not_each_hold_a_copy(tmp_path: Path) -> None:
    """20 clients that stop reading a 20 MB answer: the proxy holds each one's next slice, not
    the rest of the body (400 MB when the transport buffered whatever the socket refused)."""
    big = {**ANSWER, "padding": "x" * 20_000_000}
    _recording(tmp_path / "rec", "big.json", body=big)
    proxy = CliProxy("replay", "--recordings", str(tmp_path / "rec"), "--port", "0")
    readers: list[Wire] = []
    try:
        first = Wire(proxy.port)
        first.sock.sendall(_request())
        assert json.loads(first.answer()[2]) == big  # the body is loaded and rendered once
        first.sock.close()
        before = _rss_mb(proxy.process.pid)
        for _ in range(20):
            reader = Wire(proxy.port)
            reader.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            reader.sock.sendall(_request())
            reader.buffer += reader.sock.recv(65536)  # the answer is under way, and then not read on
            assert reader.buffer.startswith(b"HTTP/1.1 200 OK")
            readers.append(reader)
        grown = _rss_mb(proxy.process.pid) - before
        assert grown < 64, f"RSS grew {grown:.0f} MB for 20 stalled readers"
        # A stalled reader that reads on gets the whole answer.
        assert json.loads(readers[0].answer()[2]) == big
    finally:
        for reader in readers:
            reader.sock.close()
        proxy.stop()
