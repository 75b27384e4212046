"""Turn a response body into the recording's chunk list, and the chunk list back into bytes.

Capture keeps the readable part (each JSON chunk as `{"__type__", "__data__"}`) in `body`, and
everything needed to give back the exact bytes in `framing`:

    format       sse | ndjson | json | text | binary
    line_ending  "\\n" or "\\r\\n", as the upstream sent it
    event_field  for SSE: the JSON field whose value is repeated on an `event:` line (or null)
    end          text after the last chunk (e.g. "data: [DONE]\\n\\n")
    inserts      {"i": text} non-chunk events (comments, pings without JSON, blank NDJSON lines)
                 that stood before chunk i
    verbatim     {"i": text} chunk i's exact event text, where the canonical framing would differ
                 (or would lose digits: orjson reads integers past 64 bits as floats); for a
                 JSON body, {"0": text} is the whole body

Rendering re-serialises each chunk's JSON (allowed: parsed equality) and copies every other byte.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from llmproxy.wire.codecs import (
    frame_ndjson,
    frame_sse,
    line_ending_of,
    parse_sse_event,
    split_stream,
)

STREAM_FORMATS = ("sse", "ndjson")
TYPE_KEY = "__type__"
DATA_KEY = "__data__"
TEXT_LABEL = "llmproxy.text"
BYTES_LABEL = "llmproxy.bytes"

Labeler = Callable[[Any], str]


@dataclass(slots=True)
class CapturedBody:
    body: Any
    framing: dict[str, Any]
    # Byte offset (in the raw body) at which each chunk of `body` was complete; used to give
    # every chunk the arrival time of the network read that finished it.
    chunk_ends: list[int] = field(default_factory=list)

    @property
    def is_streaming(self) -> bool:
        return self.framing.get("format") in STREAM_FORMATS


def typed(label: str, data: Any) -> dict[str, Any]:
    return {TYPE_KEY: label, DATA_KEY: data}


# orjson reads integers past 64 bits as floats: such payloads keep their exact text (verbatim).
_INT64_LIMIT = 2.0**63


def _has_lossy_number(value: Any) -> bool:
    """Whether parsing may have rounded a number (checked on the parsed value: cost follows the
    number of JSON nodes, not the bytes, so a 1 MB string costs nothing)."""
    if type(value) is float:
        return not -_INT64_LIMIT < value < _INT64_LIMIT
    if type(value) is dict:
        return any(_has_lossy_number(item) for item in value.values())
    if type(value) is list:
        return any(_has_lossy_number(item) for item in value)
    return False


def _loads_json(text: str | bytes) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return _NOT_JSON


_NOT_JSON = object()


def capture(fmt: str, raw: bytes, labeler: Labeler) -> CapturedBody:
    """Split a complete response body into typed chunks plus the framing that restores it."""
    if fmt in STREAM_FORMATS:
        try:
            return _capture_stream(fmt, raw, labeler)
        except UnicodeDecodeError:
            return capture_opaque(raw)
    if fmt == "json":
        value = _loads_json(raw) if raw.strip() else _NOT_JSON
        if value is not _NOT_JSON:
            framing: dict[str, Any] = {"format": "json"}
            if _has_lossy_number(value):
                framing["verbatim"] = {"0": raw.decode("utf-8", errors="replace")}
            return CapturedBody(typed(labeler(value), value), framing)
    return capture_opaque(raw)


def capture_opaque(raw: bytes) -> CapturedBody:
    """Bodies that are not JSON: text stays readable, anything else is base64."""
    try:
        return CapturedBody(typed(TEXT_LABEL, raw.decode("utf-8")), {"format": "text"})
    except UnicodeDecodeError:
        encoded = base64.b64encode(raw).decode("ascii")
        return CapturedBody(typed(BYTES_LABEL, encoded), {"format": "binary"})


def _capture_stream(fmt: str, raw: bytes, labeler: Labeler) -> CapturedBody:
    events, remainder = split_stream(fmt, raw)
    body: list[dict[str, Any]] = []
    chunk_ends: list[int] = []
    inserts: dict[str, str] = {}
    verbatim: dict[str, str] = {}
    pending = ""  # non-chunk text waiting for the next chunk (or the end)
    line_ending: str | None = None
    event_field: str | None = None
    offset = 0
    for raw_event in events:
        offset += len(raw_event)
        text = raw_event.decode("utf-8")
        if fmt == "sse":
            event_name, payload = _sse_fields(text)
            value = _loads_json(payload) if payload is not None else _NOT_JSON
        else:
            payload = text.rstrip("\r\n")
            value = _loads_json(payload) if payload else _NOT_JSON
        if not isinstance(value, (dict, list)):
            pending += text
            continue
        if line_ending is None:
            line_ending = line_ending_of(text)
            if fmt == "sse":
                event_field = _event_field_of(event_name, value)
        index = len(body)
        if pending:
            inserts[str(index)] = pending
            pending = ""
        if fmt == "sse":
            expected = frame_sse(payload, event=_event_name(value, event_field), line_ending=line_ending)
        else:
            expected = frame_ndjson(payload, line_ending=line_ending)
        if expected != text or _has_lossy_number(value):
            verbatim[str(index)] = text
        body.append(typed(labeler(value), value))
        chunk_ends.append(offset)
    framing: dict[str, Any] = {"format": fmt, "line_ending": line_ending or "\n"}
    if fmt == "sse":
        framing["event_field"] = event_field
    framing["end"] = pending + remainder.decode("utf-8")
    if inserts:
        framing["inserts"] = inserts
    if verbatim:
        framing["verbatim"] = verbatim
    return CapturedBody(body, framing, chunk_ends)


def _sse_fields(text: str) -> tuple[str | None, str | None]:
    """(event name, data) of one event; the two usual shapes without the general parser."""
    if text.endswith("\n\n") and "\r" not in text:
        lines = text[:-2].split("\n")
        if len(lines) == 1 and lines[0].startswith("data: "):
            return None, lines[0][6:]
        if len(lines) == 2 and lines[0].startswith("event: ") and lines[1].startswith("data: "):
            return lines[0][7:], lines[1][6:]
    parsed = parse_sse_event(text)
    return parsed.event, parsed.data


def _event_field_of(event: str | None, value: Any) -> str | None:
    if event is None or not isinstance(value, dict):
        return None
    for candidate in ("type", "event_type", "event"):
        if value.get(candidate) == event:
            return candidate
    return None


def _event_name(value: Any, event_field: str | None) -> str | None:
    if event_field is None:
        return None
    name = value.get(event_field) if isinstance(value, dict) else None
    return name if isinstance(name, str) else None


def data_of(item: Any) -> Any:
    if isinstance(item, dict) and TYPE_KEY in item:
        return item.get(DATA_KEY)
    return item


def render_segments(body: Any, framing: dict[str, Any], json_value: Callable[[Any], Any] | None = None) -> list[bytes]:
    """The response bytes as one segment per chunk plus a final segment (for paced replay).

    Raises ValueError when body and framing do not fit together; loaders call this once so a
    bad file is reported at load time, not on the first request.
    """
    fmt = framing.get("format", "json")
    if fmt in STREAM_FORMATS:
        if not isinstance(body, list):
            raise ValueError(f"a {fmt} recording needs a list of chunks as its body")
        return _render_stream(fmt, body, framing)
    if fmt == "json":
        verbatim = framing.get("verbatim") or {}
        if "0" in verbatim:
            return [str(verbatim["0"]).encode("utf-8")]
        return [orjson.dumps((json_value or data_of)(body))]
    if fmt == "text":
        data = data_of(body)
        if not isinstance(data, str):
            raise ValueError("a text body must be a string")
        return [data.encode("utf-8")]
    if fmt == "binary":
        data = data_of(body)
        if not isinstance(data, str):
            raise ValueError("a binary body must be a base64 string")
        return [base64.b64decode(data, validate=True)]
    raise ValueError(f"unknown body format {fmt!r}")


def _render_stream(fmt: str, body: list[Any], framing: dict[str, Any]) -> list[bytes]:
    line_ending = framing.get("line_ending") or "\n"
    if line_ending not in ("\n", "\r\n", "\r"):
        raise ValueError(f"bad line ending {line_ending!r}")
    event_field = framing.get("event_field")
    inserts = framing.get("inserts") or {}
    verbatim = framing.get("verbatim") or {}
    segments: list[bytes] = []
    for index, item in enumerate(body):
        key = str(index)
        text = inserts.get(key, "")
        if key in verbatim:
            text += verbatim[key]
        else:
            data = data_of(item)
            payload = orjson.dumps(data).decode("utf-8")
            if fmt == "sse":
                text += frame_sse(payload, event=_event_name(data, event_field), line_ending=line_ending)
            else:
                text += frame_ndjson(payload, line_ending=line_ending)
        segments.append(text.encode("utf-8"))
    tail = inserts.get(str(len(body)), "") + (framing.get("end") or "")
    segments.append(tail.encode("utf-8"))
    return segments
