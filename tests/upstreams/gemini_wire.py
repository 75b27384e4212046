"""A local upstream speaking Gemini's generativelanguage format: `alt=sse` streams framed with
CRLF, JSON serialised with spaces (as Google's servers do), no end marker."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from tests.upstreams.wire import Upstream


def _dumps(value: Any) -> bytes:
    return json.dumps(value).encode()  # ", " and ": " separators, like the real API


class GeminiWire(Upstream):
    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/{version}/models/{target}", self.model_method)
        return app

    async def model_method(self, request: web.Request) -> web.StreamResponse:
        body = await self.note(request)
        model, _, method = request.match_info["target"].partition(":")
        if method == "batchEmbedContents":
            return self.json(
                {"embeddings": [{"values": [0.25, -0.5, float(len(str(r)) % 7)]} for r in body["requests"]]},
                content_type="application/json; charset=UTF-8",
                dumps=_dumps,
            )
        text = "Hi from " + model + " about " + body["contents"][-1]["parts"][0]["text"][:16]
        pieces = [text[i : i + 6] for i in range(0, len(text), 6)]
        usage = {"promptTokenCount": 5, "candidatesTokenCount": len(pieces), "totalTokenCount": 5 + len(pieces)}

        def chunk(part: str, final: bool) -> dict[str, Any]:
            candidate: dict[str, Any] = {"content": {"parts": [{"text": part}], "role": "model"}, "index": 0}
            if final:
                candidate["finishReason"] = "STOP"
            return {
                "candidates": [candidate],
                "usageMetadata": usage,
                "modelVersion": model,
                "responseId": "AdVRaMmDCYekqtsPrb_-iAw",
            }

        if method == "generateContent":
            return self.json(chunk(text, True), content_type="application/json; charset=UTF-8", dumps=_dumps)
        if method == "streamGenerateContent" and request.query.get("alt") == "sse":
            events = [b"data: " + _dumps(chunk(p, i == len(pieces) - 1)) + b"\r\n\r\n" for i, p in enumerate(pieces)]
            return await self.stream(request, events, {"Content-Type": "text/event-stream"})
        return web.json_response(
            {"error": {"code": 400, "message": "unsupported", "status": "INVALID_ARGUMENT"}}, status=400
        )
