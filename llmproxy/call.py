"""A call: one incoming request after routing, what can come of it, and llmproxy's own errors.

Routing, body parsing and the key are done once, in the server, before any mode sees a call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from llmproxy.canonical import CanonicalRequest
from llmproxy.providers import get_provider
from llmproxy.routing import Route


@dataclass(slots=True)
class Call:
    """One incoming request after routing."""

    route: Route
    method: str
    path: str  # as the upstream sees it
    query_string: str
    query: list[tuple[str, str]]
    headers: dict[str, str]  # lower-cased names
    body: bytes
    body_value: Any  # parsed JSON, RawBody, or None
    canonical: CanonicalRequest

    @property
    def model(self) -> str | None:
        return self.route.provider.model_of(self.path, self.body_value)


MISS_BODY_LIMIT = 256 * 1024


@dataclass(slots=True)
class Outcome:
    """Counts every mode keeps for the exit summary and the usage report."""

    hits: int = 0
    misses: int = 0
    forwarded: int = 0
    errors: int = 0
    refused: int = 0  # recordings the secret scanner stopped
    truncated: int = 0  # answers cut short, so not recorded
    shared: int = 0  # identical calls that waited for one in flight instead of going upstream
    missed: list[dict[str, Any]] = field(default_factory=list)

    def note_miss(self, call: Call) -> None:
        self.misses += 1
        self.missed.append(
            {
                "method": call.method,
                "path": call.path,
                "route": call.route.name,
                "model": call.model,
                "key": call.canonical.key,
                # What the browser compares with the nearest recording (the report drops secrets).
                "query": [list(pair) for pair in call.canonical.query],
                "headers": dict(call.canonical.headers),
                "body": call.canonical.body if len(call.canonical.body_json) <= MISS_BODY_LIMIT else None,
            }
        )


def error_response(
    route: Route | None, status: int, message: str, code: str, headers: dict[str, str] | None = None
) -> web.Response:
    """An error from llmproxy itself, in the provider's own error shape so SDKs surface it."""
    provider = route.provider if route else get_provider("openai")
    all_headers = {"x-llmproxy-error": code, "x-should-retry": "false"}
    all_headers.update(headers or {})
    return web.Response(
        status=status,
        body=provider.error_body(status, message, code),
        content_type="application/json",
        headers=all_headers,
    )
