"""The codec registry: which codec frames a body, by media type or by recorded format.

Everything outside `llmproxy.wire` asks here instead of knowing format names: the forwarder
(is this response passed through read by read?), the recorder (capture), replay (render, and
the content type of a recording that kept none). A new wire format is one module plus one line
in `CODECS`.
"""

from __future__ import annotations

from typing import Any

from llmproxy.wire.eventstream import EVENTSTREAM
from llmproxy.wire.framing import CapturedBody, Codec, Format, JsonValue, Labeler, Splitter, data_of
from llmproxy.wire.json import JSON
from llmproxy.wire.ndjson import NDJSON
from llmproxy.wire.opaque import OPAQUE
from llmproxy.wire.sse import SSE

CODECS: tuple[Codec, ...] = (SSE, NDJSON, JSON, EVENTSTREAM, OPAQUE)

_BY_MEDIA_TYPE: dict[str, Codec] = {media: codec for codec in CODECS for media in codec.media_types}
_BY_NAME: dict[str, Codec] = {codec.name: codec for codec in CODECS}
_BY_FORMAT: dict[str, Codec] = {str(fmt): codec for codec in CODECS for fmt in codec.content_types}
STREAM_FORMATS: frozenset[str] = frozenset(fmt for fmt, codec in _BY_FORMAT.items() if codec.streaming)


def codec_for_content_type(content_type: str) -> Codec:
    """The codec for a response's Content-Type (parameters ignored; opaque when none claims it)."""
    media = content_type.split(";", 1)[0].strip().lower()
    codec = _BY_MEDIA_TYPE.get(media)
    if codec is None and media.endswith("+json"):
        return JSON
    return codec or OPAQUE


def codec_for_format(fmt: str) -> Codec:
    """The codec that wrote `framing.format`; ValueError for a format this version does not know."""
    try:
        return _BY_FORMAT[fmt]
    except KeyError:
        raise ValueError(f"unknown body format {fmt!r}") from None


def is_streaming_format(fmt: Any) -> bool:
    return fmt in STREAM_FORMATS


def default_content_type(fmt: str) -> str:
    """The content type replay sends for a recording that kept none (other recorders' files)."""
    codec = _BY_FORMAT.get(fmt)
    if codec is None:
        return JSON.content_types[Format.JSON]
    return codec.content_types[Format(fmt)]


def stream_splitter(fmt: str) -> Splitter:
    return codec_for_format(fmt).splitter()


def split_stream(fmt: str, data: bytes) -> tuple[list[bytes], bytes]:
    """Split a whole body into complete events and the unterminated remainder."""
    splitter = stream_splitter(fmt)
    events = splitter.feed(data)
    return events, splitter.close()


def codec_named(name: str) -> Codec:
    """A codec by its name ("sse", "ndjson", "json", "eventstream", "opaque") or recorded format."""
    return _BY_NAME.get(name) or codec_for_format(name)


def capture(name: str, raw: bytes, labeler: Labeler) -> CapturedBody:
    """Split a complete response body into typed chunks plus the framing that restores it."""
    return codec_named(name).capture(raw, labeler)


def render_segments(body: Any, framing: dict[str, Any], json_value: JsonValue | None = None) -> list[bytes]:
    """The response bytes as one segment per chunk plus a final segment (for paced replay).

    Raises ValueError when body and framing do not fit together; loaders call this once so a
    bad file is reported at load time, not on the first request.
    """
    fmt = framing.get("format", Format.JSON.value)
    return codec_for_format(str(fmt)).render(body, framing, json_value or data_of)
