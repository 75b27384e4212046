"""AWS event stream (`application/vnd.amazon.eventstream`, Bedrock ConverseStream): binary frames.

One frame (all integers big-endian):

    total_length u32 | headers_length u32 | prelude_crc u32 = CRC32(bytes 0-7)
    headers: (name_len u8, name, type u8, value)*
    payload (JSON for Bedrock)
    message_crc u32 = CRC32(everything before it)

A recording chunk is `{"__type__", "__headers__": {":event-type": ..., ...}, "__data__": payload
JSON}` (or `"__bytes__": base64` for a payload that is not JSON). Rendering re-encodes headers and
payload and recomputes both CRCs; a frame that re-encoding would not give back exactly (a bad CRC,
a duplicate header) is stored whole in `framing.raw`, a JSON payload no style reproduces in
`framing.verbatim`. Bytes after the last whole frame are kept, base64, in `framing.end`.
"""

from __future__ import annotations

import base64
import binascii
import struct
import uuid
import zlib
from typing import Any

from llmproxy.wire.framing import CapturedBody, Format, JsonValue, Labeler, data_of
from llmproxy.wire.json import NOT_JSON, StyleDetector, dumps, loads, set_style, style_of

HEADERS_KEY = "__headers__"
BYTES_KEY = "__bytes__"
PRELUDE_LENGTH = 12
MIN_FRAME = PRELUDE_LENGTH + 4
# botocore's limits (128 KiB of headers, 24 MiB of payload): a longer length is not a frame.
MAX_FRAME = MIN_FRAME + 128 * 1024 + 24 * 1024 * 1024

# Header value types: wire code <-> name used in the recording (strings are stored bare).
_TYPE_NAMES = {
    0: "bool",
    1: "bool",
    2: "byte",
    3: "short",
    4: "integer",
    5: "long",
    6: "bytes",
    7: "string",
    8: "timestamp",
    9: "uuid",
}
_INT_FORMATS = {2: "!b", 3: "!h", 4: "!i", 5: "!q", 8: "!q"}
_TYPE_CODES = {"byte": 2, "short": 3, "integer": 4, "long": 5, "bytes": 6, "string": 7, "timestamp": 8, "uuid": 9}


class EventStreamError(ValueError):
    """Bytes that are not a well-formed event-stream frame."""


