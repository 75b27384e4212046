"""What every stream codec shares: the recording's chunk shape and the capture result.

A captured body keeps the readable part (each JSON chunk as `{"__type__", "__data__"}`) in
`body`, and everything needed to give back the exact bytes in `framing`:

    format       which codec wrote it (`Format`); the registry finds the codec by it
    json_style   how the upstream wrote its JSON (`llmproxy.wire.json.JsonStyle`); absent: orjson's way
    line_ending  "\\n" or "\\r\\n", as the upstream sent it (SSE, NDJSON)
    event_field  for SSE: the JSON field whose value is repeated on an `event:` line (or null)
    end          what came after the last chunk (e.g. "data: [DONE]\\n\\n"; base64 for binary formats)
    inserts      {"i": text} non-chunk events (comments, pings without JSON, blank NDJSON lines)
                 that stood before chunk i
    verbatim     {"i": text} chunk i's exact text, where rendering it would differ (framing, JSON
                 spelling, or digits orjson cannot keep); for a JSON body, {"0": text} is the body
    raw          {"i": base64} event-stream frames that re-encoding would not reproduce

Rendering re-serialises each chunk's JSON in the recording's style and copies every other byte.
No module here knows a format by name: `llmproxy.wire.registry` maps names and media types to codecs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

TYPE_KEY = "__type__"
DATA_KEY = "__data__"
TEXT_LABEL = "llmproxy.text"
BYTES_LABEL = "llmproxy.bytes"

Labeler = Callable[[Any], str]
# Turns a stored non-streamed body back into its wire JSON value (a provider may pack bodies).
JsonValue = Callable[[Any], Any]


class Format(StrEnum):
    """`framing.format` of a recording: one per codec (the opaque codec writes two)."""

    SSE = "sse"
    NDJSON = "ndjson"
    JSON = "json"
    EVENTSTREAM = "eventstream"
    TEXT = "text"
    BINARY = "binary"


@dataclass(slots=True)
class CapturedBody:
    body: Any
    framing: dict[str, Any]
    # Byte offset (in the raw body) at which each chunk of `body` was complete; used to give
    # every chunk the arrival time of the network read that finished it.
    chunk_ends: list[int] = field(default_factory=list)
    streaming: bool = False
    # The capture itself proved that rendering gives back the received bytes (no need to render
    # it again to check): set only where the rendering is the received text by construction.
    exact: bool = False
    # What a capture had at hand anyway, so the recorder need not work it out again: the JSON
    # values of a stream's chunks, in order, and orjson's compact text of the value(s) (the list
    # of chunk values for a stream, the value for a body), set only where `body` is
    # typed(label, value) for each of them (the secret scan reads the rest around it).
    values: list[Any] | None = None
    compact: bytes | None = None

    @property
    def is_streaming(self) -> bool:
        return self.streaming


class ConstantLabel:
    """A labeler whose label does not depend on the value (a provider's `constant_label`): the
    codecs give it to every chunk without a call per chunk."""

    __slots__ = ("label",)

    def __init__(self, label: str) -> None:
        self.label = label

    def __call__(self, value: Any) -> str:
        return self.label


class Splitter(Protocol):
    """Incremental splitter: feed network reads, get complete events (exact bytes) back.

    Read boundaries never change the result; joining every event and `close()` gives the input."""

    def feed(self, data: bytes) -> list[bytes]: ...

    def close(self) -> bytes: ...


class WholeBody:
    """The splitter of a non-streamed body: nothing is complete before the end."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def feed(self, data: bytes) -> list[bytes]:
        self._parts.append(data)
        return []

    def close(self) -> bytes:
        rest, self._parts = b"".join(self._parts), []
        return rest


class Codec(Protocol):
    """One wire format: how to split, capture and render it."""

    name: str
    # Framing formats this codec writes and renders, each with its default content type.
    content_types: dict[Format, str]
    media_types: tuple[str, ...]
    # Passed through read by read as it arrives (never buffered) when true.
    streaming: bool

    def splitter(self) -> Splitter: ...

    def default_framing(self) -> dict[str, Any]:
        """Framing for recordings that carry none (other recorders' files): the usual shape."""
        ...

    def capture(self, raw: bytes, labeler: Labeler) -> CapturedBody: ...

    def render(self, body: Any, framing: dict[str, Any], json_value: JsonValue) -> list[bytes]: ...


def typed(label: str, data: Any) -> dict[str, Any]:
    return {TYPE_KEY: label, DATA_KEY: data}


def data_of(item: Any) -> Any:
    if isinstance(item, dict) and TYPE_KEY in item:
        return item.get(DATA_KEY)
    return item
