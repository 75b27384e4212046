"""A local upstream speaking Cohere's v2 chat wire format: `event:` + `data:` SSE, tool plans and calls."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from tests.upstreams.wire import Upstream

SSE = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


def _event(data: dict[str, Any]) -> bytes:
    # Each event names itself twice: on the `event:` line and in the JSON `type`.
    return b"event: " + data["type"].encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


class CohereWire(Upstream):
    def __init__(self, *, done_marker: bool = False) -> None:
        super().__init__()
        # The spec says streams end with `data: [DONE]`; the documented examples stop at message-end.
        self.done_marker = done_marker

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v2/chat", self.chat)
        app.router.add_post("/v2/embed", self.embed)
        app.router.add_post("/v2/rerank", self.rerank)
        return app

    async def embed(self, request: web.Request) -> web.Response:
        body = await self.note(request)
        texts = body["texts"]
        vectors = [[round(0.0123456789 * (i + 1) * (j - 1), 10) for j in range(3)] for i in range(len(texts))]
        meta = {"api_version": {"version": "2"}, "billed_units": {"input_tokens": len(texts)}}
        embed_id = f"5807ee2e-0cda-445a-9ec8-{next(self._ids):012d}"
        return self.json(
            {
                "id": embed_id,
                "embeddings": {"float": vectors},
                "texts": texts,
                "meta": meta,
                "response_type": "embeddings_by_type",
            }
        )

    async def rerank(self, request: web.Request) -> web.Response:
        body = await self.note(request)
        query = set(body["query"].lower().split())
        scores = [len(query & set(doc.lower().split())) / (1 + len(query)) for doc in body["documents"]]
        order = sorted(range(len(scores)), key=lambda i: -scores[i])[: body.get("top_n") or len(scores)]
        results = [{"index": i, "relevance_score": scores[i]} for i in order]
        meta = {"api_version": {"version": "2"}, "billed_units": {"search_units": 1}}
        return self.json({"id": f"rerank-{next(self._ids):06d}", "results": results, "meta": meta})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await self.note(request)
        if request.headers.get("Authorization", "").partition(" ")[0] != "Bearer":
            return self.json({"message": "no api key supplied"}, status=401)
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list) or "model" not in body:
            return self.json({"message": "invalid request: model and messages are required"}, status=400)
        chat_id = f"c14c80c3-18eb-4519-9460-{next(self._ids):012d}"
        usage = {
            "billed_units": {"input_tokens": 5, "output_tokens": 26},
            "tokens": {"input_tokens": 71, "output_tokens": 26},
        }
        last = body["messages"][-1].get("content")
        text = last if isinstance(last, str) else " ".join(p.get("text", "") for p in last if isinstance(p, dict))
        tools = body.get("tools")
        if tools:
            name = tools[0]["function"]["name"]
            call = {
                "id": "get_weather_1byjy32y4hvq",
                "type": "function",
                "function": {"name": name, "arguments": '{"city": "Paris"}'},
            }
            message = {"role": "assistant", "tool_plan": f"I will call {name}.", "tool_calls": [call]}
            finish = "TOOL_CALL"
        else:
            message = {"role": "assistant", "content": [{"type": "text", "text": f"Echo: {text}"}]}
            finish = "COMPLETE"
        if body.get("stream") is not True:
            return self.json({"id": chat_id, "finish_reason": finish, "message": message, "usage": usage})
        start = {"role": "assistant", "content": [], "tool_plan": "", "tool_calls": [], "citations": []}
        events = [_event({"id": chat_id, "type": "message-start", "delta": {"message": start}})]
        if tools:
            plan = message["tool_plan"]
            for at in range(0, len(plan), 6):
                events.append(
                    _event({"type": "tool-plan-delta", "delta": {"message": {"tool_plan": plan[at : at + 6]}}})
                )
            opening = {**call, "function": {**call["function"], "arguments": ""}}
            events.append(
                _event({"type": "tool-call-start", "index": 0, "delta": {"message": {"tool_calls": opening}}})
            )
            arguments = call["function"]["arguments"]
            for at in range(0, len(arguments), 5):
                piece = {"function": {"arguments": arguments[at : at + 5]}}
                events.append(
                    _event({"type": "tool-call-delta", "index": 0, "delta": {"message": {"tool_calls": piece}}})
                )
            events.append(_event({"type": "tool-call-end", "index": 0}))
        else:
            reply = message["content"][0]["text"]
            events.append(
                _event(
                    {
                        "type": "content-start",
                        "index": 0,
                        "delta": {"message": {"content": {"type": "text", "text": ""}}},
                    }
                )
            )
            for at in range(0, len(reply), 4):
                events.append(
                    _event(
                        {
                            "type": "content-delta",
                            "index": 0,
                            "delta": {"message": {"content": {"text": reply[at : at + 4]}}},
                        }
                    )
                )
            events.append(_event({"type": "content-end", "index": 0}))
        events.append(_event({"type": "message-end", "delta": {"finish_reason": finish, "usage": usage}}))
        if self.done_marker:
            events.append(b"data: [DONE]\n\n")
        return await self.stream(request, events, SSE)
