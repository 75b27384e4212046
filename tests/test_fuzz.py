"""Property-based tests of the parsers: chunk boundaries never change events, arbitrary input
never raises anything but the documented errors, canonical keys ignore what must not matter."""

from __future__ import annotations

import json
import os
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmproxy.canonical import canonical_request, parse_body
from llmproxy.providers import get_provider
from llmproxy.routing import Router, default_routes
from llmproxy.store.document import RecordingError, from_document
from llmproxy.wire.registry import capture, render_segments, split_stream, stream_splitter
from llmproxy.wire.sse import SSE, parse_sse_event
from llmproxy.wire.textstream import TextStreamCodec

# FUZZ_EXAMPLES=5000 for a longer hunt than the suite's default.
FUZZ = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "200")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
line_endings = st.sampled_from(["\n", "\r\n"])


@st.composite
def sse_streams(draw: Any) -> bytes:
    ending = draw(line_endings)
    events = []
    for value in draw(st.lists(st.dictionaries(st.text(max_size=6), json_values, max_size=3), max_size=6)):
        name = draw(st.sampled_from([None, "message", "ping"]))
        comment = draw(st.booleans())
        text = (f": keep-alive{ending}" if comment else "") + (f"event: {name}{ending}" if name else "")
        events.append(text + f"data: {json.dumps(value)}{ending}{ending}")
    tail = draw(st.sampled_from(["", f"data: [DONE]{ending}{ending}", 'data: {"cut']))
    return "".join(events).encode() + tail.encode()


def _cuts(data: bytes, points: list[int]) -> list[bytes]:
    points = sorted({p % (len(data) + 1) for p in points})
    pieces, start = [], 0
    for point in points:
        pieces.append(data[start:point])
        start = point
    pieces.append(data[start:])
    return pieces


@FUZZ
@given(stream=sse_streams(), points=st.lists(st.integers(0, 10_000), max_size=12))
def test_sse_chunk_boundaries_never_change_the_events(stream: bytes, points: list[int]) -> None:
    whole, rest = split_stream("sse", stream)
    splitter = stream_splitter("sse")
    pieces: list[bytes] = []
    for piece in _cuts(stream, points):
        pieces.extend(splitter.feed(piece))
    assert pieces == whole
    assert splitter.close() == rest
    assert b"".join(whole) + rest == stream  # no byte lost or invented


@FUZZ
@given(
    lines=st.lists(json_values, max_size=8), ending=line_endings, points=st.lists(st.integers(0, 10_000), max_size=12)
)
def test_ndjson_chunk_boundaries_never_change_the_lines(lines: list[Any], ending: str, points: list[int]) -> None:
    stream = "".join(json.dumps(value) + ending for value in lines).encode()
    whole, rest = split_stream("ndjson", stream)
    splitter = stream_splitter("ndjson")
    pieces: list[bytes] = []
    for piece in _cuts(stream, points):
        pieces.extend(splitter.feed(piece))
    assert pieces == whole and rest == b"" and splitter.close() == b""
    assert [orjson.loads(line) for line in whole] == [orjson.loads(json.dumps(v)) for v in lines]


@FUZZ
@given(data=st.binary(max_size=400), fmt=st.sampled_from(["sse", "ndjson", "json", "eventstream", "opaque"]))
def test_capture_then_render_gives_back_the_bytes_for_any_input(data: bytes, fmt: str) -> None:
    captured = capture(fmt, data, lambda value: "json")
    assert b"".join(render_segments(captured.body, captured.framing)) == data


@FUZZ
@given(stream=sse_streams())
def test_captured_sse_renders_back_exactly(stream: bytes) -> None:
    # json.dumps spelling (", ", ": ", \u escapes, exponent floats) included.
    captured = capture("sse", stream, lambda value: "json")
    stored = orjson.loads(orjson.dumps({"body": captured.body, "framing": captured.framing}))
    assert b"".join(render_segments(stored["body"], stored["framing"])) == stream


