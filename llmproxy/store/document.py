"""The recording format: one exchange as the seed's JSON document, and back.

    {
      "request":  {"method", "url", "headers", "body", "endpoint", "model", "route", "scope"},
      "response": {"status", "headers", "body", "is_streaming", "framing", "timing"},
      "provenance": {"tool", "version", "recorded_at", "client_user_agent"}
    }

`request.*`, `response.body` and `response.is_streaming` are the seed's fields; the rest are
llmproxy's extensions, all optional on read. Files written by other recorders of this format
(the seed, llama-stack) are normalised here: see `_normalise_foreign`. `__type__` is a label:
nothing named in a file is ever imported or executed.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from llmproxy.canonical import RawBody
from llmproxy.errors import LlmproxyError
from llmproxy.providers import Provider, provider_for_label
from llmproxy.wire.framing import BYTES_LABEL, DATA_KEY, TYPE_KEY, Format, typed
from llmproxy.wire.registry import capture, default_content_type, is_streaming_format

TOOL_NAME = "llmproxy"


class RecordingError(LlmproxyError, ValueError):
    """A document that is not a usable recording; the message says what is wrong."""


@dataclass(slots=True)
class RecordedRequest:
    method: str
    url: str
    path: str
    query: list[tuple[str, str]]
    body: Any  # JSON value, RawBody for other bytes, None for no body
    model: str | None = None
    route: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    raw_body: bytes | None = None  # the bytes behind a RawBody, kept to write them back
    # 1 for the first recording of a request, N for its Nth repeat in one recording run.
    sequence: int = 1
    # The test (pytest node id) or x-llmproxy-scope it was recorded for; None: shared.
    scope: str | None = None


@dataclass(slots=True)
class RecordedResponse:
    status: int
    headers: dict[str, str]
    body: Any
    framing: dict[str, Any]
    timing: dict[str, Any] | None = None
    # The upstream's answer was cut short (kept only with record_errors); replayed as received.
    truncated: bool = False

    @property
    def is_streaming(self) -> bool:
        return is_streaming_format(self.framing.get("format"))


@dataclass(slots=True)
class Recording:
    request: RecordedRequest
    response: RecordedResponse
    provenance: dict[str, Any] | None = None
    # Top-level fields of other recorders (test_id, ...) kept so a rewrite loses nothing.
    extra: dict[str, Any] = field(default_factory=dict)


def request_body_document(request: RecordedRequest) -> Any:
    if isinstance(request.body, RawBody):
        if request.raw_body is None:
            raise RecordingError("a raw request body needs its bytes to be written")
        return typed(BYTES_LABEL, base64.b64encode(request.raw_body).decode("ascii"))
    return request.body


def to_document(recording: Recording) -> dict[str, Any]:
    request, response = recording.request, recording.response
    document: dict[str, Any] = dict(recording.extra)
    document["request"] = {
        "method": request.method,
        "url": request.url,
        "headers": request.headers,
        "body": request_body_document(request),
        "endpoint": request.path,
        "model": request.model or "",
        "route": request.route,
    }
    if request.scope is not None:
        document["request"]["scope"] = request.scope
    if request.sequence != 1:
        document["request"]["sequence"] = request.sequence
    response_doc: dict[str, Any] = {
        "status": response.status,
        "headers": response.headers,
        "body": response.body,
        "is_streaming": response.is_streaming,
        "framing": response.framing,
    }
    if response.truncated:
        response_doc["truncated"] = True
    if response.timing is not None:
        response_doc["timing"] = response.timing
    document["response"] = response_doc
    if recording.provenance is not None:
        document["provenance"] = recording.provenance
    return document


ProviderResolver = Callable[[str, str], Provider | None]


def from_document(document: Any, resolve_provider: ProviderResolver) -> Recording:
    """Read one recording document (ours or another recorder's). Raises RecordingError."""
    if not isinstance(document, dict):
        raise RecordingError("not a JSON object")
    request_doc = document.get("request")
    response_doc = document.get("response")
    if not isinstance(request_doc, dict):
        raise RecordingError("no 'request' object (not an HTTP exchange)")
    if not isinstance(response_doc, dict):
        raise RecordingError("no 'response' object")
    provenance = document.get("provenance")
    extra = {k: v for k, v in document.items() if k not in ("request", "response", "provenance")}
    if isinstance(provenance, dict) and provenance.get("tool") == TOOL_NAME:
        recording = _read_own(request_doc, response_doc, resolve_provider)
        recording.provenance = provenance
    else:
        recording = _normalise_foreign(request_doc, response_doc, resolve_provider)
    recording.extra = extra
    return recording


def _read_request_body(value: Any) -> tuple[Any, bytes | None]:
    if isinstance(value, dict) and value.get(TYPE_KEY) == BYTES_LABEL:
        data = value.get(DATA_KEY)
        if not isinstance(data, str):
            raise RecordingError("request.body: a bytes body needs base64 text")
        try:
            raw = base64.b64decode(data, validate=True)
        except ValueError as exc:
            raise RecordingError(f"request.body: bad base64 ({exc})") from None
        return RawBody.of(raw), raw
    return value, None


def _string(doc: dict[str, Any], name: str, where: str, default: str | None = None) -> str:
    value = doc.get(name, default)
    if not isinstance(value, str):
        raise RecordingError(f"{where}.{name} must be a string")
    return value


def _headers(value: Any, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise RecordingError(f"{where}.headers must map names to strings")
    return {str(k).lower(): v for k, v in value.items()}


def _status(value: Any) -> int:
    if value is None:
        return 200
    if not isinstance(value, int) or isinstance(value, bool) or not 100 <= value <= 599:
        raise RecordingError("response.status must be an HTTP status code")
    return value


def _read_own(request_doc: dict, response_doc: dict, resolve_provider: ProviderResolver) -> Recording:
    method = _string(request_doc, "method", "request").upper()
    url = _string(request_doc, "url", "request")
    path = _string(request_doc, "endpoint", "request", urlsplit(url).path)
    body, raw = _read_request_body(request_doc.get("body"))
    route = request_doc.get("route")
    sequence = request_doc.get("sequence", 1)
    if not isinstance(sequence, int) or isinstance(sequence, bool) or sequence < 1:
        raise RecordingError("request.sequence must be a whole number from 1")
    scope = request_doc.get("scope")
    if scope is not None and (not isinstance(scope, str) or not scope):
        raise RecordingError("request.scope must be a non-empty string (a test's node id)")
    request = RecordedRequest(
        scope=scope,
        sequence=sequence,
        method=method,
        url=url,
        path=path,
        query=parse_qsl(urlsplit(url).query, keep_blank_values=True),
        body=body,
        raw_body=raw,
        model=request_doc.get("model") or None,
        route=route if isinstance(route, str) else None,
        headers=_headers(request_doc.get("headers"), "request"),
    )
    framing = response_doc.get("framing")
    if framing is None:
        provider = resolve_provider(method, path)
        streaming = bool(response_doc.get("is_streaming"))
        framing = provider.default_framing(path, streaming) if provider else {"format": Format.JSON.value}
    if not isinstance(framing, dict):
        raise RecordingError("response.framing must be an object")
    timing = response_doc.get("timing")
    response = RecordedResponse(
        status=_status(response_doc.get("status")),
        headers=_headers(response_doc.get("headers"), "response"),
        body=response_doc.get("body"),
        framing=framing,
        timing=timing if isinstance(timing, dict) else None,
        truncated=response_doc.get("truncated") is True,
    )
    return Recording(request, response)


def _first_label(body: Any) -> str | None:
    item = body[0] if isinstance(body, list) and body else body
    if isinstance(item, dict) and isinstance(item.get(TYPE_KEY), str):
        return item[TYPE_KEY]
    return None


def sdk_query_items(params: dict[str, Any]) -> list[tuple[str, str]]:
    """Query parameters as the OpenAI-style (Stainless) SDKs write `extra_query`: nested keys
    and lists in brackets (`a[b]=1`, `ids[]=1&ids[]=2`), booleans lower case, None left out."""
    items: list[tuple[str, str]] = []

    def add(key: str, value: Any) -> None:
        if isinstance(value, dict):
            for sub, item in value.items():
                add(f"{key}[{sub}]", item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                add(key + "[]", item)
        elif value is True or value is False:
            items.append((key, "true" if value else "false"))
        elif value is not None:
            items.append((key, str(value)))

    for name, value in params.items():
        add(str(name), value)
    return items


def _with_query(url: str, items: list[tuple[str, str]]) -> str:
    """The URL with these parameters set (they take precedence over the same names already there)."""
    if not items:
        return url
    parts = urlsplit(url)
    names = {name for name, _ in items}
    kept = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in names]
    return urlunsplit(parts._replace(query=urlencode(kept + items)))


def _normalise_foreign(request_doc: dict, response_doc: dict, resolve_provider: ProviderResolver) -> Recording:
    """Files from other recorders of this format, with their known quirks.

    - `request.url` may join a base URL and the endpoint ("/v1/v1/..."); `endpoint` may be
      mislabelled and `method` is always POST: the response's `__type__` tells the real call.
    - `request.body` holds SDK arguments: `extra_body` is merged into the wire body, and
      `extra_query` becomes the query string, as the SDK sends them.
    - Anthropic/Gemini exchanges hold `url`/`method`/`payload` and raw SSE lines as the body.
    - Failed calls hold `is_exception` and `exception_data` instead of a body.
    """
    url = _string(request_doc, "url", "request", "")
    method = _string(request_doc, "method", "request", "POST").upper()
    body = request_doc["body"] if "body" in request_doc else request_doc.get("payload")
    if isinstance(body, dict) and isinstance(body.get("extra_body"), dict):
        body = {k: v for k, v in body.items() if k != "extra_body"} | body["extra_body"]
    if isinstance(body, dict) and isinstance(body.get("extra_query"), dict):
        url = _with_query(url, sdk_query_items(body["extra_query"]))
        body = {k: v for k, v in body.items() if k != "extra_query"}
    endpoint = request_doc.get("endpoint")
    path = endpoint if isinstance(endpoint, str) and endpoint.startswith("/") else urlsplit(url).path
    response_body = response_doc.get("body")
    label = _first_label(response_body)
    provider = provider_for_label(label) if label else None
    if provider is not None:
        method, path = provider.legacy_requests[label]  # type: ignore[index]
    else:
        provider = resolve_provider(method, path)
    if provider is None:
        raise RecordingError(f"no provider serves {method} {path}")
    streaming = bool(response_doc.get("is_streaming"))
    status = _status(response_doc.get("status"))
    framing: dict[str, Any]
    if response_doc.get("is_exception"):
        details = response_doc.get("exception_data") or {}
        if not isinstance(details, dict):
            raise RecordingError("response.exception_data must be an object")
        status = _status(details.get("status_code") or 500)
        response_body = typed(
            "json", {"error": details.get("body") or {"message": response_doc.get("exception_message")}}
        )
        framing, streaming = {"format": Format.JSON.value}, False
    elif isinstance(response_body, list) and response_body and all(isinstance(x, str) for x in response_body):
        # Raw SSE lines: capture them as if they had just arrived from the upstream.
        fmt = provider.stream_format(path, body) or Format.SSE.value
        # Each string is one line of the wire text, so the text is the lines each ended by "\n".
        raw = "".join(line + "\n" for line in response_body).encode("utf-8")
        captured = capture(fmt, raw, lambda value: provider.label(path, True, value))
        response_body, framing = captured.body, captured.framing
        streaming = True
    else:
        framing = provider.default_framing(path, streaming)
    if streaming and not isinstance(response_body, list):
        raise RecordingError("a streamed response needs a list of chunks as its body")
    content_type = default_content_type(str(framing.get("format", Format.JSON.value)))
    query = parse_qsl(urlsplit(url).query, keep_blank_values=True)
    request = RecordedRequest(
        method=method,
        url=url,
        path=path,
        query=query,
        body=body,
        model=(request_doc.get("model") or provider.model_of(path, body)) or None,
        headers=_headers(request_doc.get("headers"), "request"),
    )
    response = RecordedResponse(status, {"content-type": content_type}, response_body, framing)
    return Recording(request, response)
