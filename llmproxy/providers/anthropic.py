"""Anthropic Messages: named SSE events (mandatory for the SDKs), pings and mid-stream errors."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from llmproxy.providers.base import JSON_LABEL, Provider
from llmproxy.usage import TokenUsage, anthropic_usage

MESSAGE = "anthropic.types.message.Message"
STREAM_EVENT = "anthropic.types.raw_message_stream_event.RawMessageStreamEvent"
TOKEN_COUNT = "anthropic.types.message_tokens_count.MessageTokensCount"
MODEL = "anthropic.types.model_info.ModelInfo"
ERROR = "anthropic.types.error_response.ErrorResponse"


class AnthropicProvider(Provider):
    name = "anthropic"
    default_upstream = "https://api.anthropic.com"
    claim_priority = 20

    def claims(self, method: str, path: str, headers: Mapping[str, str]) -> bool:
        if path == "/v1/messages" or path.startswith("/v1/messages/"):
            return True
        # GET /v1/models is OpenAI's too; the anthropic-version header tells them apart.
        return path.startswith("/v1/models") and "anthropic-version" in headers

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
        kind = "not_found_error" if status == 404 else "api_error"
        if status == 400:
            kind = "invalid_request_error"
        return orjson.dumps({"type": "error", "error": {"type": kind, "message": message}})

    def usage(self, path: str, values: list[Any]) -> TokenUsage | None:
        if path.endswith("/count_tokens"):
            return None  # counting tokens generates none and costs nothing
        return anthropic_usage(values)