@st.composite
def plain_sse_streams(draw: Any) -> bytes:
    """Streams of one-line `data:` events and "\n" only (the capture's fast path), payloads spelt
    by orjson or json.dumps, or not JSON at all."""
    events = []
    for value in draw(st.lists(json_values, max_size=6)):
        spelling = draw(st.sampled_from(["orjson", "python", "done", "text"]))
        if spelling == "orjson":
            payload = orjson.dumps(value).decode()
        elif spelling == "python":
            payload = json.dumps(value)
        else:
            text = draw(st.text(max_size=8)).replace("\n", " ").replace("\r", " ")
            payload = "[DONE]" if spelling == "done" else text
        events.append(f"data: {payload}\n\n")
    tail = draw(st.sampled_from(["", 'data: {"cut', "\n"]))
    return ("".join(events) + tail).encode()


@FUZZ
@given(stream=plain_sse_streams())
def test_sse_fast_capture_equals_the_general_loop(stream: bytes) -> None:
    fast = SSE._capture_plain(stream, lambda value: "json")
    general = TextStreamCodec._capture(SSE, stream, lambda value: "json")
    assert fast is not None
    assert (fast.body, fast.framing, fast.chunk_ends) == (general.body, general.framing, general.chunk_ends)
    assert list(fast.framing) == list(general.framing)  # the same file, key order included
    if fast.exact:  # what lets the recorder skip rendering it again to check
        assert b"".join(SSE.render(fast.body, fast.framing)) == stream


@FUZZ
@given(text=st.text(max_size=200))
def test_sse_event_parser_accepts_any_text(text: str) -> None:
    event = parse_sse_event(text)
    assert event.raw == text


@FUZZ
@given(body=st.dictionaries(st.text(max_size=8), json_values, max_size=6), user_agent=st.text(max_size=20))
def test_canonical_key_ignores_key_order_whitespace_and_per_call_headers(body: dict[str, Any], user_agent: str) -> None:
    compact = orjson.dumps(body)
    spaced = json.dumps(dict(reversed(list(body.items()))), indent=3).encode()
    common = {"route": "openai", "method": "POST", "path": "/v1/chat/completions", "query": []}
    first = canonical_request(
        **common,
        headers={"user-agent": user_agent, "x-stainless-retry-count": "0"},
        body=parse_body(compact, "application/json"),
    )
    second = canonical_request(
        **common,
        headers={"authorization": "Bearer x", "x-stainless-retry-count": "2"},
        body=parse_body(spaced, "application/json"),
    )
    assert first.key == second.key


@FUZZ
@given(document=json_values)
def test_loader_raises_only_recording_errors_for_any_json(document: Any) -> None:
    router = Router(default_routes())

    def resolve(method: str, path: str) -> Any:
        match = router.resolve(method, path, {})
        return match.route.provider if match else None

    try:
        from_document(document, resolve)
    except RecordingError:
        pass


@FUZZ
@given(
    request=st.dictionaries(
        st.sampled_from(["method", "url", "endpoint", "body", "payload", "headers", "route", "sequence", "model"]),
        json_values,
        max_size=9,
    ),
    response=st.dictionaries(
        st.sampled_from(
            ["body", "is_streaming", "status", "headers", "framing", "is_exception", "exception_data", "truncated"]
        ),
        json_values,
        max_size=8,
    ),
    own=st.booleans(),
)
def test_loader_on_recording_shaped_garbage(request: dict, response: dict, own: bool) -> None:
    router = Router(default_routes())
    document: dict[str, Any] = {"request": request, "response": response}
    if own:
        document["provenance"] = {"tool": "llmproxy"}

    def resolve(method: str, path: str) -> Any:
        match = router.resolve(method, path, {})
        return match.route.provider if match else None

    try:
        recording = from_document(document, resolve)
        provider = get_provider("openai")
        render_segments(recording.response.body, recording.response.framing, provider.json_value)
    except (RecordingError, ValueError, TypeError):
        pass  # the documented errors: the index reports such a file and skips it


