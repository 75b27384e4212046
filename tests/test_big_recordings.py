"""Preparing big recordings (issue #12): the shortcuts that cut the CPU of a 5,000-chunk stream
or a 1 MB body write the very bytes the recorder wrote before them, and the secret scan still
catches what it caught (a key echoed deep in a long stream, a configured pattern in a big body)."""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
import structlog
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from llmproxy.call import Call, Outcome
from llmproxy.canonical import parse_body
from llmproxy.providers import PROVIDERS
from llmproxy.routing import Router, default_routes
from llmproxy.store.directory import RecordingStore
from llmproxy.store.document import to_document
from llmproxy.store.index import canonical_for_route
from llmproxy.store.secrets import SecretScanner
from llmproxy.store.writer import Recorder, _build, _compact_pieces, chunk_times
from llmproxy.upstream.client import Exchange
from llmproxy.wire.framing import ConstantLabel, data_of
from llmproxy.wire.sse import SSE
from llmproxy.wire.textstream import TextStreamCodec
from tests.support import LoopThread, RunningApp, files_under, start_proxy
from tests.test_fast_paths import FUZZ, sse_payloads

KEY = "sk-proj-" + "Pr3pAr3dK3y" * 3
SSE_TYPE = "text/event-stream; charset=utf-8"


def _exchange(path: str, raw: bytes, content_type: str, headers: dict[str, str] | None = None) -> Exchange:
    """The exchange the pipeline hands the recorder for one call (reads: 4 KB each, 0.1 ms apart)."""
    headers = headers or {"content-type": "application/json", "authorization": f"Bearer {KEY}"}
    body = b'{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi"}]}'
    match = Router(default_routes()).resolve("POST", path, headers)
    assert match is not None
    value = parse_body(body, "application/json")
    canonical = canonical_for_route(match.route, "POST", match.path, [], headers, value)
    call = Call(match.route, "POST", match.path, "", [], headers, body, value, canonical)
    reads = [(min(end, len(raw)), 1.0 + index / 10) for index, end in enumerate(range(4096, len(raw) + 4096, 4096))]
    return Exchange(
        call, "http://upstream.invalid" + path, 200, [("Content-Type", content_type)], raw, reads or [(0, 1.0)], 0.5
    )


def _chunk(index: int, content: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-mixed",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "gpt-4o",
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}],
    }


def _event(value: Any) -> bytes:
    return b"data: " + orjson.dumps(value) + b"\n\n"


def _streams() -> dict[str, bytes]:
    """Streams of every shape the SSE capture meets: OpenAI's, and each way of leaving it."""
    plain = [_event(_chunk(index, f"w{index} é ✓\u2028")) for index in range(3000)]
    done = b"data: [DONE]\n\n"
    python = json.dumps(_chunk(7, "spelled by Python é")).encode()
    return {
        "openai": b"".join(plain) + done,
        "tail after done": b"".join(plain) + done + b": closing comment\n\ndata: bye",
        "one chunk spelled otherwise": b"".join(plain[:1500])
        + b"data: "
        + python
        + b"\n\n"
        + b"".join(plain[1500:])
        + done,
        "all spelled by python": b"".join(b"data: " + json.dumps(_chunk(i, "a")).encode() + b"\n\n" for i in range(500))
        + done,
        "comments and pings inside": b"".join(plain[:1000])
        + b": ping\n\ndata: keep-alive\n\ndata: 42\n\n"
        + b"".join(plain[1000:])
        + done,
        "a chunk past 64-bit integers": b"".join(plain[:10]) + b'data: {"n":123456789012345678901234567890}\n\n' + done,
        "an event of two data lines": b"".join(plain[:10])
        + b'data: {"a":\ndata: 1}\n\n'
        + b"".join(plain[10:20])
        + done,
        "crlf": (b"".join(plain[:200]) + done).replace(b"\n", b"\r\n"),
        "no end marker": b"".join(plain[:200]),
        "last event unended": b"".join(plain[:200]) + b"data: [DONE]",
        "arrays and scalars last": b"".join(plain[:20]) + b'data: [1,2]\n\ndata: 3\n\ndata: "x"\n\n' + done,
    }


