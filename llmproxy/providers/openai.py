"""OpenAI: chat and legacy completions, embeddings, models, and the Responses API."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from llmproxy.providers.base import JSON_LABEL, ClientSetting, Provider, text_of
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

# The API's resources (first segment after /v1): the unprefixed paths OpenAI claims. Anything
# else needs the /openai prefix (or a configured route), so no path is claimed by default.
RESOURCES = frozenset(
    {
        "chat",
        "completions",
        "embeddings",
        "models",
        "responses",
        "moderations",
        "images",
        "audio",
        "files",
        "uploads",
        "batches",
        "fine_tuning",
        "assistants",
        "threads",
        "vector_stores",
        "realtime",
        "conversations",
        "containers",
        "evals",
        "organization",
    }
)


def _ends_in_error(chunks: list[Any]) -> bool:
    # A mid-stream error event is how the API ends a failed stream: complete, as sent.
    return bool(chunks) and isinstance(chunks[-1], dict) and "error" in chunks[-1]


class OpenAIProvider(Provider):
    name = "openai"
    default_upstream = "https://api.openai.com"
    claim_priority = -100  # /v1/models is Anthropic's too when it carries anthropic-version
    api_roots = ("/v1",)
    # Bearer is the shared scheme of OpenAI-style APIs: the OpenAI, Azure, Ollama and Gemini
    # routes all take it; Anthropic's only in a request its own SDK made (see AnthropicProvider).
    credential_headers = frozenset({"authorization"})
    client_settings = (ClientSetting("OPENAI_BASE_URL", "/v1"),)
    placeholder_keys = {"OPENAI_API_KEY": "sk-llmproxy-replay-placeholder"}
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
        parts = path.split("/", 3)
        return len(parts) > 2 and parts[0] == "" and parts[1] == "v1" and parts[2] in RESOURCES

    def response_model(self, values: list[Any]) -> str | None:
        first = values[0] if values else None
        if isinstance(first, dict) and isinstance(first.get("response"), dict):  # Responses stream event
            model = first["response"].get("model")
            return model if isinstance(model, str) else None
        return super().response_model(values)

    def response_text(self, values: list[Any]) -> str:
        pieces = [super().response_text(values)]
        for value in values:
            if not isinstance(value, dict):
                continue
            if value.get("type") == "response.output_text.delta":  # Responses stream
                pieces.append(value.get("delta") or "")
            if value.get("object") == "response" and value.get("output"):
                pieces.append(text_of([item.get("content") for item in value["output"] if isinstance(item, dict)]))
        return "".join(pieces)

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

    def constant_label(self, path: str, streaming: bool) -> str | None:
        # Only an answer that is not streamed is told apart by its value (an error).
        if streaming and type(self).label is OpenAIProvider.label:
            return self.label(path, streaming, None)
        return None

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
    api_roots = ("/openai",)
    credential_headers = frozenset({"api-key", "authorization"})
    # AzureOpenAI(azure_endpoint=...) appends /openai/deployments/...: the endpoint is the prefix.
    client_settings = (ClientSetting("AZURE_OPENAI_ENDPOINT"),)
    placeholder_keys = {"AZURE_OPENAI_API_KEY": "llmproxy-replay-placeholder"}

    def claims(self, method: str, path: str, headers: Mapping[str, str]) -> bool:
        # Unprefixed, only the deployments paths are unmistakably Azure's: /openai/v1/... is the
        # OpenAI prefix, so Azure's v1 API goes through /azure/openai/v1/ (or a configured prefix).
        return path.startswith("/openai/deployments/")

    def model_of(self, path: str, body: Any) -> str | None:
        parts = path.split("/")
        if len(parts) > 3 and parts[2] == "deployments":
            return parts[3]
        return super().model_of(path, body)
