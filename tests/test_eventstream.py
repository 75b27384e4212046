"""The AWS event-stream codec: frames split at any read boundary, captured readable, rendered
byte-exact, and accepted by botocore's own decoder."""

from __future__ import annotations

import base64
import json
import struct
import zlib
from typing import Any

import orjson
import pytest
from botocore.eventstream import ChecksumMismatch, EventStreamBuffer
from hypothesis import given, settings
from hypothesis import strategies as st

from llmproxy.wire.eventstream import (
    BYTES_KEY,
    EVENTSTREAM,
    HEADERS_KEY,
    EventStreamSplitter,
    decode_frame,
    encode_frame,
)
from llmproxy.wire.registry import codec_for_content_type, codec_for_format, render_segments


def reference_frame(event_type: str, payload: bytes, message_type: str = "event") -> bytes:
    """Frames built the way the reference document builds them by hand (independent of the codec)."""

    def header(name: str, value: str) -> bytes:
        n, v = name.encode(), value.encode()
        return bytes([len(n)]) + n + b"\x07" + struct.pack("!H", len(v)) + v

    kind = ":exception-type" if message_type == "exception" else ":event-type"
    headers = (
        header(kind, event_type) + header(":content-type", "application/json") + header(":message-type", message_type)
    )
    prelude = struct.pack("!II", 12 + len(headers) + len(payload) + 4, len(headers))
    message = prelude + struct.pack("!I", zlib.crc32(prelude)) + headers + payload
    return message + struct.pack("!I", zlib.crc32(message))