def _json_bodies() -> dict[str, bytes]:
    message = {"role": "assistant", "content": "é ✓ " * 100_000}
    value = {
        "id": "chatcmpl-big",
        "object": "chat.completion",
        "created": 1,
        "model": "gpt-4o",
        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
    return {
        "orjson's spelling": orjson.dumps(value),
        "trailing newline": orjson.dumps(value) + b"\n",
        "python's spelling": json.dumps(value).encode(),
        "indented": json.dumps(value, indent=2).encode(),
        "past 64-bit integers": orjson.dumps(value)[:-1] + b',"n":123456789012345678901234567890}',
    }


# sha256 (first 24 hex digits) of the response's part of each file, as the recorder wrote it
# before these shortcuts (commit e042cb0): the same exchange must still give these very bytes.
BEFORE = {
    "openai": "5e7e13049ec206e704bd5a5a",
    "tail after done": "d21768e738f44555e9243efe",
    "one chunk spelled otherwise": "26e0d18f8f105b7951dda8b5",
    "all spelled by python": "cb5bbaf8614900a7ff8f13b7",
    "comments and pings inside": "ccff3606f13d9a6c71eba7c4",
    "a chunk past 64-bit integers": "a476817fc0e50bac12dfa4fc",
    "an event of two data lines": "09d4a69b3eeb808c684370fe",
    "crlf": "675f7b8c07c807e37b5dae95",
    "no end marker": "1e3bbc8ca6dd2b0440148d42",
    "last event unended": "fa6db20843d60212f7195594",
    "arrays and scalars last": "c5a90cfb5019f34e9f4e5814",
    "orjson's spelling": "70e702c672dc93f505a84f8b",
    "trailing newline": "9a4022af49dfce4e94b5cf51",
    "python's spelling": "ebf157b5cac6209038b88014",
    "indented": "b6175814b4686f99a36bee1a",
    "past 64-bit integers": "b344bf9dfae0a70659240702",
}


def _prepared(raw: bytes, content_type: str) -> bytes:
    with tempfile.TemporaryDirectory() as root:
        recorder = Recorder(RecordingStore(Path(root)), Outcome(), record_errors=True)
        prepared = recorder.prepare(_exchange("/v1/chat/completions", raw, content_type))
        assert prepared is not None
        return prepared.data


@pytest.mark.parametrize(
    ("name", "raw", "content_type"),
    [(name, raw, SSE_TYPE) for name, raw in _streams().items()]
    + [(name, raw, "application/json") for name, raw in _json_bodies().items()],
    ids=lambda value: value if isinstance(value, str) and len(value) < 40 else "",
)
def test_a_recording_is_the_bytes_the_recorder_wrote_before_the_shortcuts(
    name: str, raw: bytes, content_type: str
) -> None:
    data = _prepared(raw, content_type)
    # The response's part of the file: what the capture decides (the request's part and the
    # provenance are written by code these shortcuts do not touch).
    response = data[data.index(b'\n  "response": {') : data.index(b'\n  "provenance": {')]
    assert hashlib.sha256(response).hexdigest()[:24] == BEFORE[name]


@FUZZ
@given(st.lists(sse_payloads, max_size=8), st.sampled_from([b"", b"data: [DONE]\n\n", b": bye\n\ndata: x", b"\n"]))
def test_the_chunk_shortcut_captures_what_the_event_loops_capture(payloads: list[bytes], tail: bytes) -> None:
    """Where it takes a stream, the shortcut gives what the loop over events (and the general
    loop) gives, with or without a constant labeler; the values and compact text it hands the
    recorder are the body's."""
    raw = b"".join(b"data: " + payload + b"\n\n" for payload in payloads) + tail
    try:
        expected = TextStreamCodec._capture(SSE, raw, lambda value: "chunk")
        lines = SSE._capture_lines(raw, lambda value: "chunk")
    except UnicodeDecodeError:
        return
    for labeler in (ConstantLabel("chunk"), lambda value: "chunk"):
        try:
            captured = SSE._capture_chunks(raw, labeler)
        except UnicodeDecodeError:
            raise AssertionError("the shortcut refused bytes the event loops took") from None
        if captured is None:
            continue
        assert lines is not None
        for reference in (lines, expected):
            assert (captured.body, captured.framing, captured.chunk_ends) == (
                reference.body,
                reference.framing,
                reference.chunk_ends,
            )
        assert captured.exact == lines.exact
        assert captured.values == [data_of(item) for item in captured.body]
        if captured.compact is not None:
            assert captured.compact == orjson.dumps(captured.values)


def test_the_shortcut_takes_openais_streams_with_their_end_and_a_tail() -> None:
    """Not a test that could pass by never taking the shortcut."""
    streams = _streams()
    taken = ("openai", "one chunk spelled otherwise", "all spelled by python", "no end marker", "last event unended")
    for name in taken:
        assert SSE._capture_chunks(streams[name], ConstantLabel("chunk")) is not None, name
    for name in ("tail after done", "comments and pings inside", "an event of two data lines", "crlf"):
        assert SSE._capture_chunks(streams[name], ConstantLabel("chunk")) is None, name


def test_a_constant_label_is_what_the_provider_labels_every_value() -> None:
    values = [None, {}, {"error": {"message": "x"}}, {"type": "error"}, {"message": "m"}, [1], "text", {"a": 1}]
    paths = [
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/responses",
        "/v1/models",
        "/v1/messages",
        "/v2/chat",
        "/api/chat",
        "/v1beta/models/gemini-2.0-flash:streamGenerateContent",
        "/model/m/converse-stream",
        "/v1/unknown",
    ]
    constant = 0
    for provider in PROVIDERS.values():
        for path in paths:
            for streaming in (True, False):
                label = provider.constant_label(path, streaming)
                if label is not None:
                    constant += 1
                    assert all(provider.label(path, streaming, value) == label for value in values), (provider, path)
    assert constant  # OpenAI's streams at least: else the test proves nothing
    assert PROVIDERS["openai"].constant_label("/v1/chat/completions", False) is None  # errors differ


texts = st.sampled_from(
    [KEY, "gateway-token-0123456789", "Gateway TOKEN: {x}", 'quo"te-Token-1', "sk-", "AKIA", "earer", "llmproxy.bytes"]
) | st.text(alphabet='abAK ,:[]{}"\n-', max_size=10)


@FUZZ
@given(st.lists(st.lists(texts, min_size=1, max_size=3), min_size=1, max_size=6), st.booleans(), st.booleans())
def test_the_quick_pass_on_the_captures_pieces_decides_as_on_the_whole_document(
    contents: list[list[str]], extra: bool, json_body: bool
) -> None:
    """The scan's quick pass reads the capture's compact text of the body instead of serialising
    the document again: it must walk exactly when it walked on the whole compact document."""
    scanner = SecretScanner([r"colon"] if extra else [])
    headers = {
        "content-type": "application/json",
        "authorization": f"Bearer {KEY}",
        "x-my-gateway-token": "gateway-token-0123456789",
        "x-other-token": "Gateway TOKEN: {x}",
        "x-quoted-token": 'quo"te-Token-1',
    }
    if json_body:
        raw = orjson.dumps({"choices": [{"message": {"content": " ".join(texts)}} for texts in contents]})
        exchange = _exchange("/v1/chat/completions", raw, "application/json", headers)
    else:
        raw = b"".join(_event({"choices": [{"delta": {"content": text}} for text in texts]}) for texts in contents)
        raw += b"data: [DONE]\n\n"
        exchange = _exchange("/v1/chat/completions", raw, SSE_TYPE, headers)
    recording, captured, _ = _build(exchange)
    document = to_document(recording)
    pretty = orjson.dumps(document, option=orjson.OPT_INDENT_2) + b"\n"
    pieces = _compact_pieces(document, captured)
    assert pieces is not None
    values = exchange.call.credentials()
    whole = scanner._worth_walking(pretty, values, orjson.dumps(document))
    assert scanner._worth_walking(pretty, values, pieces) == whole
    assert scanner.scan(document, pretty, values, pieces) == scanner.scan(document, pretty, values)


@FUZZ
@given(
    st.lists(st.tuples(st.integers(0, 400), st.floats(0, 1e6, allow_nan=False)), min_size=1, max_size=6),
    st.lists(st.integers(0, 2500), min_size=20, max_size=120),
)
def test_chunk_times_bisected_read_by_read_are_those_of_the_walk(
    steps: list[tuple[int, float]], ends: list[int]
) -> None:
    """Many chunks to a read take the bisecting way; it gives what the walk along both gives."""
    total = 0
    reads = []
    for step, ms in steps:
        total += step
        reads.append((total, ms))
    chunk_ends = sorted(ends)
    expected = []
    for end in chunk_ends:
        index = next((i for i, (read_end, _) in enumerate(reads) if read_end >= end), len(reads) - 1)
        expected.append(round(reads[index][1], 1))
    assert chunk_times(reads, chunk_ends) == expected


# -- through the proxy ---------------------------------------------------------------------------

CHUNKS = 5000
ECHO_AT = 4000


class LongStream:
    """An OpenAI upstream answering with 5,000 chunks (written 50 at a time, as a server's buffers
    send them), chunk 4,000 quoting the caller's key when asked; or with a 1 MB JSON body."""

    def __init__(self, big_body_text: str = "") -> None:
        self.sent: list[bytes] = []
        self.big_body_text = big_body_text

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        return app

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if not body.get("stream"):
            content = "x" * 500_000 + self.big_body_text + "y" * 500_000
            message = {"role": "assistant", "content": content}
            value = {
                "id": "chatcmpl-big",
                "object": "chat.completion",
                "created": 1,
                "model": "gpt-4o",
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            }
            self.sent.append(orjson.dumps(value))
            return web.Response(body=self.sent[-1], content_type="application/json")
        key = request.headers["Authorization"].removeprefix("Bearer ")
        echo = body["messages"][0]["content"] == "echo my key"
        events = [
            _event(_chunk(index, f"you sent {key} " if echo and index == ECHO_AT else f"{index} "))
            for index in range(CHUNKS)
        ] + [b"data: [DONE]\n\n"]
        response = web.StreamResponse(headers={"Content-Type": SSE_TYPE})
        await response.prepare(request)
        for start in range(0, len(events), 50):
            await response.write(b"".join(events[start : start + 50]))
        await response.write_eof()
        self.sent.append(b"".join(events))
        return response


def _stream(url: str, key: str, content: str) -> list[str]:
    client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
    try:
        stream = client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": content}], stream=True
        )
        return [chunk.choices[0].delta.content or "" for chunk in stream]
    finally:
        client.close()


