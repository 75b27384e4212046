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
from llmproxy.wire.sse import parse_sse_event

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
