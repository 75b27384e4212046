"""A local upstream that speaks OpenAI's wire format exactly as the real API frames it
(content types, `data:` events, `[DONE]`, x-request-id), with deterministic answers."""

from __future__ import annotations

import asyncio
import base64
import gzip
import itertools
import struct
from typing import Any

import orjson
from aiohttp import web

SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
CREATED = 1757525902


def _answer(body: dict[str, Any]) -> str:
    messages = body.get("messages") or [{"content": body.get("prompt", "")}]
    last = messages[-1].get("content", "")
    if isinstance(last, list):
        last = " ".join(part.get("text", "") for part in last)
    return f"ECHO: {str(last).upper()}"


def _pieces(text: str) -> list[str]:
    return [text[i : i + 3] for i in range(0, len(text), 3)]


class OpenAIWire:
    def __init__(self, *, gzip_json: bool = False) -> None:
        self.requests: list[dict[str, Any]] = []
        self.sent: list[bytes] = []  # the exact body bytes of each response, in request order
        self.gzip_json = gzip_json
        # When set, a stream waits for this event after its first chunk (pass-through test).
        self.gate: asyncio.Event | None = None
        self.chunk_delay = 0.0
        self._ids = itertools.count(1)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/embeddings", self.embeddings)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/responses", self.responses)
        app.router.add_post("/v1/audio/transcriptions", self.transcription)
        app.router.add_post("/v1/audio/speech", self.speech)
        # Azure OpenAI: deployment paths (api-version in the query, api-key header) and /openai/v1.
        app.router.add_post("/openai/deployments/{deployment}/chat/completions", self.chat)
        app.router.add_post("/openai/deployments/{deployment}/embeddings", self.embeddings)
        app.router.add_post("/openai/v1/chat/completions", self.chat)
        return app

    async def _note(self, request: web.Request) -> dict[str, Any]:
        raw = await request.read()
        json_body = request.headers.get("Content-Type", "").startswith("application/json")
        body = orjson.loads(raw) if raw and json_body else {}
        self.requests.append(
            {
                "method": request.method,
                "path": request.path,
                "path_qs": request.path_qs,
                "headers": dict(request.headers),
                "body": body,
                "raw": raw,
            }
        )
        return body

    def _headers(self) -> dict[str, str]:
        return {
            "x-request-id": f"req_{next(self._ids):06d}",
            "openai-processing-ms": "12",
            "openai-version": "2020-10-01",
            "set-cookie": "__cf_bm=sessioncookie-should-not-be-stored; path=/",
        }

    def _json(self, request: web.Request, value: Any) -> web.Response:
        data = orjson.dumps(value)
        self.sent.append(data)
        headers = self._headers()
        if self.gzip_json and "gzip" in request.headers.get("Accept-Encoding", ""):
            data = gzip.compress(data)
            headers["Content-Encoding"] = "gzip"
        return web.Response(body=data, content_type="application/json", headers=headers)

    async def _stream(self, request: web.Request, events: list[dict[str, Any]]) -> web.StreamResponse:
        response = web.StreamResponse(headers={**SSE_HEADERS, **self._headers()})
        await response.prepare(request)
        sent = []
        for index, event in enumerate(events):
            sent.append(b"data: " + orjson.dumps(event) + b"\n\n")
            await response.write(sent[-1])
            if index == 0 and self.gate is not None:
                await asyncio.wait_for(self.gate.wait(), 10)
            if self.chunk_delay:
                await asyncio.sleep(self.chunk_delay)
        sent.append(b"data: [DONE]\n\n")
        await response.write(sent[-1])
        await response.write_eof()
        self.sent.append(b"".join(sent))
        return response

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._note(request)
        text = _answer(body)
        model = body.get("model", "gpt-4o")
        completion_id = "chatcmpl-fake123"
        base = {
            "id": completion_id,
            "created": CREATED,
            "model": f"{model}-2024-08-06",
            "system_fingerprint": "fp_fake",
        }
        if not body.get("stream"):
            return self._json(
                request,
                {
                    **base,
                    "object": "chat.completion",
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": text, "refusal": None},
                            "logprobs": None,
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14},
                    "service_tier": "default",
                },
            )
        chunk = {**base, "object": "chat.completion.chunk", "service_tier": "default"}
        events = [
            {
                **chunk,
                "choices": [
                    {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                ],
                "usage": None,
            }
        ]
        for piece in _pieces(text):
            events.append(
                {
                    **chunk,
                    "choices": [{"index": 0, "delta": {"content": piece}, "logprobs": None, "finish_reason": None}],
                    "usage": None,
                }
            )
        events.append(
            {**chunk, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}], "usage": None}
        )
        if (body.get("stream_options") or {}).get("include_usage"):
            events.append(
                {**chunk, "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14}}
            )
        return await self._stream(request, events)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._note(request)
        text = _answer(body)
        base = {
            "id": "cmpl-fake456",
            "created": CREATED,
            "model": body.get("model", "gpt-3.5-turbo-instruct"),
            "object": "text_completion",
        }
        if not body.get("stream"):
            return self._json(
                request,
                {
                    **base,
                    "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 4, "completion_tokens": 6, "total_tokens": 10},
                },
            )
        events = [
            {**base, "choices": [{"text": piece, "index": 0, "logprobs": None, "finish_reason": None}]}
            for piece in _pieces(text)
        ]
        events.append({**base, "choices": [{"text": "", "index": 0, "logprobs": None, "finish_reason": "stop"}]})
        return await self._stream(request, events)

    async def embeddings(self, request: web.Request) -> web.Response:
        body = await self._note(request)
        inputs = body.get("input")
        inputs = inputs if isinstance(inputs, list) else [inputs]
        data = []
        for index, text in enumerate(inputs):
            vector = [round((len(str(text)) + i) / 10, 3) for i in range(4)]
            if body.get("encoding_format") == "base64":
                embedding: Any = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            else:
                embedding = vector
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        return self._json(
            request,
            {
                "object": "list",
                "data": data,
                "model": body.get("model"),
                "usage": {"prompt_tokens": 3, "total_tokens": 3},
            },
        )

    async def models(self, request: web.Request) -> web.Response:
        await self._note(request)
        return self._json(
            request,
            {
                "object": "list",
                "data": [
                    {"id": "gpt-4o", "object": "model", "created": 1715367049, "owned_by": "system"},
                    {"id": "text-embedding-3-small", "object": "model", "created": 1705948997, "owned_by": "system"},
                ],
            },
        )

    async def responses(self, request: web.Request) -> web.StreamResponse:
        body = await self._note(request)
        text = "Responses say: " + str(body.get("input"))[:24]
        response_id, item_id = "resp_fake789", "msg_fake789"
        base = {
            "id": response_id,
            "object": "response",
            "created_at": CREATED,
            "model": body.get("model"),
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
            "error": None,
            "incomplete_details": None,
            "instructions": None,
            "metadata": {},
            "temperature": 1.0,
            "top_p": 1.0,
        }
        part = {"type": "output_text", "text": text, "annotations": []}
        item = {"id": item_id, "type": "message", "status": "completed", "role": "assistant", "content": [part]}
        usage = {
            "input_tokens": 5,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": 6,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": 11,
        }
        done = {**base, "status": "completed", "output": [item], "usage": usage}
        if not body.get("stream"):
            return self._json(request, done)
        events = [
            ("response.created", {"response": {**base, "status": "in_progress", "output": []}}),
            ("response.in_progress", {"response": {**base, "status": "in_progress", "output": []}}),
            (
                "response.output_item.added",
                {"output_index": 0, "item": {**item, "status": "in_progress", "content": []}},
            ),
            (
                "response.content_part.added",
                {"item_id": item_id, "output_index": 0, "content_index": 0, "part": {**part, "text": ""}},
            ),
        ]
        for piece in _pieces(text):
            events.append(
                (
                    "response.output_text.delta",
                    {"item_id": item_id, "output_index": 0, "content_index": 0, "delta": piece, "logprobs": []},
                )
            )
        events += [
            (
                "response.output_text.done",
                {"item_id": item_id, "output_index": 0, "content_index": 0, "text": text, "logprobs": []},
            ),
            ("response.content_part.done", {"item_id": item_id, "output_index": 0, "content_index": 0, "part": part}),
            ("response.output_item.done", {"output_index": 0, "item": item}),
            ("response.completed", {"response": done}),
        ]
        response = web.StreamResponse(headers={**SSE_HEADERS, **self._headers()})
        await response.prepare(request)
        sent = []
        for number, (name, data) in enumerate(events):
            payload = orjson.dumps({"type": name, "sequence_number": number, **data})
            sent.append(b"event: " + name.encode() + b"\ndata: " + payload + b"\n\n")
            await response.write(sent[-1])
        await response.write_eof()
        self.sent.append(b"".join(sent))
        return response

    async def transcription(self, request: web.Request) -> web.Response:
        await self._note(request)
        form = self.requests[-1]["raw"]
        return self._json(request, {"text": f"heard {len(form)} bytes"})

    async def speech(self, request: web.Request) -> web.Response:
        body = await self._note(request)
        audio = b"ID3\x04\x00\x00\x00\x00\x00\x00\xff\xfb\x90\x00" + bytes(range(256)) + body["input"].encode()
        self.sent.append(audio)
        return web.Response(body=audio, content_type="audio/mpeg", headers=self._headers())