def _recordings(directory: Path) -> list[Path]:
    return [path for path in files_under(directory) if path.suffix == ".json"] if directory.exists() else []


@pytest.mark.parametrize(
    ("key", "kind"),
    [
        ("sk-proj-" + "Ab1Cd2Ef3Gh4" * 3, "openai key"),  # a known shape
        ("gateway-token-" + "0123456789abcdef", "credential from request header authorization"),  # only the value
        ("Gateway-TOKEN-" + "0123456789abcdef", "credential from request header authorization"),
    ],
)
def test_a_key_echoed_in_chunk_4000_of_a_long_stream_is_refused(
    loop_thread: LoopThread, tmp_path: Path, key: str, kind: str
) -> None:
    upstream = LongStream()
    app = RunningApp(loop_thread, upstream.app()).start()
    recordings = tmp_path / "recordings"
    proxy = start_proxy(loop_thread, "record", recordings, upstream=app.url)
    try:
        with structlog.testing.capture_logs() as logs:
            try:
                received = _stream(proxy.url, key, "echo my key")
            finally:
                proxy.stop()
    finally:
        app.stop()
    assert len(received) == CHUNKS and received[ECHO_AT] == f"you sent {key} "  # the client got it all
    assert _recordings(recordings) == []
    assert proxy.server.pipeline.outcome.not_recorded_by == {"secret": 1}
    refusal = next(e for e in logs if e["event"] == "recording refused: it would hold a credential")
    assert refusal["findings"] == f"{kind} in response.body[{ECHO_AT}].__data__.choices[0].delta.content"
    assert key not in json.dumps(logs, default=str)


