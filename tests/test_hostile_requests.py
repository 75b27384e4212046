"""Odd and hostile client input never crashes the handler: each fault is sent from outside (raw
socket or aiohttp), and the test checks what the client gets (a provider-shaped error or a real
answer), what is on disk and what is logged (one line, never a traceback)."""

from __future__ import annotations

import json
import socket
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from llmproxy.canonical import MAX_REQUEST_DEPTH
from llmproxy.server import KEY_MEMO
from tests.support import CliProxy, LoopThread, RunningApp, files_under, start_proxy
from tests.upstreams.openai_wire import OpenAIWire

TOKEN = "proxy-token-123"


@pytest.fixture
def recorder(loop_thread: LoopThread, tmp_path: Path) -> Iterator[tuple[CliProxy, OpenAIWire, Path]]:
    wire = OpenAIWire()
    upstream = RunningApp(loop_thread, wire.app()).start()
    recordings = tmp_path / "rec"
    proxy = CliProxy(
        "record",
        "--upstream",
        upstream.url,
        "--recordings",
        str(recordings),
        "--port",
        "0",
        "--log-level",
        "debug",
        env={"LLMPROXY_TOKEN": TOKEN},
    )
    yield proxy, wire, recordings
    proxy.process.kill()
    proxy.process.wait()
    upstream.stop()


def _raw(port: int, head: bytes, body: bytes) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request written byte for byte; the answer read to the connection's close."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    header_block, _, payload = data.partition(b"\r\n\r\n")
    lines = header_block.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, payload


def _head(content_type: bytes, *extra: bytes) -> bytes:
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        + b"x-llmproxy-token: "
        + TOKEN.encode()
        + b"\r\nContent-Type: "
        + content_type
        + b"\r\n"
        + b"".join(line + b"\r\n" for line in extra)
    )


def _nested(depth: int) -> bytes:
    return json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "deep"}]})[:-1].encode() + (
        b', "metadata": ' + b"[" * (depth - 1) + b"1" + b"]" * (depth - 1) + b"}"
    )


def _quiet(events: list[dict[str, Any]]) -> None:
    """Nothing logged as an error, no traceback anywhere."""
    assert not [e for e in events if e.get("level") == "error" or "exception" in e or "Traceback" in json.dumps(e)]


def _refused(events: list[dict[str, Any]], code: str) -> None:
    assert [e for e in events if e.get("code") == code and e.get("level") == "warning"], events
    _quiet(events)


@pytest.mark.parametrize("depth", [MAX_REQUEST_DEPTH + 2, 254, 256, 1024, 1025, 5000])
def test_json_nested_past_the_limit_gets_400_request_too_deep(recorder: Any, depth: int) -> None:
    proxy, wire, recordings = recorder
    status, headers, payload = _raw(proxy.port, _head(b"application/json"), _nested(depth))
    assert status == 400, payload[:200]
    error = json.loads(payload)["error"]  # OpenAI's error shape: the SDK surfaces it
    assert error["code"] == "request_too_deep" and str(MAX_REQUEST_DEPTH) in error["message"]
    assert headers["x-llmproxy-error"] == "request_too_deep"
    assert wire.requests == []  # never forwarded
    _refused(proxy.stop(), "request_too_deep")
    assert not recordings.exists() or files_under(recordings) == []


def test_json_nested_within_the_limit_is_answered_and_recorded(loop_thread: LoopThread, recorder: Any) -> None:
    proxy, wire, recordings = recorder
    status, _, payload = _raw(proxy.port, _head(b"application/json"), _nested(MAX_REQUEST_DEPTH - 1))
    assert status == 200 and json.loads(payload)["object"] == "chat.completion"
    events = proxy.stop()  # SIGTERM waits for the write
    _quiet(events)
    assert [e for e in events if e["event"] == "recorded"]
    assert len([p for p in files_under(recordings) if p.suffix == ".json"]) == 1
    replay = start_proxy(loop_thread, "replay", recordings)
    try:
        status, _, replayed = _raw(replay.server.port, _head(b"application/json"), _nested(MAX_REQUEST_DEPTH - 1))
        assert status == 200 and replayed == payload
    finally:
        replay.stop()