class EventStreamSplitter:
    """Whole frames by their length prefix; a frame may arrive across any number of reads.

    A length that no frame can have ends the splitting: everything from there on is left for
    `close()` (it is kept byte for byte, not guessed at)."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._broken = False

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        frames: list[bytes] = []
        start = 0
        while not self._broken and len(self._buffer) - start >= 4:
            total = int.from_bytes(self._buffer[start : start + 4], "big")
            if not MIN_FRAME <= total <= MAX_FRAME:
                self._broken = True
                break
            if len(self._buffer) - start < total:
                break
            frames.append(bytes(self._buffer[start : start + total]))
            start += total
        if start:
            del self._buffer[:start]
        return frames

    def close(self) -> bytes:
        rest = bytes(self._buffer)
        self._buffer = bytearray()
        return rest


def decode_frame(frame: bytes) -> tuple[list[tuple[str, int, Any]], bytes]:
    """(headers as (name, type code, value), payload) of one whole frame; CRCs not checked here
    (the caller compares the re-encoded frame with the original instead)."""
    if len(frame) < MIN_FRAME:
        raise EventStreamError("frame shorter than its prelude")
    total, headers_length = struct.unpack_from("!II", frame)
    if total != len(frame) or headers_length > total - MIN_FRAME:
        raise EventStreamError("frame lengths do not add up")
    headers: list[tuple[str, int, Any]] = []
    position, end = PRELUDE_LENGTH, PRELUDE_LENGTH + headers_length
    try:
        while position < end:
            name_length = frame[position]
            name = frame[position + 1 : position + 1 + name_length].decode("utf-8")
            position += 1 + name_length
            code = frame[position]
            position += 1
            value: Any
            if code in (0, 1):
                value = code == 0
            elif code in _INT_FORMATS:
                fmt = _INT_FORMATS[code]
                (value,) = struct.unpack_from(fmt, frame, position)
                position += struct.calcsize(fmt)
            elif code in (6, 7):
                (length,) = struct.unpack_from("!H", frame, position)
                data = frame[position + 2 : position + 2 + length]
                if len(data) != length:
                    raise EventStreamError("header value runs past the headers")
                value = data.decode("utf-8") if code == 7 else data
                position += 2 + length
            elif code == 9:
                value = frame[position : position + 16]
                position += 16
            else:
                raise EventStreamError(f"unknown header type {code}")
            headers.append((name, code, value))
    except (IndexError, struct.error, UnicodeDecodeError) as exc:
        raise EventStreamError(f"bad headers: {exc}") from None
    if position != end:
        raise EventStreamError("headers overrun their length")
    return headers, frame[end : total - 4]


def encode_header(name: str, code: int, value: Any) -> bytes:
    encoded_name = name.encode("utf-8")
    if len(encoded_name) > 255:
        raise EventStreamError(f"header name too long: {name[:40]!r}")
    out = bytes([len(encoded_name)]) + encoded_name
    if code in (0, 1):
        return out + bytes([0 if value else 1])
    out += bytes([code])
    if code in _INT_FORMATS:
        return out + struct.pack(_INT_FORMATS[code], value)
    if code in (6, 7):
        data = value.encode("utf-8") if code == 7 else value
        return out + struct.pack("!H", len(data)) + data
    if code == 9:
        if len(value) != 16:
            raise EventStreamError("a uuid header holds 16 bytes")
        return out + value
    raise EventStreamError(f"unknown header type {code}")


def encode_frame(headers: list[tuple[str, int, Any]], payload: bytes) -> bytes:
    """One frame, both CRCs computed."""
    header_bytes = b"".join(encode_header(name, code, value) for name, code, value in headers)
    prelude = struct.pack("!II", MIN_FRAME + len(header_bytes) + len(payload), len(header_bytes))
    message = prelude + struct.pack("!I", zlib.crc32(prelude)) + header_bytes + payload
    return message + struct.pack("!I", zlib.crc32(message))


def headers_document(headers: list[tuple[str, int, Any]]) -> dict[str, Any]:
    """Headers as the recording shows them: strings bare, other types as {"type", "value"}."""
    document: dict[str, Any] = {}
    for name, code, value in headers:
        if name in document:
            raise EventStreamError(f"duplicate header {name!r}")
        if code == 7:
            document[name] = value
        elif code == 6:
            document[name] = {"type": "bytes", "value": base64.b64encode(value).decode("ascii")}
        elif code == 9:
            document[name] = {"type": "uuid", "value": str(uuid.UUID(bytes=value))}
        else:
            document[name] = {"type": _TYPE_NAMES[code], "value": value}
    return document


def headers_from_document(document: Any) -> list[tuple[str, int, Any]]:
    if not isinstance(document, dict):
        raise ValueError(f"{HEADERS_KEY} must be an object")
    headers: list[tuple[str, int, Any]] = []
    for name, item in document.items():
        if isinstance(item, str):
            headers.append((name, 7, item))
            continue
        if not isinstance(item, dict) or not isinstance(item.get("type"), str):
            raise ValueError(f"event-stream header {name!r}: a string or {{'type', 'value'}}")
        kind, value = item["type"], item.get("value")
        if kind == "bool":
            headers.append((name, 0 if value else 1, bool(value)))
        elif kind == "bytes":
            headers.append((name, 6, base64.b64decode(str(value), validate=True)))
        elif kind == "uuid":
            headers.append((name, 9, uuid.UUID(str(value)).bytes))
        elif kind in _TYPE_CODES and kind != "string" and isinstance(value, int) and not isinstance(value, bool):
            headers.append((name, _TYPE_CODES[kind], value))
        elif kind == "string" and isinstance(value, str):
            headers.append((name, 7, value))
        else:
            raise ValueError(f"event-stream header {name!r}: bad {kind} value")
    return headers


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class EventStreamCodec:
    name = "eventstream"
    format = Format.EVENTSTREAM
    content_types = {Format.EVENTSTREAM: "application/vnd.amazon.eventstream"}
    media_types = ("application/vnd.amazon.eventstream",)
    streaming = True

    def splitter(self) -> EventStreamSplitter:
        return EventStreamSplitter()

    def default_framing(self) -> dict[str, Any]:
        return {"format": self.format.value, "end": ""}

    def capture(self, raw: bytes, labeler: Labeler) -> CapturedBody:
        splitter = EventStreamSplitter()
        frames = splitter.feed(raw)
        remainder = splitter.close()
        body: list[dict[str, Any]] = []
        chunk_ends: list[int] = []
        verbatim: dict[str, str] = {}
        raw_frames: dict[str, str] = {}
        detector = StyleDetector()
        offset = 0
        for index, frame in enumerate(frames):
            offset += len(frame)
            key = str(index)
            try:
                headers, payload = decode_frame(frame)
                chunk: dict[str, Any] = {HEADERS_KEY: headers_document(headers)}
            except EventStreamError:
                headers, payload, chunk = [], b"", {HEADERS_KEY: {}}
                raw_frames[key] = _b64(frame)
            value = loads(payload) if payload else NOT_JSON
            if not isinstance(value, (dict, list)):
                value = NOT_JSON
            if key not in raw_frames and encode_frame(headers, payload) != frame:
                raw_frames[key] = _b64(frame)  # a bad CRC or an unusual encoding: keep it as sent
            if value is NOT_JSON:
                if payload and key not in raw_frames:
                    chunk[BYTES_KEY] = _b64(payload)
                body.append({"__type__": labeler(None), **chunk, "__data__": None})
            else:
                text = payload.decode("utf-8")
                if key not in raw_frames and not detector.accepts(value, text):
                    verbatim[key] = text
                body.append({"__type__": labeler(value), **chunk, "__data__": value})
            chunk_ends.append(offset)
        framing: dict[str, Any] = {"format": self.format.value}
        set_style(framing, detector.style)
        framing["end"] = _b64(remainder)
        if verbatim:
            framing["verbatim"] = verbatim
        if raw_frames:
            framing["raw"] = raw_frames
        return CapturedBody(body, framing, chunk_ends, streaming=True)

    def render(self, body: Any, framing: dict[str, Any], json_value: JsonValue = data_of) -> list[bytes]:
        if not isinstance(body, list):
            raise ValueError("an eventstream recording needs a list of frames as its body")
        style = style_of(framing)
        verbatim = framing.get("verbatim") or {}
        raw_frames = framing.get("raw") or {}
        segments: list[bytes] = []
        try:
            for index, item in enumerate(body):
                key = str(index)
                if key in raw_frames:
                    segments.append(base64.b64decode(raw_frames[key], validate=True))
                    continue
                if not isinstance(item, dict):
                    raise ValueError(f"eventstream frame {index} must be an object")
                if key in verbatim:
                    payload = str(verbatim[key]).encode("utf-8")
                elif item.get("__data__") is not None:
                    payload = dumps(item["__data__"], style).encode("utf-8")
                else:
                    payload = base64.b64decode(item.get(BYTES_KEY) or "", validate=True)
                segments.append(encode_frame(headers_from_document(item.get(HEADERS_KEY, {})), payload))
            segments.append(base64.b64decode(framing.get("end") or "", validate=True))
        except (binascii.Error, EventStreamError, TypeError) as exc:
            raise ValueError(f"bad eventstream recording: {exc}") from None
        return segments


EVENTSTREAM = EventStreamCodec()
