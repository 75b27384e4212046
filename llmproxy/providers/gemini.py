"""Google Gemini (generativelanguage): CRLF-framed SSE with `alt=sse`, no end marker."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import orjson

from llmproxy.providers.base import JSON_LABEL, ClientSetting, Provider, text_of
from llmproxy.usage import TokenUsage, gemini_usage

_MODEL_METHOD = re.compile(r"^/v1[a-z0-9]*/(?:tunedModels|models)/([^/:]+):([A-Za-z]+)$")
_VERSIONED = re.compile(r"^/v1(?:alpha|beta)[0-9]*(?:/|$)")

GENERATE = "google.genai.types.GenerateContentResponse"
EMBED = "google.genai.types.BatchEmbedContentsResponse"
COUNT = "google.genai.types.CountTokensResponse"


class GeminiProvider(Provider):
    name = "gemini"
    default_upstream = "https://generativelanguage.googleapis.com"
    claim_priority = 15
    # @ai-sdk/google's base URL ends in /v1beta, google-genai's does not: "/models/m:x" is v1beta.
    api_roots = ("/v1beta", "/v1", "/v1alpha", "/upload")
    # OAuth (Bearer) works too; `?key=` is how REST examples and older clients send the key.
    credential_headers = frozenset({"x-goog-api-key", "authorization"})
    credential_query = frozenset({"key", "x-goog-api-key"})
    client_settings = (ClientSetting("GOOGLE_GEMINI_BASE_URL"),)
    placeholder_keys = {
        "GEMINI_API_KEY": "llmproxy-replay-placeholder",
        "GOOGLE_API_KEY": "llmproxy-replay-placeholder",
    }

    def claims(self, method: str, path: str, headers: Mapping[str, str]) -> bool:
        return bool(_MODEL_METHOD.match(path) or _VERSIONED.match(path))

    def stream_format(self, path: str, body: Any) -> str | None:
        if path.endswith(":streamGenerateContent"):
            return "sse"
        return super().stream_format(path, body)

    def model_of(self, path: str, body: Any) -> str | None:
        match = _MODEL_METHOD.match(path)
        return match.group(1) if match else super().model_of(path, body)

    def response_model(self, values: list[Any]) -> str | None:
        first = values[0] if values else None
        if isinstance(first, dict) and isinstance(first.get("modelVersion"), str):
            return first["modelVersion"]
        return super().response_model(values)

    def request_turns(self, body: Any) -> list[tuple[str, str]]:
        turns = super().request_turns(body)
        if not isinstance(body, dict):
            return turns
        instruction = body.get("systemInstruction") or body.get("system_instruction")
        if isinstance(instruction, dict):
            turns.insert(0, ("system", text_of(instruction.get("parts"))))
        for content in body.get("contents") or []:
            if isinstance(content, dict):
                turns.append((str(content.get("role", "user")), text_of(content.get("parts"))))
        return turns

    def response_text(self, values: list[Any]) -> str:
        pieces: list[str] = []
        for value in values:
            for candidate in (value.get("candidates") if isinstance(value, dict) else None) or []:
                if isinstance(candidate, dict):
                    pieces.append(text_of((candidate.get("content") or {}).get("parts")))
        return "".join(pieces)

    def label(self, path: str, streaming: bool, value: Any) -> str:
        match = _MODEL_METHOD.match(path)
        method = match.group(2) if match else ""
        if method in ("generateContent", "streamGenerateContent"):
            return GENERATE
        if method in ("batchEmbedContents", "embedContent"):
            return EMBED
        if method == "countTokens":
            return COUNT
        return JSON_LABEL

    def default_framing(self, path: str, streaming: bool) -> dict[str, Any]:
        if not streaming:
            return {"format": "json"}
        if path.endswith(":streamGenerateContent"):
            return {"format": "sse", "line_ending": "\r\n", "event_field": None, "end": ""}
        return {"format": "sse", "line_ending": "\n", "event_field": None, "end": ""}

    def stream_complete(self, path: str, chunks: list[Any], end: str) -> bool:
        if not path.endswith(":streamGenerateContent"):
            return super().stream_complete(path, chunks, end)
        last = chunks[-1] if chunks else {}
        candidates = last.get("candidates") if isinstance(last, dict) else None
        finished = bool(candidates) and all(isinstance(c, dict) and c.get("finishReason") for c in candidates)
        return finished or (isinstance(last, dict) and ("error" in last or "promptFeedback" in last))

    def error_body(self, status: int, message: str, code: str) -> bytes:
        status_name = {404: "NOT_FOUND", 400: "INVALID_ARGUMENT", 413: "INVALID_ARGUMENT"}.get(status, "UNAVAILABLE")
        return orjson.dumps({"error": {"code": status, "message": message, "status": status_name}})

    def usage(self, path: str, values: list[Any]) -> TokenUsage | None:
        return gemini_usage(values)