def _nested_multipart(depth: int) -> tuple[bytes, bytes]:
    inner = b'Content-Disposition: form-data; name="file"\r\n\r\nhello'
    for level in range(depth):
        boundary = b"b%d" % level
        inner = (
            b"Content-Type: multipart/mixed; boundary="
            + boundary
            + b"\r\n\r\n--"
            + boundary
            + b"\r\n"
            + inner
            + b"\r\n--"
            + boundary
            + b"--\r\n"
        )
    body = b"--top\r\n" + inner + b"\r\n--top--\r\n"
    return b"multipart/form-data; boundary=top", body


def test_multipart_nested_2000_deep_gets_400_request_too_deep(recorder: Any) -> None:
    proxy, wire, recordings = recorder
    content_type, body = _nested_multipart(2000)
    status, _, payload = _raw(proxy.port, _head(content_type), body)
    assert status == 400 and json.loads(payload)["error"]["code"] == "request_too_deep"
    assert wire.requests == []
    _refused(proxy.stop(), "request_too_deep")
    assert not recordings.exists() or files_under(recordings) == []


@pytest.mark.parametrize("encoding", [b"gzip", b"deflate"])
def test_content_encoding_with_a_plain_body_gets_400_bad_content_encoding(recorder: Any, encoding: bytes) -> None:
    proxy, wire, recordings = recorder
    body = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "plain"}]}).encode()
    status, _, payload = _raw(proxy.port, _head(b"application/json", b"Content-Encoding: " + encoding), body)
    assert status == 400
    error = json.loads(payload)["error"]
    assert error["code"] == "bad_content_encoding" and encoding.decode() in error["message"]
    assert wire.requests == []
    _refused(proxy.stop(), "bad_content_encoding")
    assert not recordings.exists() or files_under(recordings) == []


def test_content_encoding_deflate_with_a_deflated_body_is_answered(recorder: Any) -> None:
    proxy, wire, _ = recorder
    body = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "packed"}]}).encode()
    status, _, payload = _raw(proxy.port, _head(b"application/json", b"Content-Encoding: deflate"), zlib.compress(body))
    assert status == 200 and "PACKED" in json.loads(payload)["choices"][0]["message"]["content"]
    _quiet(proxy.stop())


def test_multipart_content_type_with_a_non_latin1_character_is_answered_and_recorded(recorder: Any) -> None:
    proxy, wire, recordings = recorder
    body = b'--xx\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n--xx--\r\n'
    content_type = "multipart/form-data; boundary=xx; charset=\u20ac\u4e2d".encode()  # UTF-8 on the wire
    head = _head(content_type).replace(b"/v1/chat/completions", b"/v1/audio/transcriptions")
    status, _, payload = _raw(proxy.port, head, body)
    assert status == 200, payload[:300]
    assert len(wire.requests) == 1
    events = proxy.stop()
    _quiet(events)
    assert [e for e in events if e["event"] == "recorded"]
    assert len([p for p in files_under(recordings) if p.suffix == ".json"]) == 1


def test_token_header_with_byte_0xff_gets_401(recorder: Any) -> None:
    proxy, wire, recordings = recorder
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nx-llmproxy-token: \xff\xfe" + TOKEN.encode()
    status, _, payload = _raw(proxy.port, head + b"\r\nContent-Type: application/json\r\n", b"{}")
    assert status == 401 and json.loads(payload)["error"]["code"] == "proxy_token_required"
    assert wire.requests == []
    events = proxy.stop()
    _quiet(events)
    assert [e for e in events if e["event"] == "client refused: missing or wrong token"]


def test_client_leaving_during_the_body_upload_is_one_warning_line(recorder: Any) -> None:
    proxy, wire, recordings = recorder
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as sock:
        sock.sendall(_head(b"application/json") + b"Content-Length: 100000\r\n\r\n" + b'{"model": "gpt-4o", ')
    # The proxy is still fine for the next client, who is answered normally.
    client = openai.OpenAI(
        base_url=proxy.url + "/v1", api_key="sk-x", max_retries=0, default_headers={"x-llmproxy-token": TOKEN}
    )
    assert client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "next"}]).choices
    events = proxy.stop()  # SIGTERM lets the first handler finish
    _quiet(events)
    assert [e for e in events if e["event"] == "client left during the request body"], events
    assert len(wire.requests) == 1  # only the second client's call went upstream
    assert len([p for p in files_under(recordings) if p.suffix == ".json"]) == 1