def converse_stream() -> bytes:
    events: list[tuple[str, Any]] = [
        ("messageStart", {"role": "assistant"}),
        ("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "Hel"}, "p": "abcdefghij"}),
        ("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "lo \u00e9"}}),
        ("contentBlockStop", {"contentBlockIndex": 0}),
        ("messageStop", {"stopReason": "end_turn"}),
        (
            "metadata",
            {"usage": {"inputTokens": 9, "outputTokens": 3, "totalTokens": 12}, "metrics": {"latencyMs": 412}},
        ),
    ]
    return b"".join(reference_frame(kind, json.dumps(obj, separators=(",", ":")).encode()) for kind, obj in events)


def botocore_messages(data: bytes) -> list[tuple[dict[str, Any], bytes]]:
    buffer = EventStreamBuffer()
    buffer.add_data(data)
    return [(message.headers, message.payload) for message in buffer]


def test_the_documented_frame_is_encoded_byte_for_byte() -> None:
    # The 148-byte frame of wire-formats-bedrock-cohere-vertex.md §2.3.
    payload = b'{"contentBlockIndex":0,"delta":{"text":"Hi"}}'
    headers = [
        (":event-type", 7, "contentBlockDelta"),
        (":content-type", 7, "application/json"),
        (":message-type", 7, "event"),
    ]
    frame = encode_frame(headers, payload)
    assert len(frame) == 148
    assert frame[:12].hex() == "0000009400000057b4ab9aee"
    assert frame[-4:].hex() == "1f944657"
    assert frame == reference_frame("contentBlockDelta", payload)
    assert decode_frame(frame) == (headers, payload)


def test_botocore_decodes_what_the_codec_renders() -> None:
    data = converse_stream()
    captured = EVENTSTREAM.capture(data, lambda value: "bedrock.event")
    rendered = b"".join(render_segments(captured.body, captured.framing))
    assert rendered == data
    messages = botocore_messages(rendered)
    assert [headers[":event-type"] for headers, _ in messages] == [
        "messageStart",
        "contentBlockDelta",
        "contentBlockDelta",
        "contentBlockStop",
        "messageStop",
        "metadata",
    ]
    assert [orjson.loads(payload) for _, payload in messages] == [chunk["__data__"] for chunk in captured.body]


def test_capture_is_readable() -> None:
    captured = EVENTSTREAM.capture(converse_stream(), lambda value: "bedrock.event")
    first = captured.body[1]
    assert first[HEADERS_KEY] == {
        ":event-type": "contentBlockDelta",
        ":content-type": "application/json",
        ":message-type": "event",
    }
    assert first["__data__"] == {"contentBlockIndex": 0, "delta": {"text": "Hel"}, "p": "abcdefghij"}
    # json.dumps(separators=(",", ":")) escapes "\u00e9": the recording says so and keeps the value.
    assert captured.streaming and captured.framing == {
        "format": "eventstream",
        "json_style": "python-compact",
        "end": "",
    }
    assert captured.body[2]["__data__"]["delta"]["text"] == "lo \u00e9"
    assert captured.chunk_ends[-1] == len(converse_stream())


def test_every_header_type_and_a_binary_payload_round_trip() -> None:
    headers = [
        ("t", 0, True),
        ("f", 1, False),
        ("b", 2, -5),
        ("s", 3, 300),
        ("i", 4, -70000),
        ("l", 5, 2**40),
        ("y", 6, b"\x00\xff"),
        ("str", 7, "v\u00e9"),
        ("ts", 8, 1_700_000_000_000),
        ("u", 9, bytes(range(16))),
    ]
    frame = encode_frame(headers, b"\x89PNG not json")
    boto_headers, payload = botocore_messages(frame)[0]
    assert payload == b"\x89PNG not json" and boto_headers["l"] == 2**40 and boto_headers["y"] == b"\x00\xff"
    captured = EVENTSTREAM.capture(frame, lambda value: "x")
    chunk = captured.body[0]
    assert chunk[BYTES_KEY] == base64.b64encode(b"\x89PNG not json").decode()
    assert chunk[HEADERS_KEY]["str"] == "v\u00e9"
    assert chunk[HEADERS_KEY]["u"] == {"type": "uuid", "value": "00010203-0405-0607-0809-0a0b0c0d0e0f"}
    stored = orjson.loads(orjson.dumps(captured.body)), orjson.loads(orjson.dumps(captured.framing))
    assert b"".join(render_segments(*stored)) == frame
    assert "raw" not in captured.framing


def test_a_frame_with_a_bad_crc_is_kept_as_sent() -> None:
    good = reference_frame("messageStart", b'{"role":"assistant"}')
    bad = good[:-1] + bytes([good[-1] ^ 0xFF])
    data = good + bad
    captured = EVENTSTREAM.capture(data, lambda value: "x")
    assert set(captured.framing["raw"]) == {"1"}
    assert captured.body[1]["__data__"] == {"role": "assistant"}  # still readable
    assert b"".join(render_segments(captured.body, captured.framing)) == data
    with pytest.raises(ChecksumMismatch):
        botocore_messages(b"".join(render_segments(captured.body, captured.framing)))


def test_json_the_codec_would_spell_differently_is_kept_verbatim() -> None:
    frames = [
        reference_frame("metadata", b'{"usage": {"inputTokens": 9}, "score": 5.978460467304103e-05}'),
        reference_frame("metadata", b'{"big":123456789012345678901234567890}'),
        reference_frame("metadata", b'{"x" :1}'),
    ]
    data = b"".join(frames)
    captured = EVENTSTREAM.capture(data, lambda value: "x")
    assert captured.framing["json_style"] == "python"
    assert set(captured.framing.get("verbatim", {})) == {"1", "2"}
    assert b"".join(render_segments(captured.body, captured.framing)) == data


def test_a_stream_cut_mid_frame_keeps_the_partial_frame() -> None:
    data = converse_stream()
    cut = data[:-7]
    captured = EVENTSTREAM.capture(cut, lambda value: "x")
    assert len(captured.body) == 5
    assert captured.framing["end"]
    assert b"".join(render_segments(captured.body, captured.framing)) == cut


def test_a_length_no_frame_can_have_stops_splitting() -> None:
    data = reference_frame("messageStart", b"{}") + b"\x00\x00\x00\x03garbage" + reference_frame("messageStop", b"{}")
    splitter = EventStreamSplitter()
    frames = splitter.feed(data)
    assert len(frames) == 1
    assert b"".join(frames) + splitter.close() == data


def test_the_registry_streams_event_streams() -> None:
    codec = codec_for_content_type("application/vnd.amazon.eventstream")
    assert codec is EVENTSTREAM and codec.streaming
    assert codec_for_format("eventstream") is EVENTSTREAM
    assert not codec_for_content_type("application/octet-stream").streaming


@settings(max_examples=300, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=12))
def test_split_is_independent_of_read_boundaries(cuts: list[int]) -> None:
    data = converse_stream() + b"\x00\x00\x01"  # and a partial prelude at the end
    points = sorted({cut % (len(data) + 1) for cut in cuts})
    splitter = EventStreamSplitter()
    frames: list[bytes] = []
    start = 0
    for point in [*points, len(data)]:
        frames += splitter.feed(data[start:point])
        start = point
    assert frames == botocore_frames(data)
    assert splitter.close() == b"\x00\x00\x01"


def test_split_at_every_single_boundary() -> None:
    data = converse_stream()
    expected = botocore_frames(data)
    for point in range(len(data) + 1):
        splitter = EventStreamSplitter()
        frames = splitter.feed(data[:point]) + splitter.feed(data[point:])
        assert frames == expected, point
    byte_by_byte = EventStreamSplitter()
    assert [frame for i in range(len(data)) for frame in byte_by_byte.feed(data[i : i + 1])] == expected


def botocore_frames(data: bytes) -> list[bytes]:
    """Frame texts as botocore delimits them (by its own length and CRC checks)."""
    frames, offset = [], 0
    for _ in botocore_messages(data):
        total = int.from_bytes(data[offset : offset + 4], "big")
        frames.append(data[offset : offset + total])
        offset += total
    return frames


header_values = st.one_of(
    st.tuples(st.just(0), st.just(True)),
    st.tuples(st.just(1), st.just(False)),
    st.tuples(st.just(2), st.integers(-128, 127)),
    st.tuples(st.just(3), st.integers(-(2**15), 2**15 - 1)),
    st.tuples(st.just(4), st.integers(-(2**31), 2**31 - 1)),
    st.tuples(st.just(5), st.integers(-(2**63), 2**63 - 1)),
    st.tuples(st.just(6), st.binary(max_size=20)),
    st.tuples(st.just(7), st.text(max_size=20)),
    st.tuples(st.just(8), st.integers(0, 2**62)),
    st.tuples(st.just(9), st.binary(min_size=16, max_size=16)),
)
payloads = st.one_of(
    st.binary(max_size=40),
    st.dictionaries(st.text(max_size=5), st.integers() | st.floats(allow_nan=False) | st.text(max_size=5)).map(
        lambda value: json.dumps(value).encode()
    ),
)


@settings(max_examples=300, deadline=None)
@given(
    frames=st.lists(
        st.tuples(st.lists(st.tuples(st.text(min_size=1, max_size=8), header_values), max_size=4), payloads),
        max_size=5,
    ),
    flip=st.integers(min_value=-1, max_value=10_000),
    cut=st.integers(min_value=0, max_value=30),
)
def test_any_frames_render_back_exactly(frames: list[Any], flip: int, cut: int) -> None:
    data = bytearray(
        b"".join(
            encode_frame([(name, code, value) for name, (code, value) in headers], payload)
            for headers, payload in frames
        )
    )
    if data and flip >= 0:
        data[flip % len(data)] ^= 0x41  # a corrupted byte anywhere: CRC, length, header or payload
    raw = bytes(data[: max(0, len(data) - cut)])
    captured = EVENTSTREAM.capture(raw, lambda value: "x")
    stored = orjson.loads(orjson.dumps({"body": captured.body, "framing": captured.framing}))
    assert b"".join(render_segments(stored["body"], stored["framing"])) == raw
