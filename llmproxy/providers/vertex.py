"""Vertex AI's Gemini paths: Gemini's wire format (CRLF-framed `alt=sse` streams, Google's error
shape) under `/{v1|v1beta1}/projects/{p}/locations/{l}/publishers/{pub}/models/{m}:{method}`.

Its own provider (not a Gemini rule) because it has its own upstream host: these paths sent to
generativelanguage.googleapis.com would be answered 404. Auth is a bearer OAuth token (or
`x-goog-api-key` in express mode): forwarded, never stored.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, ClassVar

from llmproxy.providers.base import JSON_LABEL, ClientSetting
from llmproxy.providers.gemini import COUNT, GENERATE, GeminiProvider

# Project-scoped publisher models, deployed endpoints, and express mode's bare publisher path.
_VERTEX_METHOD = re.compile(
    r"^/v1(?:beta1)?/(?:projects/[^/]+/locations/[^/]+/)?"
    r"(?:publishers/[^/]+/models|endpoints)/([^/:]+):([A-Za-z]+)$"
)


class VertexProvider(GeminiProvider):
    name = "vertex"
    # The global endpoint; a regional location needs its host ({location}-aiplatform...) configured.
    default_upstream = "https://aiplatform.googleapis.com"
    claim_priority = 16  # before Gemini, whose versioned-path rule also matches /v1beta1/...
    api_roots = ("/v1beta1", "/v1")  # the SDK's default version first
    # Gemini's credential headers (Bearer OAuth token, express mode's x-goog-api-key) are inherited.
    # google-genai with vertexai=True appends /{version}/projects/... to this (prefix kept).
    client_settings = (ClientSetting("GOOGLE_VERTEX_BASE_URL"),)
    # It authenticates with ADC or an OAuth token, which no placeholder can stand in for.
    placeholder_keys: ClassVar[Mapping[str, str]] = {}

    def claims(self, method: str, path: str, headers: Mapping[str, str]) -> bool:
        return bool(_VERTEX_METHOD.match(path))

    def model_of(self, path: str, body: Any) -> str | None:
        match = _VERTEX_METHOD.match(path)
        return match.group(1) if match else None

    def label(self, path: str, streaming: bool, value: Any) -> str:
        match = _VERTEX_METHOD.match(path)
        method = match.group(2) if match else ""
        if method in ("generateContent", "streamGenerateContent"):
            return GENERATE
        if method == "countTokens":
            return COUNT
        return JSON_LABEL
