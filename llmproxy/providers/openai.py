"""OpenAI: chat and legacy completions, embeddings, models, and the Responses API."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from llmproxy.providers.base import JSON_LABEL, Provider
from llmproxy.usage import TokenUsage, openai_usage
from llmproxy.wire.framing import data_of, typed

CHAT_COMPLETION = "openai.types.chat.chat_completion.ChatCompletion"
CHAT_COMPLETION_CHUNK = "openai.types.chat.chat_completion_chunk.ChatCompletionChunk"
COMPLETION = "openai.types.completion.Completion"
EMBEDDINGS = "openai.types.create_embedding_response.CreateEmbeddingResponse"
MODEL = "openai.types.model.Model"
RESPONSE = "openai.types.responses.response.Response"
RESPONSE_STREAM_EVENT = "openai.types.responses.response_stream_event.ResponseStreamEvent"
ERROR = "openai.types.error"


RESPONSES_FINAL_EVENTS = ("response.completed", "response.failed", "response.incomplete", "error")


def _ends_in_error(chunks: list[Any]) -> bool:
    # A mid-stream error event is how the API ends a failed stream: complete, as sent.
    return bool(chunks) and isinstance(chunks[-1], dict) and "error" in chunks[-1]


class OpenAIProvider(Provider):
    name = "openai"
    default_upstream = "https://api.openai.com"
    claim_priority = -100  # the catch-all for every path no other provider claims
    legacy_requests = {
        CHAT_COMPLETION: ("POST", "/v1/chat/completions"),
        CHAT_COMPLETION_CHUNK: ("POST", "/v1/chat/completions"),
        COMPLETION: ("POST", "/v1/completions"),
        EMBEDDINGS: ("POST", "/v1/embeddings"),
        MODEL: ("GET", "/v1/models"),
        RESPONSE: ("POST", "/v1/responses"),
        RESPONSE_STREAM_EVENT: ("POST", "/v1/responses"),
    }

    def claims(self, method: str, path: str, headers: Mapping[str, str]) -> bool:
        return True

    def label(self, path: str, streaming: bool, value: Any) -> str:
        if isinstance(value, dict) and "error" in value and not streaming:
            return ERROR
        if path.endswith("/chat/completions"):
            return CHAT_COMPLETION_CHUNK if streaming else CHAT_COMPLETION
        if path.endswith("/completions"):
            return COMPLETION
        if path.endswith("/embeddings"):
            return EMBEDDINGS
        if path.endswith("/responses"):
            return RESPONSE_STREAM_EVENT if streaming else RESPONSE
        if "/models" in path:
            return MODEL
        return JSON_LABEL

    def pack_json(self, path: str, value: Any) -> Any | None:
        # The format stores a model list as its Model items (as the SDK returns them).
        if path.endswith("/models") and isinstance(value, dict) and set(value) == {"object", "data"}:
            if value["object"] == "list" and isinstance(value["data"], list):
                return [typed(MODEL, model) for model in value["data"]]
        return None

    def json_value(self, body: Any) -> Any:
        if isinstance(body, list):
            return {"object": "list", "data": [data_of(item) for item in body]}
        return data_of(body)

    def default_framing(self, path: str, streaming: bool) -> dict[str, Any]:
        if not streaming:
            return {"format": "json"}
        if path.endswith("/responses"):
            return {"format": "sse", "line_ending": "\n", "event_field": "type", "end": ""}
        return {"format": "sse", "line_ending": "\n", "event_field": None, "end": "data: [DONE]\n\n"}

    def stream_complete(self, path: str, chunks: list[Any], end: str) -> bool:
        if path.endswith("/responses"):
            last = chunks[-1] if chunks else {}
            return isinstance(last, dict) and last.get("type") in RESPONSES_FINAL_EVENTS
        return "[DONE]" in end or _ends_in_error(chunks)

    def error_body(self, status: int, message: str, code: str) -> bytes:
        return orjson.dumps(
            {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
        )

    def usage(self, path: str, values: list[Any]) -> TokenUsage | None:
        return openai_usage(values)


class AzureOpenAIProvider(OpenAIProvider):
    """Azure OpenAI speaks OpenAI's format under /openai/deployments/{dep}/... and /openai/v1/..."""

    name = "azure"
    default_upstream = None  # every Azure resource has its own endpoint: the config must name it
    claim_priority = 10

    def claims(self, method: str, path: str, headers: Mapping[str, str]) -> bool:
        return path == "/openai" or path.startswith("/openai/")

    def model_of(self, path: str, body: Any) -> str | None:
        parts = path.split("/")
        if len(parts) > 3 and parts[2] == "deployments":
            return parts[3]
        return super().model_of(path, body)
