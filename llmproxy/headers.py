"""Which headers go where: upstream, back to the client, into a file, into a log line."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)

# Never written to disk or logged: session state and the proxy's own token, plus every
# provider's credential headers (declared by the providers, see credential_headers()).
GENERIC_CREDENTIAL_HEADERS = frozenset(
    {"authorization", "cookie", "set-cookie", "proxy-authorization", "x-llmproxy-token"}
)


@functools.cache
def credential_headers() -> frozenset[str]:
    """Every header that carries a credential: the generic ones and each provider's."""
    # Imported here: the providers import the wire layer, which must stay free to import this module.
    from llmproxy.providers import CREDENTIAL_HEADERS

    return GENERIC_CREDENTIAL_HEADERS | CREDENTIAL_HEADERS


# Set by aiohttp for the upstream leg (it decompresses, so the client's encodings do not apply:
# the request body is forwarded decoded, so its content-encoding would lie about it too).
# llmproxy's own headers (token, scope) are for the proxy alone. `Expect: 100-continue` was
# answered by the proxy, which sends the upstream the whole body at once.
NOT_FORWARDED = HOP_BY_HOP | {
    "host",
    "expect",
    "content-length",
    "accept-encoding",
    "content-encoding",
    "x-llmproxy-token",
    "x-llmproxy-scope",
}

# Response headers worth keeping in a recording: the SDKs read these. Everything else
# (dates, rate-limit counters, cf-ray) changes on every call and would only make noisy diffs.
RECORDED_RESPONSE_HEADERS = frozenset(
    {
        "content-type",
        "cache-control",
        "x-request-id",
        "request-id",
        "apim-request-id",
        "retry-after",
        "retry-after-ms",
        "x-should-retry",
        "openai-version",
        "x-accel-buffering",
    }
)

# The body is re-framed (and decompressed) by the proxy, so these would lie about it.
BODY_HEADERS = frozenset({"content-length", "content-encoding"})


def forward_request_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(name, value) for name, value in headers if name.lower() not in NOT_FORWARDED]


def client_response_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    dropped = HOP_BY_HOP | BODY_HEADERS
    return [(name, value) for name, value in headers if name.lower() not in dropped]


def recorded_response_headers(
    headers: Iterable[tuple[str, str]], extra: frozenset[str] = frozenset()
) -> dict[str, str]:
    """The response headers a recording keeps: the common ones plus a provider's `extra`."""
    kept: dict[str, str] = {}
    for name, value in headers:
        lowered = name.lower()
        if (lowered in RECORDED_RESPONSE_HEADERS or lowered in extra) and lowered not in kept:
            kept[lowered] = value
    return kept


def replay_headers(recorded: Mapping[str, str]) -> dict[str, str]:
    dropped = HOP_BY_HOP | BODY_HEADERS | credential_headers()
    return {name: value for name, value in recorded.items() if name.lower() not in dropped}