# -- Recording files: wrong types at every field, deep nesting, odd framing/timing/headers ------
# Each example is written as a file, loaded by a running replay proxy's own loader, and requested
# through the proxy: never a 500 without a provider-shaped body, never a hang, never a crash of
# the loader or of `check`.

_FIELD_PATHS = [
    ("request", "method"),
    ("request", "url"),
    ("request", "endpoint"),
    ("request", "headers"),
    ("request", "body"),
    ("request", "route"),
    ("request", "sequence"),
    ("request", "model"),
    ("response", "status"),
    ("response", "headers"),
    ("response", "body"),
    ("response", "is_streaming"),
    ("response", "framing"),
    ("response", "timing"),
    ("response", "truncated"),
    ("provenance",),
]


def _deep(depth: int, leaf: Any = 1.25) -> Any:
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


odd_strings = st.sampled_from(["", "a\r\nSet-Cookie: x", "\u20ac", "\x00", "bad name:", "é" * 3, "sk-", "1e308"])
odd_numbers = st.sampled_from([0, -1, 101, 99, 600, 2**63, -(2**63), 1e308, -1e308, 0.5, 1e-320])
odd_values = (
    json_values
    | odd_strings
    | odd_numbers
    | st.integers(120, 1100).map(_deep)
    | st.dictionaries(odd_strings, odd_strings | odd_numbers, max_size=3)
)
framings = st.fixed_dictionaries(
    {},
    optional={
        "format": st.sampled_from(["json", "sse", "ndjson", "text", "binary", "opaque", "x"]) | odd_values,
        "line_ending": st.sampled_from(["\n", "\r\n", "\r", "", "x"]) | odd_values,
        "event_field": st.sampled_from([None, "type", "event"]) | odd_values,
        "end": st.sampled_from(["", "data: [DONE]\n\n"]) | odd_values,
        "inserts": st.dictionaries(st.sampled_from(["0", "1", "x"]), odd_values, max_size=2) | odd_values,
        "verbatim": st.dictionaries(st.sampled_from(["0", "1"]), odd_values, max_size=2) | odd_values,
    },
)
timings = st.fixed_dictionaries({}, optional={"headers_ms": odd_values, "chunk_ms": st.lists(odd_values, max_size=3)})


def _base_document(number: int, streaming: bool) -> dict[str, Any]:
    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o", "choices": []}
    body: Any = (
        [{"__type__": "x.Chunk", "__data__": chunk}] if streaming else {"__type__": "x.Completion", "__data__": chunk}
    )
    return {
        "request": {
            "method": "POST",
            "url": "https://api.openai.com/v1/chat/completions",
            "headers": {},
            "body": {
                "model": "gpt-4o",
                "messages": [{"role": "user", "content": f"fuzz {number}"}],
                "stream": streaming,
            },
            "endpoint": "/v1/chat/completions",
            "model": "gpt-4o",
            "route": "openai",
        },
        "response": {
            "status": 200,
            "headers": {"content-type": "text/event-stream" if streaming else "application/json"},
            "body": body,
            "is_streaming": streaming,
            "framing": {"format": "sse", "line_ending": "\n", "event_field": None, "end": "data: [DONE]\n\n"}
            if streaming
            else {"format": "json"},
            "timing": {"headers_ms": 1.0, "chunk_ms": [2.0]},
        },
        "provenance": {"tool": "llmproxy"},
    }


@st.composite
def recording_files(draw: Any, number: int = 0) -> tuple[dict[str, Any], bool]:
    streaming = draw(st.booleans())
    document = _base_document(number, streaming)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_FIELD_PATHS))
        if path == ("response", "framing"):
            value = draw(framings)
        elif path == ("response", "timing"):
            value = draw(timings)
        elif path in (("request", "headers"), ("response", "headers")):
            value = draw(st.dictionaries(odd_strings | st.text(max_size=6), odd_values, max_size=3) | odd_values)
        else:
            value = draw(odd_values)
        target = document
        for step in path[:-1]:
            target = target[step]
        target[path[-1]] = value
    return document, streaming


