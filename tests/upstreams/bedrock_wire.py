"""A local upstream speaking AWS Bedrock Runtime: it checks every request's SigV4 signature
against the credentials it was given (as AWS would, host and path included), answers Converse
and InvokeModel in AWS's compact JSON, and streams `application/vnd.amazon.eventstream`
frames (CRC32s, string headers, payloads padded with "p" as the real service does), split
across writes at places that are not frame boundaries."""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import hmac
import json
import re
import struct
import zlib
from typing import Any
from urllib.parse import parse_qsl, quote

from aiohttp import web

from tests.upstreams.wire import Upstream

_AUTH = re.compile(
    r"^AWS4-HMAC-SHA256 Credential=(?P<akid>[^/]+)/(?P<date>\d{8})/(?P<region>[^/]+)/(?P<service>[^/]+)/aws4_request, "
    r"SignedHeaders=(?P<signed>[^,]+), Signature=(?P<signature>[0-9a-f]{64})$"
)
SIGNATURE_MISMATCH = "The request signature we calculated does not match the signature you provided."
PADDING = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


# --- event stream encoding (the decoder under test is botocore's, in the client) -----------


def _header(name: str, value: str) -> bytes:
    encoded_name, encoded_value = name.encode(), value.encode()
    return bytes([len(encoded_name)]) + encoded_name + b"\x07" + struct.pack("!H", len(encoded_value)) + encoded_value


def frame(headers: dict[str, str], payload: bytes) -> bytes:
    encoded = b"".join(_header(name, value) for name, value in headers.items())
    prelude = struct.pack("!II", 12 + len(encoded) + len(payload) + 4, len(encoded))
    message = prelude + struct.pack("!I", zlib.crc32(prelude)) + encoded + payload
    return message + struct.pack("!I", zlib.crc32(message))


def event(kind: str, payload: dict[str, Any]) -> bytes:
    headers = {":event-type": kind, ":content-type": "application/json", ":message-type": "event"}
    return frame(headers, _dumps(payload))


def exception(kind: str, message: str) -> bytes:
    headers = {":exception-type": kind, ":content-type": "application/json", ":message-type": "exception"}
    return frame(headers, _dumps({"message": message}))


# --- SigV4 verification, written from the algorithm (not botocore's signer) ----------------


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


def expected_signature(request_parts: dict[str, Any], secret: str, match: re.Match[str]) -> str:
    method, raw_path, query = request_parts["method"], request_parts["raw_path"], request_parts["query"]
    headers: dict[str, str] = request_parts["headers"]
    signed = match["signed"].split(";")
    # Non-S3 services encode the path once more: "%3A" is signed as "%253A".
    canonical_uri = quote(raw_path, safe="/~")
    pairs = sorted((quote(k, safe="-_.~"), quote(v, safe="-_.~")) for k, v in parse_qsl(query, keep_blank_values=True))
    canonical_query = "&".join(f"{k}={v}" for k, v in pairs)
    canonical_headers = "".join(f"{name}:{' '.join(headers.get(name, '').split())}\n" for name in signed)
    payload_hash = hashlib.sha256(request_parts["body"]).hexdigest()
    canonical = "\n".join([method, canonical_uri, canonical_query, canonical_headers, match["signed"], payload_hash])
    scope = f"{match['date']}/{match['region']}/{match['service']}/aws4_request"
    to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", headers["x-amz-date"], scope, hashlib.sha256(canonical.encode()).hexdigest()]
    )
    key = _hmac(f"AWS4{secret}".encode(), match["date"])
    for part in (match["region"], match["service"], "aws4_request"):
        key = _hmac(key, part)
    return hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()


