"""AWS Bedrock Runtime: Converse, ConverseStream, InvokeModel (and its response stream).

boto3 signs each request (SigV4) for the host it talks to, which is the proxy's: that signature
is worthless upstream. So before forwarding, this provider drops the client's signature and
signs the request again for the upstream's host with the AWS credentials of the proxy's own
environment (botocore's default chain: env, profile, SSO, container, IMDS). Bedrock API keys
(`Authorization: Bearer ...`, not bound to a host) are forwarded as they are. None of these
headers takes part in a key or reaches a file (only a route's `key_headers` are stored).

Streams (`/converse-stream`, `/invoke-with-response-stream`) are binary
`application/vnd.amazon.eventstream` frames, each with two CRC32s.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import threading
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import orjson
import structlog
from yarl import URL

from llmproxy.providers.base import JSON_LABEL, ClientSetting, Provider, UpstreamRequestError, text_of
from llmproxy.usage import TokenUsage, bedrock_usage

log = structlog.get_logger("llmproxy.providers.bedrock")

EVENTSTREAM_CONTENT_TYPE = "application/vnd.amazon.eventstream"
SIGNING_NAME = "bedrock"

# Operations on a model; the model id (an ARN may hold "/") is everything between.
_MODEL_OPERATION = re.compile(
    r"^(?P<head>.*?/model/)(?P<model>.+)/(?P<op>converse|converse-stream|invoke|invoke-with-response-stream|count-tokens)$"
)
_OTHER_PATHS = re.compile(r"^/(?:guardrail/[^/]+/version/[^/]+/apply|async-invoke(?:/.*)?)$")
_STREAM_OPERATIONS = frozenset({"converse-stream", "invoke-with-response-stream"})
_REGION_HOST = re.compile(r"^bedrock-runtime(?:-fips)?\.([a-z0-9-]+)\.amazonaws\.com$")
_SCOPE_REGION = re.compile(r"Credential=[^/,\s]+/\d{8}/([a-z0-9-]+)/")

# The client's signature and everything that goes with it; replaced, never forwarded.
_SIGNATURE_HEADERS = frozenset({"authorization", "x-amz-date", "x-amz-security-token", "x-amz-content-sha256"})
# Sent along but not signed (botocore adds them after signing, or never signs them).
_UNSIGNED_HEADERS = frozenset({"user-agent", "amz-sdk-invocation-id", "amz-sdk-request", "x-amzn-trace-id"})
# What decides which credentials the default chain finds: a change means resolving again.
_CREDENTIAL_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
)
BEARER_ENV = "AWS_BEARER_TOKEN_BEDROCK"

CONVERSE = "bedrock-runtime.ConverseResponse"
CONVERSE_STREAM = "bedrock-runtime.ConverseStreamOutput"
INVOKE_STREAM = "bedrock-runtime.ResponseStream"
COUNT = "bedrock-runtime.CountTokensResponse"
ERROR = "bedrock-runtime.Error"


def default_region() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


def _native(value: Any) -> Any:
    """An InvokeModel stream chunk's model-native event ({"bytes": base64 JSON}), else the value."""
    if isinstance(value, dict) and isinstance(value.get("bytes"), str):
        try:
            return orjson.loads(base64.b64decode(value["bytes"], validate=True))
        except (binascii.Error, orjson.JSONDecodeError):
            return value
    return value


def encode_model_path(path: str) -> str:
    """The path as boto3 wrote it: the model id label percent-encoded with only `-._~` safe
    (so `:` is `%3A` and an ARN's `/` is `%2F`). The incoming path arrives decoded."""
    match = _MODEL_OPERATION.match(path)
    if not match:
        return path
    return f"{match['head']}{quote(match['model'], safe='-._~')}/{match['op']}"


