"""Server-sent events (OpenAI, Anthropic, Gemini): split, parse and frame events exactly.

The splitter never parses JSON and never loses a byte: joining the events it returns and its
remainder gives back the input, whatever the read boundaries were.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import orjson

from llmproxy.wire.framing import DATA_KEY, TYPE_KEY, CapturedBody, ConstantLabel, Format, Labeler
from llmproxy.wire.textstream import TextStreamCodec

# An SSE event ends at an empty line. A lone "\r" only counts as a terminator when it is not
# the first half of "\r\n", otherwise "data: x\r\n" would look like two line ends.
_SSE_EVENT_END = re.compile(rb"(?:\r\n|\n|\r(?!\n))(?:\r\n|\n|\r(?!\n))")
_LINE_END = re.compile(r"\r\n|\n|\r")


def _split(buffer: bytes, *, final: bool) -> tuple[list[bytes], bytes]:
    events: list[bytes] = []
    start = 0
    for match in _SSE_EVENT_END.finditer(buffer):
        end = match.end()
        # A trailing "\r" may be the first half of a "\r\n" still in flight.
        if not final and end == len(buffer) and buffer.endswith(b"\r"):
            break
        events.append(buffer[start:end])
        start = end
    return events, buffer[start:]


class SseSplitter:
    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        events, self._buffer = _split(self._buffer, final=False)
        return events

    def close(self) -> bytes:
        """The bytes after the last complete event (a stream cut short, or no final blank line)."""
        events, rest = _split(self._buffer, final=True)
        self._buffer = b""
        return b"".join(events) + rest


@dataclass(slots=True)
class SSEEvent:
    """One SSE event, parsed per the WHATWG rules, with its exact text kept alongside."""

    raw: str
    event: str | None = None
    data_lines: list[str] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    other_fields: list[str] = field(default_factory=list)
    line_ending: str = "\n"

    @property
    def data(self) -> str | None:
        return "\n".join(self.data_lines) if self.data_lines else None


def parse_sse_event(raw: str) -> SSEEvent:
    """Parse one event text as returned by the splitter (terminating blank line included)."""
    parsed = SSEEvent(raw=raw)
    ending = _LINE_END.search(raw)
    if ending:
        parsed.line_ending = ending.group(0)
    for line in _LINE_END.split(raw):
        if not line:
            continue
        if line.startswith(":"):
            parsed.comments.append(line)
            continue
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            parsed.data_lines.append(value)
        elif name == "event":
            parsed.event = value
        else:
            parsed.other_fields.append(line)
    return parsed


def frame_sse(data: str, *, event: str | None, line_ending: str) -> str:
    """The canonical framing of one SSE event: optional `event:` line, one `data:` line."""
    if event is None:
        return f"data: {data}{line_ending}{line_ending}"
    return f"event: {event}{line_ending}data: {data}{line_ending}{line_ending}"


class SseCodec(TextStreamCodec):
    name = "sse"
    format = Format.SSE
    content_types = {Format.SSE: "text/event-stream; charset=utf-8"}
    media_types = ("text/event-stream",)

    def splitter(self) -> SseSplitter:
        return SseSplitter()

    def payload(self, text: str) -> tuple[str | None, str | None]:
        # The two usual shapes without the general parser.
        if text.endswith("\n\n") and "\r" not in text:
            lines = text[:-2].split("\n")
            if len(lines) == 1 and lines[0].startswith("data: "):
                return None, lines[0][6:]
            if len(lines) == 2 and lines[0].startswith("event: ") and lines[1].startswith("data: "):
                return lines[0][7:], lines[1][6:]
        parsed = parse_sse_event(text)
        return parsed.event, parsed.data

    def _capture(self, raw: bytes, labeler: Labeler) -> CapturedBody:
        plain = self._capture_plain(raw, labeler)
        return plain if plain is not None else super()._capture(raw, labeler)

    def _capture_plain(self, raw: bytes, labeler: Labeler) -> CapturedBody | None:
        """The usual stream (OpenAI's), every event one `data:` line and a blank line, "\n" only:
        captured as the general loop would, without its per-event parsing and framing (the
        event's text is `data: ` + payload + "\n\n" by construction). None: not that shape."""
        captured = self._capture_chunks(raw, labeler)
        return captured if captured is not None else self._capture_lines(raw, labeler)

    def _capture_chunks(self, raw: bytes, labeler: Labeler) -> CapturedBody | None:
        """_capture_lines for the usual case of it, a run of chunks and then only non-JSON events
        (`[DONE]`) and the tail, with no Python work per chunk but its parsing: split at the
        events' `data: ` prefixes, parsed in one map, checked in one serialisation. None: not
        that case (_capture_lines decides)."""
        if not raw.startswith(b"data: ") or b"\r" in raw:
            return None
        # Each event's payload, if every event is one line (checked below, once they are joined).
        payloads = raw.split(b"\n\ndata: ")
        payloads[0] = payloads[0][6:]
        last = payloads.pop().split(b"\n\n")
        if len(last) == 2:
            payloads.append(last[0])
            remainder = last[1]
        elif len(last) == 1 and payloads:  # the last event is not ended: the tail
            remainder = b"data: " + last[0]
        else:  # other events follow the last `data:` one
            return None
        # The events after the last chunk (usually `[DONE]`): not JSON objects or arrays.
        count = len(payloads)
        while count and not isinstance(_loads_or_none(payloads[count - 1]), (dict, list)):
            count -= 1
        trailing = payloads[count:]
        if count < len(payloads):
            del payloads[count:]
        try:
            values = list(map(orjson.loads, payloads))
        except orjson.JSONDecodeError:
            return None
        if not _CHUNK_TYPES.issuperset(map(type, values)):
            return None
        joined = b",".join(payloads)
        if b"\n" in joined or any(b"\n" in payload for payload in trailing):
            return None  # an event of more than one line
        if isinstance(labeler, ConstantLabel):
            label = labeler.label
            body = [{TYPE_KEY: label, DATA_KEY: value} for value in values]
        else:
            body = [{TYPE_KEY: labeler(value), DATA_KEY: value} for value in values]
        chunk_ends: list[int] = []
        offset = 0
        for payload in payloads:
            offset += len(payload) + 8  # `data: ` and the blank line
            chunk_ends.append(offset)
        end = "".join(["data: " + payload.decode("utf-8") + "\n\n" for payload in trailing])
        end += remainder.decode("utf-8")
        try:
            compact: bytes | None = orjson.dumps(values)
        except (TypeError, orjson.JSONEncodeError):  # e.g. integers orjson cannot write back
            compact = None
        framed: list[tuple[int, Any, str, str]] = []
        # Every payload is one object or array, so equal texts joined mean equal texts one by one.
        if compact is None or len(compact) != len(joined) + 2 or not compact.startswith(joined, 1):
            for index, (value, payload) in enumerate(zip(values, payloads, strict=True)):
                text = payload.decode("utf-8")
                framed.append((index, value, text, f"data: {text}\n\n"))
        captured = self._finish(body, chunk_ends, {}, {}, framed, "\n" if body else None, None, end)
        captured.exact = "verbatim" not in captured.framing and "json_style" not in captured.framing
        captured.values = values
        captured.compact = compact
        return captured

    def _capture_lines(self, raw: bytes, labeler: Labeler) -> CapturedBody | None:
        """The plain capture, event by event (non-JSON events between chunks, a last event
        without its blank line). None: not every event is one `data:` line."""
        if b"\r" in raw:
            return None
        parts = raw.split(b"\n\n")
        remainder = parts.pop()
        body: list[dict[str, Any]] = []
        chunk_ends: list[int] = []
        inserts: dict[str, str] = {}
        # The chunks' (index, value, payload): the payload stays bytes (orjson checked it is
        # UTF-8) and is decoded only if the spelling check below needs its text.
        chunks: list[tuple[int, Any, bytes]] = []
        pending = ""
        offset = 0
        for part in parts:
            if not part.startswith(b"data: ") or b"\n" in part:
                return None
            offset += len(part) + 2
            payload = part[6:]
            try:
                value = orjson.loads(payload)
            except orjson.JSONDecodeError:
                value = None
            if not isinstance(value, (dict, list)):
                pending += part.decode("utf-8") + "\n\n"
                continue
            index = len(body)
            if pending:
                inserts[str(index)] = pending
                pending = ""
            chunks.append((index, value, payload))
            body.append({TYPE_KEY: labeler(value), DATA_KEY: value})
            chunk_ends.append(offset)
        end = pending + remainder.decode("utf-8")
        framed: list[tuple[int, Any, str, str]] = []
        if not _all_compact_bytes(chunks):
            for index, value, payload in chunks:
                text = payload.decode("utf-8")
                framed.append((index, value, text, f"data: {text}\n\n"))
        captured = self._finish(body, chunk_ends, inserts, {}, framed, "\n" if body else None, None, end)
        # Every event rendered is `data: ` + orjson's text of its value + "\n\n", which is its text
        # when no event needed another style or its verbatim text; the rest is kept as received.
        captured.exact = "verbatim" not in captured.framing and "json_style" not in captured.framing
        return captured

    def frame(self, payload: str, event: str | None, line_ending: str) -> str:
        return frame_sse(payload, event=event, line_ending=line_ending)

    def event_field_of(self, event: str | None, value: Any) -> str | None:
        if event is None or not isinstance(value, dict):
            return None
        for candidate in ("type", "event_type", "event"):
            if value.get(candidate) == event:
                return candidate
        return None

    def extra_framing(self, framing: dict[str, Any], event_field: str | None) -> None:
        framing["event_field"] = event_field


_CHUNK_TYPES = frozenset({dict, list})  # orjson makes no subclasses


def _loads_or_none(payload: bytes) -> Any:
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None


def _all_compact_bytes(chunks: list[tuple[int, Any, bytes]]) -> bool:
    """textstream._all_compact on payloads still in bytes: whether orjson spells every payload
    exactly as received, with one serialisation of them all."""
    if not chunks:
        return True
    joined = b"[" + b",".join([payload for _, _, payload in chunks]) + b"]"
    try:
        return orjson.dumps([value for _, value, _ in chunks]) == joined
    except (TypeError, orjson.JSONEncodeError):  # e.g. integers orjson cannot write back
        return False


SSE = SseCodec()
