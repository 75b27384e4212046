"""Byte-level stream codecs: split SSE and NDJSON streams into exact event texts.

These functions never parse JSON and never lose a byte: joining the pieces they return gives
back the input. Everything above them (which events are chunks, how to frame them again)
lives in `llmproxy.wire.framing`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# An SSE event ends at an empty line. A lone "\r" only counts as a terminator when it is not
# the first half of "\r\n", otherwise "data: x\r\n" would look like two line ends.
_SSE_EVENT_END = re.compile(rb"(?:\r\n|\n|\r(?!\n))(?:\r\n|\n|\r(?!\n))")
_LINE_END = re.compile(r"\r\n|\n|\r")


class StreamSplitter:
    """Incremental splitter: feed network chunks, get complete events (raw bytes) back.

    Chunk boundaries never change the result: feeding a stream in any pieces yields the same
    events as feeding it whole.
    """

    def __init__(self, fmt: str) -> None:
        if fmt not in ("sse", "ndjson"):
            raise ValueError(f"unknown stream format {fmt!r}")
        self._fmt = fmt
        self._buffer = b""

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        if self._fmt == "sse":
            events, self._buffer = _split_sse(self._buffer, final=False)
        else:
            events, self._buffer = _split_ndjson(self._buffer)
        return events

    def close(self) -> bytes:
        """The bytes after the last complete event (a stream cut short, or no final blank line)."""
        if self._fmt == "sse":
            events, rest = _split_sse(self._buffer, final=True)
            self._buffer = b""
            return b"".join(events) + rest
        rest, self._buffer = self._buffer, b""
        return rest


def split_stream(fmt: str, data: bytes) -> tuple[list[bytes], bytes]:
    """Split a whole stream into complete events and the unterminated remainder."""
    splitter = StreamSplitter(fmt)
    events = splitter.feed(data)
    return events, splitter.close()


def _split_sse(buffer: bytes, *, final: bool) -> tuple[list[bytes], bytes]:
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


def _split_ndjson(buffer: bytes) -> tuple[list[bytes], bytes]:
    cut = buffer.rfind(b"\n") + 1
    if cut == 0:
        return [], buffer
    return buffer[:cut].splitlines(keepends=True), buffer[cut:]


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


def frame_ndjson(data: str, *, line_ending: str) -> str:
    return f"{data}{line_ending}"


def line_ending_of(text: str) -> str:
    match = _LINE_END.search(text)
    return match.group(0) if match else "\n"