class _FuzzReplay:
    """One replay proxy (realtime pacing, tiny max pause) for every example of a test."""

    def __init__(self, directory: Any) -> None:
        from tests.support import LoopThread, start_proxy

        self.directory = directory
        self.loop = LoopThread()
        config = directory / "llmproxy.toml"
        config.write_text("[proxy]\nmax_pause = 0.001\n")
        self.proxy = start_proxy(self.loop, "replay", directory / "rec", config, timing="realtime")
        self.index = self.proxy.server.mode.index  # type: ignore[attr-defined]
        self.store = self.proxy.server.pipeline.playback.store  # type: ignore[union-attr]
        self.count = 0

    def close(self) -> None:
        self.proxy.stop()
        self.loop.close()


def test_recording_files_never_crash_load_check_or_serve(tmp_path_factory: Any) -> None:
    import aiohttp

    from llmproxy.store.directory import StoreError
    from llmproxy.tools.check import check_directory

    directory = tmp_path_factory.mktemp("fuzzfiles")
    (directory / "rec" / "openai").mkdir(parents=True)
    replay = _FuzzReplay(directory)

    async def ask(number: int, streaming: bool) -> tuple[int, bytes]:
        body = {"model": "gpt-4o", "messages": [{"role": "user", "content": f"fuzz {number}"}], "stream": streaming}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
            async with session.post(replay.proxy.url + "/v1/chat/completions", json=body) as response:
                return response.status, await response.read()

    @settings(FUZZ, max_examples=max(1, FUZZ.max_examples // 2))  # each example is a real request
    @given(data=st.data())
    def one(data: Any) -> None:
        replay.count += 1
        number = replay.count
        document, streaming = data.draw(recording_files(number))
        path = directory / "rec" / "openai" / f"fuzz-{number}.json"
        path.write_bytes(orjson.dumps(document, option=orjson.OPT_NON_STR_KEYS) if _dumpable(document) else b"[")
        try:
            replay.index.load_file(replay.store, path)
        except (StoreError, RecordingError):
            pass  # reported and skipped, as the loader does; anything else would kill the loader
        status, payload = replay.loop.run(ask(number, streaming), timeout=30)  # never a hang
        if status >= 500 or status == 404:
            error = orjson.loads(payload)["error"]  # provider-shaped, never a bare 500
            assert isinstance(error["message"], str) and error["code"]

    try:
        one()
    finally:
        replay.close()
    problems = check_directory(directory / "rec", Router(default_routes()), _scanner())  # never raises
    assert all(problem.kind in ("invalid", "secret", "duplicate", "misnamed") for problem in problems)


def _dumpable(document: Any) -> bool:
    try:
        orjson.dumps(document, option=orjson.OPT_NON_STR_KEYS)
    except TypeError:
        return False  # deeper than orjson writes: the file is then plain garbage
    return True


def _scanner() -> Any:
    from llmproxy.store.secrets import SecretScanner

    return SecretScanner()


@FUZZ
@given(depth=st.integers(1, 3000), kind=st.sampled_from(["[", "{", "mixed"]))
def test_request_depth_is_measured_without_recursion_and_refused_past_the_limit(depth: int, kind: str) -> None:
    from llmproxy.canonical import MAX_REQUEST_DEPTH, BadRequest

    opening = {"[": "[" * depth, "{": '{"a":' * depth, "mixed": '[{"a":' * (depth // 2) + "["}[kind]
    closing = {"[": "]" * depth, "{": "}" * depth, "mixed": "]" + "}]" * (depth // 2)}[kind]
    levels = {"[": depth, "{": depth, "mixed": 2 * (depth // 2) + 1}[kind]
    text = (opening + "1" + closing).encode()
    try:
        value = parse_body(text, "application/json")
    except BadRequest as exc:
        assert levels > MAX_REQUEST_DEPTH and exc.code == "request_too_deep"
    else:
        assert levels <= MAX_REQUEST_DEPTH and value is not None