def test_key_memo_is_bounded_by_bytes_not_count(loop_thread: LoopThread, tmp_path: Path) -> None:
    """Distinct 60 KB requests (the issue: 4,096 of them grew replay's RSS by ~830 MB)."""
    proxy = start_proxy(loop_thread, "replay", tmp_path)
    memo = proxy.server.app[KEY_MEMO]

    async def send_all() -> list[int]:
        statuses = []
        async with aiohttp.ClientSession() as session:
            for number in range(200):
                body = {"model": "gpt-4o", "messages": [{"role": "user", "content": f"{number} " + "x" * 60_000}]}
                async with session.post(proxy.url + "/v1/chat/completions", json=body) as response:
                    statuses.append(response.status)
                    await response.read()
        return statuses

    try:
        statuses = loop_thread.run(send_all(), timeout=120)
    finally:
        proxy.stop()
    assert statuses == [404] * 200  # misses, each keyed
    assert 0 < len(memo) < 200  # the oldest were let go
    assert memo.bytes <= memo.max_bytes


def test_expect_100_continue_is_answered_before_the_body_is_sent(recorder: Any) -> None:
    """curl and other clients send `Expect: 100-continue` with large bodies and wait for the
    interim answer before sending the body: the proxy must give it, then the real answer."""
    proxy, wire, recordings = recorder
    body = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "expect"}]}).encode()
    head = _head(b"application/json", b"Expect: 100-continue") + b"Content-Length: %d\r\nConnection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as sock:
        sock.sendall(head % len(body))
        interim = b""
        while b"\r\n\r\n" not in interim:  # the body is not sent until this arrives (30 s timeout)
            chunk = sock.recv(65536)
            assert chunk, f"connection closed before 100 Continue: {interim!r}"
            interim += chunk
        assert interim.startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(body)
        data = interim.partition(b"\r\n\r\n")[2]
        while chunk := sock.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 200 "), data[:200]
    assert "EXPECT" in json.loads(data.partition(b"\r\n\r\n")[2])["choices"][0]["message"]["content"]
    assert len(wire.requests) == 1 and "expect" not in {name.lower() for name in wire.requests[0]["headers"]}
    _quiet(proxy.stop())
    assert len([p for p in files_under(recordings) if p.suffix == ".json"]) == 1


@pytest.mark.parametrize("expect", [b"something-else", b"\xff100-continue"])
def test_unknown_expectation_gets_417_and_goes_nowhere(recorder: Any, expect: bytes) -> None:
    """Also an expectation that is not UTF-8 (echoed in the message: it was a 500)."""
    proxy, wire, recordings = recorder
    status, _, payload = _raw(proxy.port, _head(b"application/json", b"Expect: " + expect), b"{}")
    assert status == 417 and json.loads(payload)["error"]["code"] == "expectation_failed"
    assert wire.requests == []
    proxy.stop()
    assert not recordings.exists() or files_under(recordings) == []


def _first_answer(port: int, head: bytes) -> bytes:
    """Send a request head alone (its body held back, as a client waiting for 100 Continue
    does) and read the first answer, framed by its Content-Length (the connection stays open)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed mid-head: {data!r}"
            data += chunk
        header_block, _, payload = data.partition(b"\r\n\r\n")
        if header_block.startswith(b"HTTP/1.1 100 "):
            return header_block + b"\r\n\r\n"  # the interim answer: the body would be asked for
        length = int(
            next(
                line.split(b":")[1]
                for line in header_block.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
        )
        while len(payload) < length:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed mid-body: {payload!r}"
            payload += chunk
    return header_block + b"\r\n\r\n" + payload


@pytest.mark.parametrize(
    ("token", "length", "status", "code"),
    [(b"wrong", 100, 401, "proxy_token_required"), (TOKEN.encode(), 1 << 30, 413, "body_too_large")],
)
def test_expect_100_continue_refused_from_its_head_gets_the_refusal_not_100_continue(
    recorder: Any, token: bytes, length: int, status: int, code: str
) -> None:
    """A request refused on its head alone (token, declared size) is answered at once: a 100
    Continue would make the client send a body (up to max_body_mb) only to be refused."""
    proxy, wire, _ = recorder
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nx-llmproxy-token: " + token + b"\r\n"
        b"Content-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n" % length
    )
    answer = _first_answer(proxy.port, head)
    assert answer.startswith(b"HTTP/1.1 %d " % status), answer[:200]
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["code"] == code
    assert wire.requests == []
    proxy.stop()
