"""Bodies of any other media type: kept whole, readable text as is, anything else as base64."""

from __future__ import annotations

import base64
from typing import Any

from llmproxy.wire.framing import (
    BYTES_LABEL,
    TEXT_LABEL,
    CapturedBody,
    Format,
    JsonValue,
    Labeler,
    Splitter,
    WholeBody,
    data_of,
    typed,
)


class OpaqueCodec:
    name = "opaque"
    content_types = {Format.TEXT: "text/plain; charset=utf-8", Format.BINARY: "application/octet-stream"}
    media_types: tuple[str, ...] = ()  # the fallback for every media type no other codec claims
    # An unknown media type is buffered: it may be a small body whose length the client needs.
    streaming = False

    def splitter(self) -> Splitter:
        return WholeBody()

    def default_framing(self) -> dict[str, Any]:
        return {"format": Format.TEXT.value}

    def capture(self, raw: bytes, labeler: Labeler | None = None) -> CapturedBody:
        try:
            return CapturedBody(typed(TEXT_LABEL, raw.decode("utf-8")), {"format": Format.TEXT.value})
        except UnicodeDecodeError:
            encoded = base64.b64encode(raw).decode("ascii")
            return CapturedBody(typed(BYTES_LABEL, encoded), {"format": Format.BINARY.value})

    def render(self, body: Any, framing: dict[str, Any], json_value: JsonValue = data_of) -> list[bytes]:
        data = data_of(body)
        if framing.get("format") == Format.BINARY:
            if not isinstance(data, str):
                raise ValueError("a binary body must be a base64 string")
            return [base64.b64decode(data, validate=True)]
        if not isinstance(data, str):
            raise ValueError("a text body must be a string")
        return [data.encode("utf-8")]


OPAQUE = OpaqueCodec()
