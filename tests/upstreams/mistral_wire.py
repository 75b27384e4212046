"""A local upstream speaking Mistral's native chat format: OpenAI-like `data:` SSE without `event:`
lines, usage in the last chunk (no stream_options), `data: [DONE]`, 32-hex ids, FIM completions."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from tests.upstreams.wire import Upstream

SSE = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}


class MistralWire(Upstream):
    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.completions)
        app.router.add_post("/v1/fim/completions", self.completions)
        return app

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await self.note(request)
        if not request.headers.get("Authorization", "").startswith("Bearer "):
            return self.json({"detail": "Unauthorized"}, status=401)
        if request.path.endswith("/fim/completions"):
            text = f"return {body['prompt'].split()[-1]}"
        else:
            text = "Echo: " + str(body["messages"][-1]["content"])
        completion_id = f"{next(self._ids):032x}"
        usage = {"prompt_tokens": 9, "total_tokens": 17, "completion_tokens": 8}
        head = {"id": completion_id, "object": "chat.completion", "model": body["model"], "created": 1764417600}
        if body.get("stream") is not True:
            message = {"role": "assistant", "tool_calls": None, "content": text}
            choice = {"index": 0, "message": message, "finish_reason": "stop"}
            return self.json({**head, "usage": usage, "choices": [choice]})
        head["object"] = "chat.completion.chunk"
        pieces = [""] + [text[i : i + 5] for i in range(0, len(text), 5)]
        events = []
        for index, piece in enumerate(pieces):
            delta: dict[str, Any] = {"role": "assistant", "content": piece} if index == 0 else {"content": piece}
            chunk: dict[str, Any] = {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
            if index == len(pieces) - 1:
                chunk["choices"][0]["finish_reason"] = "stop"
                chunk["usage"] = usage  # Mistral sends usage with the last delta
            events.append(b"data: " + orjson.dumps(chunk) + b"\n\n")
        events.append(b"data: [DONE]\n\n")
        return await self.stream(request, events, SSE)