class _Credentials:
    """The proxy's own AWS credentials, resolved once per environment (the chain may probe the
    network for IMDS), refreshed by botocore when they are temporary."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._env: tuple[str | None, ...] | None = None
        self._resolved: Any = None

    def frozen(self) -> Any:
        env = tuple(os.environ.get(name) for name in _CREDENTIAL_ENV)
        with self._lock:
            if env != self._env:
                import botocore.session

                self._resolved = botocore.session.get_session().get_credentials()
                self._env = env
                if self._resolved is not None:
                    # The method ("env", "shared-credentials-file", ...) only: never the key.
                    log.info(
                        "signing Bedrock upstream requests with the proxy's AWS credentials",
                        source=self._resolved.method,
                    )
            resolved = self._resolved
        return resolved.get_frozen_credentials() if resolved is not None else None


class BedrockProvider(Provider):
    name = "bedrock"
    claim_priority = 25
    stream_content_type = EVENTSTREAM_CONTENT_TYPE
    # The first signature resolves the proxy's AWS credentials: files, SSO, a credential
    # process, instance metadata over the network.
    prepare_blocks = True
    # SigV4 (Authorization + the STS session token) or a Bedrock API key (Bearer).
    credential_headers = frozenset({"authorization", "x-amz-security-token"})
    # Only AWS SDKs send these: such a request is never forwarded to another provider.
    identity_headers = frozenset({"x-amz-date", "x-amz-content-sha256", "amz-sdk-invocation-id", "amz-sdk-request"})
    # botocore takes an error's code from x-amzn-ErrorType (ValidationException...), a response
    # stream's `contentType` from X-Amzn-Bedrock-Content-Type; InvokeModel reports usage in headers.
    response_headers = frozenset(
        {
            "x-amzn-errortype",
            "x-amzn-requestid",
            "x-amzn-bedrock-content-type",
            "x-amzn-bedrock-input-token-count",
            "x-amzn-bedrock-output-token-count",
            "x-amzn-bedrock-invocation-latency",
        }
    )
    # boto3 reads it (botocore >= 1.31): http://proxy/bedrock, the SDK adds /model/{id}/converse.
    client_settings = (ClientSetting("AWS_ENDPOINT_URL_BEDROCK_RUNTIME"),)
    # boto3 signs every request, so it will not start without keys and a region; in replay
    # these sign for the proxy only. Not shaped like real keys (the secret scanner knows those).
    placeholder_keys = {
        "AWS_ACCESS_KEY_ID": "llmproxy-replay-placeholder",
        "AWS_SECRET_ACCESS_KEY": "llmproxy-replay-placeholder",
        "AWS_DEFAULT_REGION": "us-east-1",
    }

    def __init__(self) -> None:
        self._credentials = _Credentials()

    @property  # type: ignore[override]
    def default_upstream(self) -> str:
        """The regional endpoint of the proxy's own region (AWS_REGION, as the SDKs read it)."""
        return f"https://bedrock-runtime.{default_region()}.amazonaws.com"

    def claims(self, method: str, path: str, headers: Mapping[str, str]) -> bool:
        return bool(_MODEL_OPERATION.match(path) and path.startswith("/model/")) or bool(_OTHER_PATHS.match(path))

    def accepts_header(self, name: str, headers: Mapping[str, str]) -> bool:
        if name == "authorization":
            # SigV4, or a Bedrock API key (ABSK... long-term, bedrock-api-key-... short-term) or
            # any Bearer an AWS SDK sent; not another provider's bare Bearer key.
            value = headers.get("authorization", "")
            token = value[7:] if value[:7].lower() == "bearer " else ""
            return (
                value.startswith("AWS4-HMAC-SHA256 ")
                or token.startswith(("ABSK", "bedrock-api-key-"))
                or any(marker in headers for marker in self.identity_headers)
            )
        return super().accepts_header(name, headers)

    def stream_format(self, path: str, body: Any) -> str | None:
        match = _MODEL_OPERATION.match(path)
        return "eventstream" if match and match["op"] in _STREAM_OPERATIONS else None

    def model_of(self, path: str, body: Any) -> str | None:
        match = _MODEL_OPERATION.match(path)
        return unquote(match["model"]) if match else None

    def request_turns(self, body: Any) -> list[tuple[str, str]]:
        if isinstance(body, dict) and isinstance(body.get("prompt"), str):  # InvokeModel, older models
            return [("user", body["prompt"])]
        return super().request_turns(body)  # Converse and Anthropic-native bodies: system + messages

    def response_model(self, values: list[Any]) -> str | None:
        # Converse names no model in its answer; InvokeModel answers in the model's own format.
        natives = [_native(value) for value in values[:1]]
        first = natives[0] if natives else None
        if isinstance(first, dict) and isinstance(first.get("message"), dict):  # message_start
            model = first["message"].get("model")
            return model if isinstance(model, str) else None
        return super().response_model(natives)

    def response_text(self, values: list[Any]) -> str:
        pieces: list[str] = []
        for value in values:
            native = _native(value)
            if not isinstance(native, dict):
                continue
            output = native.get("output")
            if isinstance(output, dict) and isinstance(output.get("message"), dict):  # Converse
                pieces.append(text_of(output["message"].get("content")))
            delta = native.get("delta")
            if isinstance(delta, dict) and isinstance(delta.get("text"), str):  # stream deltas, both kinds
                pieces.append(delta["text"])
            if native.get("type") == "message" or (native.get("role") == "assistant" and "content" in native):
                pieces.append(text_of(native.get("content")))  # InvokeModel (Anthropic)
            for key in ("generation", "outputText", "completion"):  # InvokeModel (Llama, Titan, ...)
                if isinstance(native.get(key), str):
                    pieces.append(native[key])
        return "".join(pieces)

    def label(self, path: str, streaming: bool, value: Any) -> str:
        match = _MODEL_OPERATION.match(path)
        op = match["op"] if match else ""
        if isinstance(value, dict) and set(value) == {"message"}:
            return ERROR
        if op == "converse":
            return CONVERSE
        if op == "converse-stream":
            return CONVERSE_STREAM
        if op == "invoke-with-response-stream":
            return INVOKE_STREAM
        if op == "count-tokens":
            return COUNT
        return JSON_LABEL  # InvokeModel: the model's own body

    def default_framing(self, path: str, streaming: bool) -> dict[str, Any]:
        if streaming:
            return {"format": "eventstream"}
        return {"format": "json"}

    def stream_complete(self, path: str, chunks: list[Any], end: str) -> bool:
        # botocore ends a cut stream silently, as if it were whole: only a stream that ended on
        # a frame boundary after its last event (or an in-band error) is complete.
        if end or not chunks:
            return False
        last = chunks[-1]
        if not isinstance(last, dict):
            return last is None  # an `error` frame: headers only, no payload
        if set(last) - {"p"} == {"message"} or "originalStatusCode" in last:
            return True  # an exception frame (throttlingException, modelStreamErrorException...)
        match = _MODEL_OPERATION.match(path)
        if match and match["op"] == "converse-stream":
            return "usage" in last or "metrics" in last  # the `metadata` event comes last
        native = _native(last)
        # Bedrock adds its invocation metrics to the last chunk, whatever the model.
        return isinstance(native, dict) and (
            "amazon-bedrock-invocationMetrics" in native or native.get("type") == "message_stop"
        )

    def error_body(self, status: int, message: str, code: str) -> bytes:
        # rest-json errors: botocore takes the code from `code` when x-amzn-ErrorType is absent.
        return orjson.dumps({"message": message, "code": code})

    def usage(self, path: str, values: list[Any]) -> TokenUsage | None:
        return bedrock_usage(values)

    def prepare_upstream(
        self, method: str, url: str, headers: list[tuple[str, str]], body: bytes
    ) -> tuple[str | URL, list[tuple[str, str]]]:
        split = urlsplit(url)
        raw = f"{split.scheme}://{split.netloc}{encode_model_path(split.path)}"
        # encoded=True: sent as is, so the bytes signed are the bytes sent (aiohttp would
        # otherwise turn %3A back into ":").
        target = URL(f"{raw}?{split.query}" if split.query else raw, encoded=True)
        incoming = {name.lower(): value for name, value in headers}
        auth = incoming.get("authorization", "")
        bearer = os.environ.get(BEARER_ENV)
        if bearer:  # as botocore: a Bedrock API key in the environment wins over SigV4
            kept = [(n, v) for n, v in headers if n.lower() not in _SIGNATURE_HEADERS]
            return target, [*kept, ("Authorization", f"Bearer {bearer}")]
        if auth[:7].lower() == "bearer ":
            return target, headers  # a Bedrock API key is not bound to a host: forwarded as is
        return target, self._resign(method, target, headers, body, auth)

    def _resign(
        self, method: str, target: URL, headers: list[tuple[str, str]], body: bytes, client_auth: str
    ) -> list[tuple[str, str]]:
        try:
            from botocore.auth import SigV4Auth
            from botocore.awsrequest import AWSRequest
        except ImportError:
            raise UpstreamRequestError(
                "forwarding a SigV4-signed Bedrock request needs botocore to sign it again: "
                "pip install 'llmproxy[aws]'",
                "aws_signing_unavailable",
            ) from None
        from botocore.exceptions import BotoCoreError

        try:
            credentials = self._credentials.frozen()
        except BotoCoreError as exc:  # a bad profile, an expired SSO session, a failed refresh...
            raise UpstreamRequestError(
                f"llmproxy cannot load its AWS credentials to sign this request: {exc}", "upstream_credentials_failed"
            ) from None
        if credentials is None:
            raise UpstreamRequestError(
                "llmproxy has no AWS credentials to sign this request for the Bedrock upstream "
                "(the client's signature is for the proxy's host): set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or AWS_BEARER_TOKEN_BEDROCK) in the proxy's environment",
                "no_upstream_credentials",
            )
        if credentials.access_key == self.placeholder_keys["AWS_ACCESS_KEY_ID"]:
            # The pytest plugin (in this very process) or `run` set them for a replay run.
            raise UpstreamRequestError(
                "llmproxy's AWS credentials are the replay placeholders (AWS_ACCESS_KEY_ID="
                f"{credentials.access_key}, set by `llmproxy run` or the pytest plugin in replay): "
                "set real AWS credentials to record this call",
                "placeholder_key",
            )
        host = target.host or ""
        region_match = _REGION_HOST.match(host) or _SCOPE_REGION.search(client_auth)
        region = region_match.group(1) if region_match else default_region()
        to_sign = [
            (n, v) for n, v in headers if n.lower() not in _SIGNATURE_HEADERS and n.lower() not in _UNSIGNED_HEADERS
        ]
        request = AWSRequest(method=method, url=str(target), data=body, headers=dict(to_sign))
        SigV4Auth(credentials, SIGNING_NAME, region).add_auth(request)
        unsigned = [(n, v) for n, v in headers if n.lower() in _UNSIGNED_HEADERS]
        return [*request.headers.items(), *unsigned]
