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
from urllib.parse import urlsplit, urlunsplit

from llmproxy.providers.base import JSON_LABEL, ClientSetting
from llmproxy.providers.gemini import COUNT, GENERATE, GeminiProvider

# Project-scoped publisher models, deployed endpoints, and express mode's bare publisher path.
_VERTEX_METHOD = re.compile(
    r"^/v1(?:beta1)?/(?:projects/[^/]+/locations/[^/]+/)?"
    r"(?:publishers/[^/]+/models|endpoints)/([^/:]+):([A-Za-z]+)$"
)

_LOCATION = re.compile(r"/projects/[^/]+/locations/([a-z0-9-]+)/")
GLOBAL_HOST = "aiplatform.googleapis.com"


def location_host(location: str) -> str:
    """The host google-genai uses for a location: global, the multi-region `us`/`eu`, or a region."""
    if location == "global":
        return GLOBAL_HOST
    if location in ("us", "eu"):
        return f"aiplatform.{location}.rep.googleapis.com"
    return f"{location}-aiplatform.googleapis.com"


class VertexProvider(GeminiProvider):
    name = "vertex"
    # The global endpoint; a request for a regional location goes to that location's host
    # (see prepare_upstream), as the SDK itself would send it.
    default_upstream = "https://" + GLOBAL_HOST
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

    def prepare_upstream(
        self, method: str, url: str, headers: list[tuple[str, str]], body: bytes
    ) -> tuple[str, list[tuple[str, str]]]:
        """Vertex serves a regional location only on its own host: a request bound for the
        default (global) upstream goes to the host of the location in its path. A configured
        upstream is used as it is."""
        parts = urlsplit(url)
        match = _LOCATION.search(parts.path)
        if parts.hostname != GLOBAL_HOST or match is None:
            return url, headers
        netloc = location_host(match.group(1)) + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc)), headers
