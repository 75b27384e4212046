"""What every provider module supplies: its paths, stream formats, type labels and error shape.

A provider owns one wire format. The rest of llmproxy asks it questions and never looks at
provider-specific fields itself, so adding a provider touches only its own module and the
registry in `llmproxy.providers`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import orjson
from yarl import URL

from llmproxy.wire.framing import Format, data_of
from llmproxy.wire.registry import default_content_type

JSON_LABEL = "json"

SSE_CONTENT_TYPE = default_content_type(Format.SSE)
NDJSON_CONTENT_TYPE = default_content_type(Format.NDJSON)
JSON_CONTENT_TYPE = default_content_type(Format.JSON)


class UpstreamRequestError(LookupError):
    """A provider cannot prepare a request for its upstream (e.g. no credentials to sign it):
    the client gets a 502 with this message, and nothing is sent."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


class Provider:
    """Defaults shared by the providers; each subclass overrides what its format does differently."""

    name: ClassVar[str] = "generic"
    # Upstream used when the config names the provider but no upstream.
    default_upstream: ClassVar[str | None] = None
    # Tried before lower numbers when several providers claim a path (OpenAI is the catch-all).
    claim_priority: ClassVar[int] = 0
    # Content types for recordings made by other tools, which do not store headers.
    stream_content_type: ClassVar[str] = SSE_CONTENT_TYPE
    # Labels that tell which real request a foreign recording answered: label -> (method, path).
    legacy_requests: ClassVar[Mapping[str, tuple[str, str]]] = {}

    def claims(self, method: str, path: str, headers: Mapping[str, str]) -> bool:
        """Whether a request with this path belongs to this provider's default route."""
        return False

    def stream_format(self, path: str, body: Any) -> str | None:
        """The stream format a request asks for ("sse", "ndjson"), or None for a plain response."""
        if isinstance(body, dict) and body.get("stream") is True:
            return Format.SSE.value
        return None

    def model_of(self, path: str, body: Any) -> str | None:
        if isinstance(body, dict) and isinstance(body.get("model"), str):
            return body["model"]
        return None

    def label(self, path: str, streaming: bool, value: Any) -> str:
        """The `__type__` label for one chunk or body: the SDK type name a reader expects."""
        return JSON_LABEL

    def pack_json(self, path: str, value: Any) -> Any | None:
        """An alternative body layout for a JSON response (e.g. a model list as Model items)."""
        return None

    def json_value(self, body: Any) -> Any:
        """The wire JSON value for a stored non-streamed body (inverse of label/pack_json)."""
        return data_of(body)

    def default_framing(self, path: str, streaming: bool) -> dict[str, Any]:
        """Framing for recordings that carry none (the seed and other recorders' files)."""
        if streaming:
            return {"format": Format.SSE.value, "line_ending": "\n", "event_field": None, "end": ""}
        return {"format": Format.JSON.value}

    def stream_complete(self, path: str, chunks: list[Any], end: str) -> bool:
        """Whether a stream reached its end marker; a stream cut short must not be replayed
        as if it were whole. `chunks` are the JSON values, `end` the text after the last one."""
        return not end.strip()

    def error_body(self, status: int, message: str, code: str) -> bytes:
        """A JSON error body in this provider's shape, for errors llmproxy itself returns."""
        return orjson.dumps({"error": {"message": message, "type": code, "code": code}})

    def prepare_upstream(
        self, method: str, url: str, headers: list[tuple[str, str]], body: bytes
    ) -> tuple[str | URL, list[tuple[str, str]]]:
        """The URL and headers to send upstream, once per forwarded request (e.g. re-signing it
        for the upstream's host). Raises UpstreamRequestError when it cannot be sent."""
        return url, headers
