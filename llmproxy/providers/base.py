"""What every provider module supplies: its paths, credentials, client settings, stream formats,
type labels, model/transcript extraction and error shape.

A provider owns one wire format. The rest of llmproxy asks it questions and never looks at
provider-specific fields itself, so adding a provider touches only its own module and the
registry in `llmproxy.providers`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import orjson
from yarl import URL

from llmproxy.usage import TokenUsage, any_usage
from llmproxy.wire.framing import Format, data_of
from llmproxy.wire.json import JSON
from llmproxy.wire.registry import default_content_type
from llmproxy.wire.sse import SSE

JSON_LABEL = "json"

SSE_CONTENT_TYPE = default_content_type(Format.SSE)
NDJSON_CONTENT_TYPE = default_content_type(Format.NDJSON)
JSON_CONTENT_TYPE = default_content_type(Format.JSON)


class UpstreamRequestError(LookupError):
    """A provider cannot prepare a request for its upstream (e.g. no credentials to sign it):
    the client gets a 502 with this message, and nothing is sent."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class ClientSetting:
    """An environment variable one of the provider's SDKs reads to find its API.

    `llmproxy run` and the pytest plugin set it to the proxy's URL + the provider's prefix +
    `suffix` (what that SDK's base-URL convention expects, e.g. "/v1" for OPENAI_BASE_URL)."""

    variable: str
    suffix: str = ""


