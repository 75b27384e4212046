"""Cohere v2 (chat, embed, rerank): SSE with an `event:` line repeating each event's `type`.

The SDK reads the event kind from the JSON `type` and ignores `event:` lines, but it raises
unless the stream's Content-Type is text/event-stream, so the recorded type is replayed as is.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from llmproxy.providers.base import JSON_LABEL, ClientSetting, Provider, text_of

CHAT = "cohere.v2.types.v2chat_response.V2ChatResponse"
CHAT_STREAM_EVENT = "cohere.v2.types.v2chat_stream_response.V2ChatStreamResponse"
EMBED = "cohere.types.embed_by_type_response.EmbedByTypeResponse"
RERANK = "cohere.v2.types.v2rerank_response.V2RerankResponse"
LABELS = {"/v2/chat": CHAT, "/v2/embed": EMBED, "/v2/rerank": RERANK}

# The last event of a whole chat stream (the API may add `data: [DONE]` after it).
FINAL_EVENT = "message-end"


class CohereProvider(Provider):
    name = "cohere"
    default_upstream = "https://api.cohere.com"
    claim_priority = 20
    api_roots = ("/v2", "/v1")
    credential_headers = frozenset({"authorization"})
    # The SDK appends /v2/chat to its base URL (a path prefix is kept); read once, at first import.
    client_settings = (ClientSetting("CO_API_URL"),)
    placeholder_keys = {"CO_API_KEY": "llmproxy-replay-placeholder"}

    def claims(self, method: str, path: str, headers: Mapping[str, str]) -> bool:
        # The v2 endpoints, which no other provider has (v1's /v1/models would shadow OpenAI's).
        return path in LABELS

    def response_text(self, values: list[Any]) -> str:
        pieces: list[str] = []
        for value in values:
            if not isinstance(value, dict):
                continue
            message = value.get("message")
            if isinstance(message, dict):  # a whole chat response
                pieces.append(text_of(message.get("content")))
            if value.get("type") == "content-delta":  # stream
                content = ((value.get("delta") or {}).get("message") or {}).get("content")
                pieces.append(text_of(content) if isinstance(content, dict) else "")
        return "".join(pieces)

    def label(self, path: str, streaming: bool, value: Any) -> str:
        if not streaming and isinstance(value, dict) and isinstance(value.get("message"), str):
            return JSON_LABEL  # an error ({"message": "..."}); a chat response's message is an object
        if path == "/v2/chat":
            return CHAT_STREAM_EVENT if streaming else CHAT
        return LABELS.get(path, JSON_LABEL)

    def default_framing(self, path: str, streaming: bool) -> dict[str, Any]:
        framing = super().default_framing(path, streaming)
        # The usual SSE (or JSON) shape, with each event's `type` repeated on its `event:` line.
        return {**framing, "event_field": "type"} if streaming else framing

    def stream_complete(self, path: str, chunks: list[Any], end: str) -> bool:
        last = chunks[-1] if chunks else {}
        return "[DONE]" in end or (isinstance(last, dict) and last.get("type") == FINAL_EVENT)

    def error_body(self, status: int, message: str, code: str) -> bytes:
        # Cohere's errors are {"message": ...} (the SDK wraps the parsed body in ApiError).
        return orjson.dumps({"message": message})
