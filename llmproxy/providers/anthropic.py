"""Anthropic Messages: named SSE events (mandatory for the SDKs), pings and mid-stream errors."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from llmproxy.providers.base import JSON_LABEL, ClientSetting, Provider, text_of
from llmproxy.usage import TokenUsage, anthropic_usage

MESSAGE = "anthropic.types.message.Message"
STREAM_EVENT = "anthropic.types.raw_message_stream_event.RawMessageStreamEvent"
TOKEN_COUNT = "anthropic.types.message_tokens_count.MessageTokensCount"
MODEL = "anthropic.types.model_info.ModelInfo"
ERROR = "anthropic.types.error_response.ErrorResponse"

# The API's resources (first segment after /v1): its own, and those OpenAI has too.
OWN_RESOURCES = frozenset({"messages", "complete", "skills", "organizations"})
SHARED_RESOURCES = frozenset({"models", "files"})


class AnthropicProvider(Provider):
    name = "anthropic"
    default_upstream = "https://api.anthropic.com"
    claim_priority = 20
    claim_headers = frozenset({"anthropic-version"})
    api_roots = ("/v1",)
    credential_headers = frozenset({"x-api-key"})
    identity_headers = frozenset({"anthropic-version", "anthropic-beta"})
    client_settings = (ClientSetting("ANTHROPIC_BASE_URL"),)
    placeholder_keys = {"ANTHROPIC_API_KEY": "sk-ant-llmproxy-replay-placeholder"}

    def claims(self, method: str, path: str, headers: Mapping[str, str]) -> bool:
        parts = path.split("/", 3)
        if len(parts) < 3 or parts[0] != "" or parts[1] != "v1":
            return False
        # /v1/models and /v1/files are OpenAI's too: the anthropic-version header tells them apart.
        return parts[2] in OWN_RESOURCES or (parts[2] in SHARED_RESOURCES and "anthropic-version" in headers)

    def accepts_header(self, name: str, headers: Mapping[str, str]) -> bool:
        # anthropic 2.x sends its API key as a Bearer token (and auth_token/OAuth always did),
        # always with anthropic-version, which no OpenAI-style client sends. A bare Bearer token
        # (an OpenAI-style client's key) is refused.
        if name == "authorization":
            return "anthropic-version" in headers
        return super().accepts_header(name, headers)

    def response_model(self, values: list[Any]) -> str | None:
        first = values[0] if values else None
        if isinstance(first, dict) and isinstance(first.get("message"), dict):  # message_start
            model = first["message"].get("model")
            return model if isinstance(model, str) else None
        return super().response_model(values)

    def response_text(self, values: list[Any]) -> str:
        pieces: list[str] = []
        for value in values:
            if not isinstance(value, dict):
                continue
            if value.get("type") == "content_block_delta":  # stream
                delta = value.get("delta")
                pieces.append((delta.get("text") if isinstance(delta, dict) else None) or "")
            if value.get("type") == "message":
                pieces.append(text_of(value.get("content")))
        return "".join(pieces)

    def label(self, path: str, streaming: bool, value: Any) -> str:
        if isinstance(value, dict) and value.get("type") == "error":
            return ERROR
        if path.endswith("/count_tokens"):
            return TOKEN_COUNT
        if path.startswith("/v1/messages"):
            return STREAM_EVENT if streaming else MESSAGE
        if path.startswith("/v1/models"):
            return MODEL
        return JSON_LABEL

    def default_framing(self, path: str, streaming: bool) -> dict[str, Any]:
        if streaming:
            return {"format": "sse", "line_ending": "\n", "event_field": "type", "end": ""}
        return {"format": "json"}

    def stream_complete(self, path: str, chunks: list[Any], end: str) -> bool:
        last = chunks[-1] if chunks else {}
        return isinstance(last, dict) and last.get("type") in ("message_stop", "error")

    def error_body(self, status: int, message: str, code: str) -> bytes:
        kind = _ERROR_TYPES.get(status, "api_error")
        return orjson.dumps({"type": "error", "error": {"type": kind, "message": message}})

    def usage(self, path: str, values: list[Any]) -> TokenUsage | None:
        if path.endswith("/count_tokens"):
            return None  # counting tokens generates none and costs nothing
        return anthropic_usage(values)


# Anthropic's error types by status (its API reference, "Errors").
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}
