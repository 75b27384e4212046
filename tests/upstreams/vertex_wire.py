"""A local upstream speaking Vertex AI's Gemini format: project/location/publisher paths, a bearer
OAuth token (or `x-goog-api-key` in express mode), CRLF-framed `alt=sse` streams whose chunks carry
`createTime`/`responseId`/`modelVersion` and, on the last one, `usageMetadata.trafficType`."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from tests.upstreams.wire import Upstream

JSON_TYPE = "application/json; charset=UTF-8"


def _dumps(value: Any) -> bytes:
    return json.dumps(value).encode()  # Google's servers write ", " and ": "


def _error(code: int, message: str, status: str) -> web.Response:
    body = _dumps({"error": {"code": code, "message": message, "status": status}})
    return web.Response(status=code, body=body, headers={"Content-Type": JSON_TYPE})


class VertexWire(Upstream):
    def app(self) -> web.Application:
        app = web.Application()
        scoped = "/{version}/projects/{project}/locations/{location}/publishers/{publisher}/models/{target}"
        app.router.add_post(scoped, self.model_method)
        app.router.add_post("/{version}/publishers/{publisher}/models/{target}", self.model_method)  # express
        return app

    async def model_method(self, request: web.Request) -> web.StreamResponse:
        body = await self.note(request)
        bearer = request.headers.get("Authorization", "").startswith("Bearer ")
        if not bearer and not request.headers.get("x-goog-api-key"):
            return _error(401, "Request is missing required authentication credential.", "UNAUTHENTICATED")
        model, _, method = request.match_info["target"].partition(":")
        text = "Vertex " + model + " says: " + body["contents"][-1]["parts"][0]["text"][:16]
        pieces = [text[i : i + 7] for i in range(0, len(text), 7)]

        def chunk(part: str, final: bool) -> dict[str, Any]:
            candidate: dict[str, Any] = {"content": {"role": "model", "parts": [{"text": part}]}}
            usage: dict[str, Any] = {"promptTokenCount": 6, "candidatesTokenCount": len(pieces)}
            if final:
                candidate["finishReason"] = "STOP"
                usage = {**usage, "totalTokenCount": 6 + len(pieces), "trafficType": "ON_DEMAND"}
            return {
                "candidates": [candidate],
                "usageMetadata": usage,
                "modelVersion": model,
                "createTime": "2026-11-29T12:00:00.123456Z",
                "responseId": "yGkJaZ2tKc6ZmecP4r3H0Qs",
            }

        if method == "generateContent":
            return self.json(chunk(text, True), content_type=JSON_TYPE, dumps=_dumps)
        if method == "countTokens":
            return self.json({"totalTokens": 6, "totalBillableCharacters": 20}, content_type=JSON_TYPE, dumps=_dumps)
        if method == "streamGenerateContent" and request.query.get("alt") == "sse":
            events = [b"data: " + _dumps(chunk(p, i == len(pieces) - 1)) + b"\r\n\r\n" for i, p in enumerate(pieces)]
            return await self.stream(request, events, {"Content-Type": "text/event-stream"})
        return _error(400, f"unsupported method {method!r}", "INVALID_ARGUMENT")
