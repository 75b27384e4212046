"""Mistral's native API (api.mistral.ai): OpenAI-like `data:` SSE ending in `data: [DONE]`, usage
in the last chunk, and the mistralai SDK's own types.

Its chat path is OpenAI's (`/v1/chat/completions`), so a path alone cannot tell them apart: a
client reaches Mistral through the route's prefix (`server_url="http://proxy/mistral"`), through
a path only Mistral has, or (last resort) by the official SDK's user-agent.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from llmproxy.providers.base import JSON_LABEL, Provider

CHAT = "mistralai.client.models.chatcompletionresponse.ChatCompletionResponse"
FIM = "mistralai.client.models.fimcompletionresponse.FIMCompletionResponse"
CHUNK = "mistralai.client.models.completionchunk.CompletionChunk"
EMBEDDINGS = "mistralai.client.models.embeddingresponse.EmbeddingResponse"
MODELS = "mistralai.client.models.modellist.ModelList"
LABELS = {
    "/v1/chat/completions": CHAT,
    "/v1/fim/completions": FIM,
    "/v1/agents/completions": CHAT,
    "/v1/embeddings": EMBEDDINGS,
    "/v1/models": MODELS,
}
# Paths no other provider has.
MISTRAL_ONLY = ("/v1/fim/completions", "/v1/agents/completions", "/v1/chat/moderations", "/v1/ocr")
SDK_USER_AGENT = "mistral-client-"
DONE = "data: [DONE]\n\n"  # the stream's end marker, after the last chunk


class MistralProvider(Provider):
    name = "mistral"
    default_upstream = "https://api.mistral.ai"
    claim_priority = 5  # before OpenAI, after every provider with paths of its own
    claim_headers = frozenset({"user-agent"})
    api_roots = ("/v1",)
    credential_headers = frozenset({"authorization"})
    # The SDK has no base-URL variable: `Mistral(server_url="http://proxy/mistral")`.
    placeholder_keys = {"MISTRAL_API_KEY": "llmproxy-replay-placeholder"}

    def claims(self, method: str, path: str, headers: Mapping[str, str]) -> bool:
        if path in MISTRAL_ONLY:
            return True
        return path.startswith("/v1/") and headers.get("user-agent", "").startswith(SDK_USER_AGENT)

    def label(self, path: str, streaming: bool, value: Any) -> str:
        if streaming and path.endswith("/completions"):
            return CHUNK
        return LABELS.get(path, JSON_LABEL)

    def default_framing(self, path: str, streaming: bool) -> dict[str, Any]:
        framing = super().default_framing(path, streaming)
        return {**framing, "end": DONE} if streaming else framing

    def stream_complete(self, path: str, chunks: list[Any], end: str) -> bool:
        return DONE.strip() in end

    def error_body(self, status: int, message: str, code: str) -> bytes:
        return orjson.dumps({"object": "error", "message": message, "type": code, "param": None, "code": code})
