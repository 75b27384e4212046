"""Ollama's native API: NDJSON streams (no blank lines), streaming unless told otherwise."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from llmproxy.providers.base import JSON_LABEL, NDJSON_CONTENT_TYPE, ClientSetting, Provider
from llmproxy.usage import TokenUsage, ollama_usage

STREAMING_PATHS = ("/api/chat", "/api/generate", "/api/pull", "/api/push", "/api/create")
LABELS = {
    "/api/chat": "ollama._types.ChatResponse",
    "/api/generate": "ollama._types.GenerateResponse",
    "/api/embed": "ollama._types.EmbedResponse",
    "/api/embeddings": "ollama._types.EmbeddingsResponse",
    "/api/tags": "ollama._types.ListResponse",
    "/api/ps": "ollama._types.ProcessResponse",
    "/api/show": "ollama._types.ShowResponse",
    "/api/pull": "ollama._types.ProgressResponse",
    "/api/push": "ollama._types.ProgressResponse",
    "/api/create": "ollama._types.ProgressResponse",
}


class OllamaProvider(Provider):
    name = "ollama"
    default_upstream = "http://127.0.0.1:11434"
    claim_priority = 10
    stream_content_type = NDJSON_CONTENT_TYPE
    # /v1 is Ollama's OpenAI-compatible API: under /ollama it stays as it is.
    api_roots = ("/api", "/v1")
    # ollama.com and authenticating reverse proxies take a Bearer token (OLLAMA_API_KEY).
    credential_headers = frozenset({"authorization"})
    client_settings = (ClientSetting("OLLAMA_HOST"),)
    legacy_requests = {
        "ollama._types.ChatResponse": ("POST", "/api/chat"),
        "ollama._types.GenerateResponse": ("POST", "/api/generate"),
        # The SDK's embed() calls /api/embed; another recorder filed it under /api/embeddings.
        "ollama._types.EmbedResponse": ("POST", "/api/embed"),
        "ollama._types.EmbeddingsResponse": ("POST", "/api/embeddings"),
        "ollama._types.ListResponse": ("GET", "/api/tags"),
        "ollama._types.ProcessResponse": ("GET", "/api/ps"),
        "ollama._types.ShowResponse": ("POST", "/api/show"),
        "ollama._types.ProgressResponse": ("POST", "/api/pull"),
    }

    def claims(self, method: str, path: str, headers: Mapping[str, str]) -> bool:
        return path.startswith("/api/")

    def stream_format(self, path: str, body: Any) -> str | None:
        # Ollama streams when "stream" is absent.
        if path in STREAMING_PATHS and not (isinstance(body, dict) and body.get("stream") is False):
            return "ndjson"
        return None

    def label(self, path: str, streaming: bool, value: Any) -> str:
        return LABELS.get(path, JSON_LABEL)

    def response_text(self, values: list[Any]) -> str:
        pieces = [super().response_text(values)]  # the OpenAI-compatible /v1 API
        for value in values:
            if isinstance(value, dict) and isinstance(value.get("message"), dict):  # chat
                content = value["message"].get("content")
                pieces.append(content if isinstance(content, str) else "")
            if isinstance(value, dict) and isinstance(value.get("response"), str):  # generate
                pieces.append(value["response"])
        return "".join(pieces)

    def default_framing(self, path: str, streaming: bool) -> dict[str, Any]:
        if streaming:
            return {"format": "ndjson", "line_ending": "\n", "end": ""}
        return {"format": "json"}

    def stream_complete(self, path: str, chunks: list[Any], end: str) -> bool:
        last = chunks[-1] if chunks else {}
        if not isinstance(last, dict):
            return False
        return last.get("done") is True or "error" in last or last.get("status") == "success"

    def error_body(self, status: int, message: str, code: str) -> bytes:
        return orjson.dumps({"error": message})

    def usage(self, path: str, values: list[Any]) -> TokenUsage | None:
        return ollama_usage(values)