class BedrockWire(Upstream):
    def __init__(self, access_key: str, secret_key: str, session_token: str | None = None) -> None:
        super().__init__()
        self.access_key = access_key
        self.secret_key = secret_key
        self.session_token = session_token
        self.bearer: str | None = None  # a Bedrock API key it also accepts
        # Set: streams stop after their first frame until the test opens the gate.
        self.gate: asyncio.Event | None = None
        # True: streams lose their last frame and are cut 5 bytes into the one before.
        self.cut = False
        self.rejected: list[str] = []  # why each refused request was refused
        self.authorizations: list[str] = []  # the Authorization headers accepted

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/model/{model:.+}/converse", self.converse)
        app.router.add_post("/model/{model:.+}/converse-stream", self.converse_stream)
        app.router.add_post("/model/{model:.+}/invoke", self.invoke)
        app.router.add_post("/model/{model:.+}/invoke-with-response-stream", self.invoke_stream)
        return app

    def verify(self, request: web.Request, body: bytes) -> str | None:
        """Why AWS would refuse this request, or None if the signature holds."""
        headers = {name.lower(): value for name, value in request.headers.items()}
        if self.bearer is not None and headers.get("authorization") == f"Bearer {self.bearer}":
            return None
        match = _AUTH.match(headers.get("authorization", ""))
        if match is None:
            return "MissingAuthenticationToken: no SigV4 Authorization header"
        if match["akid"] != self.access_key:
            return f"UnrecognizedClientException: unknown access key {match['akid'][:4]}..."
        if match["service"] != "bedrock":
            return f"InvalidSignatureException: service {match['service']} != bedrock"
        signed = match["signed"].split(";")
        if "host" not in signed or "x-amz-date" not in signed:
            return "InvalidSignatureException: host and x-amz-date must be signed"
        if self.session_token is not None and (
            headers.get("x-amz-security-token") != self.session_token or "x-amz-security-token" not in signed
        ):
            return "UnrecognizedClientException: the security token included in the request is invalid"
        stamp = datetime.datetime.strptime(headers["x-amz-date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=datetime.UTC)
        if abs((datetime.datetime.now(datetime.UTC) - stamp).total_seconds()) > 300:
            return "InvalidSignatureException: Signature expired"
        parts = {
            "method": request.method,
            "raw_path": request.raw_path.partition("?")[0],
            "query": request.query_string,
            "headers": headers,
            "body": body,
        }
        if not hmac.compare_digest(expected_signature(parts, self.secret_key, match), match["signature"]):
            return f"InvalidSignatureException: {SIGNATURE_MISMATCH}"
        return None

    async def checked(self, request: web.Request) -> tuple[Any, web.Response | None]:
        body = await self.note(request)
        self.requests[-1]["raw_path"] = request.raw_path
        problem = self.verify(request, self.requests[-1]["raw"])
        if problem is None:
            self.authorizations.append(request.headers["Authorization"])
            return body, None
        self.rejected.append(problem)
        code, _, message = problem.partition(": ")
        refusal = web.Response(
            status=403,
            body=_dumps({"message": message}),
            headers={"Content-Type": "application/json", "x-amzn-ErrorType": f"{code}:http://internal.amazon.com/"},
        )
        return None, refusal

    def _text(self, model: str, body: dict[str, Any]) -> str:
        last = body["messages"][-1]["content"][0]["text"]
        return f"Hello from {model.rsplit('/', 1)[-1]} about {last[:20]}"

    async def converse(self, request: web.Request) -> web.Response:
        body, refusal = await self.checked(request)
        if refusal is not None:
            return refusal
        if "nonexistent" in request.match_info["model"]:
            return self.json(
                {"message": "The provided model identifier is invalid."},
                status=400,
                headers={
                    "x-amzn-ErrorType": "ValidationException:http://internal.amazon.com/coral/com.amazon.bedrock/"
                },
                dumps=_dumps,
            )
        text = self._text(request.match_info["model"], body)
        answer = {
            "metrics": {"latencyMs": 321},
            "output": {"message": {"content": [{"text": text}], "role": "assistant"}},
            "stopReason": "end_turn",
            "usage": {"inputTokens": 9, "outputTokens": len(text.split()), "totalTokens": 9 + len(text.split())},
        }
        return self.json(answer, headers={"x-amzn-RequestId": self.next_id("req-")}, dumps=_dumps)

    async def converse_stream(self, request: web.Request) -> web.StreamResponse:
        body, refusal = await self.checked(request)
        if refusal is not None:
            return refusal
        words = self._text(request.match_info["model"], body).split(" ")
        frames = [event("messageStart", {"p": PADDING[:7], "role": "assistant"})]
        for index, word in enumerate(words):
            delta = {"contentBlockIndex": 0, "delta": {"text": word if index == 0 else " " + word}}
            frames.append(event("contentBlockDelta", {**delta, "p": PADDING[: 5 + 3 * index]}))
        frames.append(event("contentBlockStop", {"contentBlockIndex": 0, "p": PADDING[:11]}))
        frames.append(event("messageStop", {"p": PADDING[:3], "stopReason": "end_turn"}))
        usage = {"inputTokens": 9, "outputTokens": len(words), "totalTokens": 9 + len(words)}
        frames.append(event("metadata", {"metrics": {"latencyMs": 412}, "p": PADDING[:2], "usage": usage}))
        return await self._stream(request, frames)

    async def invoke(self, request: web.Request) -> web.Response:
        body, refusal = await self.checked(request)
        if refusal is not None:
            return refusal
        text = f"Invoked with {body['messages'][-1]['content']}"
        answer = {
            "id": "msg_bdrk_01",
            "type": "message",
            "role": "assistant",
            "model": "claude-3-5-sonnet-20240620",
            "content": [{"type": "text", "text": text}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": 10, "output_tokens": 4},
        }
        headers = {
            "X-Amzn-Bedrock-Input-Token-Count": "10",
            "X-Amzn-Bedrock-Output-Token-Count": "4",
            "X-Amzn-Bedrock-Invocation-Latency": "512",
        }
        return self.json(answer, headers=headers, dumps=_dumps)

    async def invoke_stream(self, request: web.Request) -> web.StreamResponse:
        body, refusal = await self.checked(request)
        if refusal is not None:
            return refusal
        native = [
            {"type": "message_start", "message": {"id": "msg_bdrk_02", "role": "assistant", "content": []}},
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Streamed "}},
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "invoke"}},
            {
                "type": "message_stop",
                "amazon-bedrock-invocationMetrics": {"inputTokenCount": 10, "outputTokenCount": 2},
            },
        ]
        frames = [
            event("chunk", {"bytes": base64.b64encode(_dumps(item)).decode(), "p": PADDING[: 4 + i]})
            for i, item in enumerate(native)
        ]
        return await self._stream(request, frames, {"X-Amzn-Bedrock-Content-Type": "application/json"})

    async def _stream(
        self, request: web.Request, frames: list[bytes], extra: dict[str, str] | None = None
    ) -> web.StreamResponse:
        if self.gate is not None:
            response = web.StreamResponse(headers={"Content-Type": "application/vnd.amazon.eventstream"})
            await response.prepare(request)
            await response.write(frames[0])
            await self.gate.wait()
            for item in frames[1:]:
                await response.write(item)
            await response.write_eof()
            self.sent.append(b"".join(frames))
            return response
        if self.cut:
            frames = [*frames[:-2], frames[-2][:5]]
        data = b"".join(frames)
        # Writes that cut frames anywhere: how TCP splits them is not the client's business.
        pieces = [data[i : i + 37] for i in range(0, len(data), 37)]
        headers = {"Content-Type": "application/vnd.amazon.eventstream", "x-amzn-RequestId": self.next_id("req-")}
        headers.update(extra or {})
        return await self.stream(request, pieces, headers)