def test_a_long_stream_without_a_key_is_recorded_and_replayed_byte_for_byte(
    loop_thread: LoopThread, tmp_path: Path
) -> None:
    upstream = LongStream()
    app = RunningApp(loop_thread, upstream.app()).start()
    recordings = tmp_path / "recordings"
    key = "sk-proj-" + "Ab1Cd2Ef3Gh4" * 3
    record = start_proxy(loop_thread, "record", recordings, upstream=app.url)
    try:
        received = _stream(record.url, key, "just count")
    finally:
        record.stop()
        app.stop()
    assert received == [f"{index} " for index in range(CHUNKS)]
    (file,) = _recordings(recordings)
    response = orjson.loads(file.read_bytes())["response"]
    assert len(response["body"]) == CHUNKS and response["framing"]["end"] == "data: [DONE]\n\n"
    assert len(response["timing"]["chunk_ms"]) == CHUNKS

    async def replayed(url: str) -> bytes:
        body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "just count"}], "stream": True}
        async with aiohttp.ClientSession() as session:
            async with session.post(url + "/v1/chat/completions", json=body) as answer:
                return await answer.read()

    replay = start_proxy(loop_thread, "replay", recordings)
    try:
        assert loop_thread.run(replayed(replay.url)) == upstream.sent[0]
    finally:
        replay.stop()


@pytest.mark.parametrize("secrets", ["refuse", "redact"])
def test_a_configured_pattern_in_a_1_mb_json_body_is_caught(
    loop_thread: LoopThread, tmp_path: Path, secrets: str
) -> None:
    secret = "CORP-" + "73519264"
    upstream = LongStream(big_body_text=f" the vault code is {secret}, keep it ")
    app = RunningApp(loop_thread, upstream.app()).start()
    recordings = tmp_path / "recordings"
    proxy = start_proxy(
        loop_thread, "record", recordings, upstream=app.url, secret_patterns=[r"CORP-[0-9]{8}"], secrets=secrets
    )
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk-proj-" + "Zz9" * 10, max_retries=0)
    try:
        answer = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "big"}])
    finally:
        client.close()
        proxy.stop()
        app.stop()
    content = answer.choices[0].message.content
    assert content is not None and secret in content and len(content) > 1_000_000  # passed through as is
    files = _recordings(recordings)
    if secrets == "refuse":
        assert files == [] and proxy.server.pipeline.outcome.not_recorded_by == {"secret": 1}
        return
    (file,) = files
    text = file.read_text()
    assert secret not in text
    recorded = orjson.loads(text)["response"]["body"]["__data__"]["choices"][0]["message"]["content"]
    assert recorded == content.replace(secret, "[redacted configured pattern 1]")