def text_of(content: Any) -> str:
    """The readable text in a message's content, whatever its shape (string, parts, blocks)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(text_of(part) for part in content)
    if isinstance(content, dict):
        for key in ("text", "content", "input", "thinking"):
            if key in content and content[key] is not None:
                return text_of(content[key])
        if content.get("type") == "tool_use":
            return f"[tool call {content.get('name')}({content.get('input')})]"
    return ""


class Provider:
    """Defaults shared by the providers; each subclass overrides what its format does differently."""

    name: ClassVar[str] = "generic"
    # Upstream used when the config names the provider but no upstream.
    default_upstream: ClassVar[str | None] = None
    # Tried before lower numbers when several providers claim the same unprefixed path.
    claim_priority: ClassVar[int] = 0
    # Request headers (lower case) that `claims` may read: the router resolves a path once per
    # method, path and these headers' values, and shows `claims` no other header.
    claim_headers: ClassVar[frozenset[str]] = frozenset()
    # Path roots of the upstream API, the first being the one an SDK may leave out of its base
    # URL: under the provider's prefix, "/messages" means "/v1/messages" (see upstream_path).
    api_roots: ClassVar[tuple[str, ...]] = ()
    # Headers that carry this provider's credentials (lower case): never on disk or in a log,
    # never sent to another provider's upstream.
    credential_headers: ClassVar[frozenset[str]] = frozenset()
    # Query parameters that carry its credentials (lower case).
    credential_query: ClassVar[frozenset[str]] = frozenset()
    # Headers only this provider's clients send (not secret, e.g. anthropic-version): a request
    # carrying one belongs to this provider and is never forwarded to another.
    identity_headers: ClassVar[frozenset[str]] = frozenset()
    # Environment variables its SDKs read for their base URL (for `run` and the pytest plugin).
    client_settings: ClassVar[tuple[ClientSetting, ...]] = ()
    # Placeholder keys set in replay so SDKs that refuse to start without one start; never sent.
    placeholder_keys: ClassVar[Mapping[str, str]] = {}
    # Response headers its SDKs read, kept in recordings besides the common ones (lower case).
    response_headers: ClassVar[frozenset[str]] = frozenset()
    # Content types for recordings made by other tools, which do not store headers.
    stream_content_type: ClassVar[str] = SSE_CONTENT_TYPE
    # Labels that tell which real request a foreign recording answered: label -> (method, path).
    legacy_requests: ClassVar[Mapping[str, tuple[str, str]]] = {}

    @property
    def prefix(self) -> str:
        """The path prefix of the provider's built-in route: http://proxy/{name}/... reaches it,
        whatever the path after it, so every SDK's base URL can point there unambiguously."""
        return "/" + self.name

    def claims(self, method: str, path: str, headers: Mapping[str, str]) -> bool:
        """Whether an unprefixed request path is unmistakably this provider's (legacy base URLs).
        Claim only the API's own paths: a path no provider claims is answered 404 no_route."""
        return False

    def upstream_path(self, method: str, path: str, headers: Mapping[str, str]) -> str:
        """The upstream API path for a path under a prefix of this provider's route. SDKs differ
        in what their base URL includes (`@ai-sdk/anthropic` posts `{base}/messages`, the
        anthropic SDK `{base}/v1/messages`): both reach, and are recorded as, `/v1/messages`.
        A path that is not one of the API's with its root added (e.g. a custom server's
        /health) is left as it is."""
        if path == "/" or not self.api_roots:
            return path
        if any(path == root or path.startswith(root + "/") for root in self.api_roots):
            return path
        rooted = self.api_roots[0] + path
        return rooted if self.claims(method, rooted, headers) else path

    def accepts_header(self, name: str, headers: Mapping[str, str]) -> bool:
        """Whether this provider's upstream may receive the request header `name` (lower case),
        one of some provider's credential or identity headers."""
        return name in self.credential_headers or name in self.identity_headers

    def accepts_query(self, name: str) -> bool:
        """Whether this provider's upstream may receive the credential query parameter `name`."""
        return name in self.credential_query

    def stream_format(self, path: str, body: Any) -> str | None:
        """The stream format a request asks for ("sse", "ndjson"), or None for a plain response."""
        if isinstance(body, dict) and body.get("stream") is True:
            return Format.SSE.value
        return None

    def model_of(self, path: str, body: Any) -> str | None:
        """The model a request asks for."""
        if isinstance(body, dict) and isinstance(body.get("model"), str):
            return body["model"]
        return None

    def response_model(self, values: list[Any]) -> str | None:
        """The model that really answered, from the response's JSON values (body or chunks)."""
        first = values[0] if values else None
        if isinstance(first, dict) and isinstance(first.get("model"), str):
            return first["model"]
        return None

    def request_turns(self, body: Any) -> list[tuple[str, str]]:
        """The conversation a request sends, as (role, text) pairs, for `llmproxy show`."""
        if not isinstance(body, dict):
            return [("request", "<non-JSON body>")] if body is not None else []
        turns: list[tuple[str, str]] = []
        if body.get("system"):
            turns.append(("system", text_of(body["system"])))
        for message in body.get("messages") or []:
            if isinstance(message, dict):
                turns.append((str(message.get("role", "?")), text_of(message.get("content"))))
        for key in ("prompt", "input"):
            if key in body and not turns:
                turns.append(("user", text_of(body[key])))
        return turns

    def response_text(self, values: list[Any]) -> str:
        """The assistant's text, assembled from the response's JSON values (body or chunks)."""
        pieces: list[str] = []
        for value in values:
            if isinstance(value, dict):
                for choice in value.get("choices") or []:
                    if isinstance(choice, dict):  # chat (message or delta) and completions (text)
                        delta = choice.get("delta") or choice.get("message") or {}
                        text = (delta.get("content") if isinstance(delta, dict) else None) or choice.get("text")
                        pieces.append(text if isinstance(text, str) else "")
        return "".join(pieces)

    def label(self, path: str, streaming: bool, value: Any) -> str:
        """The `__type__` label for one chunk or body: the SDK type name a reader expects."""
        return JSON_LABEL

    def constant_label(self, path: str, streaming: bool) -> str | None:
        """`label` for every value at this path, when it does not look at the value (a stream's
        thousands of chunks are then labelled without a call each); None: it may."""
        return JSON_LABEL if type(self).label is Provider.label else None

    def pack_json(self, path: str, value: Any) -> Any | None:
        """An alternative body layout for a JSON response (e.g. a model list as Model items)."""
        return None

    def json_value(self, body: Any) -> Any:
        """The wire JSON value for a stored non-streamed body (inverse of label/pack_json)."""
        return data_of(body)

    def default_framing(self, path: str, streaming: bool) -> dict[str, Any]:
        """Framing for recordings that carry none (the seed and other recorders' files)."""
        if streaming:
            return SSE.default_framing()
        return JSON.default_framing()

    def stream_complete(self, path: str, chunks: list[Any], end: str) -> bool:
        """Whether a stream reached its end marker; a stream cut short must not be replayed
        as if it were whole. `chunks` are the JSON values, `end` the text after the last one."""
        return not end.strip()

    def error_body(self, status: int, message: str, code: str) -> bytes:
        """A JSON error body in this provider's shape, for errors llmproxy itself returns."""
        return orjson.dumps({"error": {"message": message, "type": code, "code": code}})

    def usage(self, path: str, values: list[Any]) -> TokenUsage | None:
        """Tokens the answer reports; `values` are its JSON values (a stream's chunks, or the body)."""
        return any_usage(values)

    # prepare_upstream may block (credential lookups, hashing a body): it runs off the event loop.
    prepare_blocks: ClassVar[bool] = False

    def prepare_upstream(
        self, method: str, url: str, headers: list[tuple[str, str]], body: bytes
    ) -> tuple[str | URL, list[tuple[str, str]]]:
        """The URL and headers to send upstream, once per forwarded request (e.g. re-signing it
        for the upstream's host). Raises UpstreamRequestError when it cannot be sent."""
        return url, headers
