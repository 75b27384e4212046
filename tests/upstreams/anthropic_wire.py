"""A local upstream speaking Anthropic's Messages wire format: named SSE events, pings, tool use."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from tests.upstreams.wire import Upstream

SSE = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}


def _event(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


class AnthropicWire(Upstream):
    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/messages", self.messages)
        return app

    def _content(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        last = body["messages"][-1]["content"]
        text = (
            last if isinstance(last, str) else " ".join(part.get("text", "") for part in last if isinstance(part, dict))
        )
        if body.get("tools"):
            tool = body["tools"][0]["name"]
            return [
                {"type": "text", "text": "Let me check."},
                {"type": "tool_use", "id": "toolu_01Fake", "name": tool, "input": {"city": "Paris", "unit": "c"}},
            ]
        return [{"type": "text", "text": f"Echo: {text}"}]

    async def messages(self, request: web.Request) -> web.StreamResponse:
        body = await self.note(request)
        message_id = self.next_id("msg_01")
        headers = {"request-id": self.next_id("req_011C"), "anthropic-organization-id": "org-fake"}
        content = self._content(body)
        stop = "tool_use" if body.get("tools") else "end_turn"
        usage = {"input_tokens": 12, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0, "output_tokens": 7}
        message = {
            "id": message_id,
            "type": "message",
            "role": "assistant",
            "model": body["model"],
            "content": content,
            "stop_reason": stop,
            "stop_sequence": None,
            "usage": usage,
        }
        if not body.get("stream"):
            return self.json(message, headers=headers)
        events = [
            _event(
                "message_start",
                {
                    "type": "message_start",
                    "message": {**message, "content": [], "stop_reason": None, "usage": {**usage, "output_tokens": 1}},
                },
            ),
        ]
        for index, block in enumerate(content):
            if block["type"] == "text":
                events.append(
                    _event(
                        "content_block_start",
                        {"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}},
                    )
                )
                if index == 0:
                    events.append(b'event: ping\ndata: {"type": "ping"}\n\n')
                text = block["text"]
                for start in range(0, len(text), 4):
                    events.append(
                        _event(
                            "content_block_delta",
                            {
                                "type": "content_block_delta",
                                "index": index,
                                "delta": {"type": "text_delta", "text": text[start : start + 4]},
                            },
                        )
                    )
            else:
                events.append(
                    _event(
                        "content_block_start",
                        {"type": "content_block_start", "index": index, "content_block": {**block, "input": {}}},
                    )
                )
                partial = orjson.dumps(block["input"]).decode()
                for start in range(0, len(partial), 9):
                    events.append(
                        _event(
                            "content_block_delta",
                            {
                                "type": "content_block_delta",
                                "index": index,
                                "delta": {"type": "input_json_delta", "partial_json": partial[start : start + 9]},
                            },
                        )
                    )
            events.append(_event("content_block_stop", {"type": "content_block_stop", "index": index}))
        events.append(
            _event(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": stop, "stop_sequence": None},
                    "usage": {"output_tokens": 7},
                },
            )
        )
        events.append(_event("message_stop", {"type": "message_stop"}))
        return await self.stream(request, events, {**SSE, **headers})
