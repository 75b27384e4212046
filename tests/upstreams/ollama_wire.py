"""A local upstream speaking Ollama's native API: NDJSON streams by default, JSON otherwise."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from tests.upstreams.wire import Upstream

NDJSON = {"Content-Type": "application/x-ndjson"}
JSON_UTF8 = "application/json; charset=utf-8"
CREATED_AT = "2025-01-01T00:00:00.123456789Z"
DONE = {
    "done": True,
    "done_reason": "stop",
    "total_duration": 123456789,
    "load_duration": 1234567,
    "prompt_eval_count": 26,
    "prompt_eval_duration": 3456789,
    "eval_count": 3,
    "eval_duration": 4567890,
}
MODEL = {
    "name": "llama3.2:latest",
    "model": "llama3.2:latest",
    "modified_at": "2025-01-01T00:00:00Z",
    "size": 2019393189,
    "digest": "a80c4f17acd55265feec403c7aef86be0c25983ab279d83f3bcd3abbcb5b8b72",
    "details": {
        "parent_model": "",
        "format": "gguf",
        "family": "llama",
        "families": ["llama"],
        "parameter_size": "3.2B",
        "quantization_level": "Q4_K_M",
    },
}


class OllamaWire(Upstream):
    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/api/chat", self.chat)
        app.router.add_post("/api/generate", self.generate)
        app.router.add_post("/api/embed", self.embed)
        app.router.add_get("/api/tags", self.tags)
        app.router.add_get("/api/ps", self.ps)
        app.router.add_post("/api/show", self.show)
        return app

    async def _answer(
        self, request: web.Request, body: dict[str, Any], pieces: list[dict[str, Any]], final: dict[str, Any]
    ) -> web.StreamResponse:
        if body.get("stream") is False:
            merged = dict(final)
            for key in ("message", "response"):
                if key in pieces[0]:
                    if key == "message":
                        merged["message"] = {
                            "role": "assistant",
                            "content": "".join(p["message"]["content"] for p in pieces),
                        }
                    else:
                        merged["response"] = "".join(p["response"] for p in pieces)
            return self.json(merged, content_type=JSON_UTF8)
        lines = [orjson.dumps(piece) + b"\n" for piece in [*pieces, final]]
        return await self.stream(request, lines, NDJSON)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await self.note(request)
        text = "Hello from " + body["messages"][-1]["content"][:20]
        base = {"model": body["model"], "created_at": CREATED_AT}
        pieces = [
            {**base, "message": {"role": "assistant", "content": text[i : i + 5]}, "done": False}
            for i in range(0, len(text), 5)
        ]
        final = {**base, "message": {"role": "assistant", "content": ""}, **DONE}
        return await self._answer(request, body, pieces, final)

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body = await self.note(request)
        text = "Once " + body.get("prompt", "")[:20]
        base = {"model": body["model"], "created_at": CREATED_AT}
        pieces = [{**base, "response": text[i : i + 4], "done": False} for i in range(0, len(text), 4)]
        final = {**base, "response": "", **DONE, "context": [1, 2, 3]}
        return await self._answer(request, body, pieces, final)

    async def embed(self, request: web.Request) -> web.Response:
        body = await self.note(request)
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        return self.json(
            {
                "model": body["model"],
                "embeddings": [[0.1 * len(text), -0.25, 0.5] for text in inputs],
                "total_duration": 14017069,
                "load_duration": 6084798,
                "prompt_eval_count": 6,
            },
            content_type=JSON_UTF8,
        )

    async def tags(self, request: web.Request) -> web.Response:
        await self.note(request)
        return self.json({"models": [MODEL]}, content_type=JSON_UTF8)

    async def ps(self, request: web.Request) -> web.Response:
        await self.note(request)
        return self.json(
            {"models": [{**MODEL, "expires_at": "2025-01-01T00:05:00Z", "size_vram": 2019393189}]},
            content_type=JSON_UTF8,
        )

    async def show(self, request: web.Request) -> web.Response:
        body = await self.note(request)
        return self.json(
            {
                "modelfile": f"FROM {body['model']}",
                "parameters": "stop <|eot_id|>",
                "template": "{{ .Prompt }}",
                "details": MODEL["details"],
                "model_info": {"general.architecture": "llama"},
                "capabilities": ["completion"],
                "modified_at": "2025-01-01T00:00:00Z",
            },
            content_type=JSON_UTF8,
        )
