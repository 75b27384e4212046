"""Recording files for the browser's tests and bench: llmproxy's own format, written to disk."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from llmproxy import __version__
from llmproxy.store.directory import RecordingStore
from tests.support import SEED

CHUNK = "openai.types.chat.chat_completion_chunk.ChatCompletionChunk"


def chat_recording(
    question: str,
    answer: str,
    *,
    model: str = "gpt-4o",
    temperature: float = 0.2,
    recorded_at: str = "2025-09-10T12:00:00+00:00",
    prompt_tokens: int = 12,
    completion_tokens: int = 5,
    status: int = 200,
) -> dict[str, Any]:
    """A streamed OpenAI chat recording with include_usage, as `llmproxy record` writes one."""
    words = answer.split(" ")
    pieces = [word if i == 0 else " " + word for i, word in enumerate(words)]

    def chunk(delta: dict[str, Any], finish: str | None = None, usage: dict[str, Any] | None = None) -> dict[str, Any]:
        choices = [{"index": 0, "delta": delta, "finish_reason": finish}] if usage is None else []
        data = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": model, "choices": choices}
        data["usage"] = usage
        return {"__type__": CHUNK, "__data__": data}

    body = [chunk({"role": "assistant", "content": ""})]
    body += [chunk({"content": piece}) for piece in pieces]
    body.append(chunk({}, "stop"))
    body.append(
        chunk(
            {},
            usage={
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        )
    )
    return {
        "request": {
            "method": "POST",
            "url": "https://api.openai.com/v1/chat/completions",
            "headers": {},
            "body": {
                "model": model,
                "messages": [
                    {"role": "system", "content": "You are terse."},
                    {"role": "user", "content": question},
                ],
                "temperature": temperature,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
            "endpoint": "/v1/chat/completions",
            "model": model,
            "route": "openai",
        },
        "response": {
            "status": status,
            "headers": {"content-type": "text/event-stream; charset=utf-8", "x-request-id": "req_1"},
            "body": body,
            "is_streaming": True,
            "framing": {"format": "sse", "line_ending": "\n", "event_field": None, "end": "data: [DONE]\n\n"},
            "timing": {"headers_ms": 80.0, "chunk_ms": [90.0 + 15 * i for i in range(len(body))]},
        },
        "provenance": {
            "tool": "llmproxy",
            "version": __version__,
            "recorded_at": recorded_at,
            "response_model": f"{model}-2024-08-06" if model == "gpt-4o" else model,
            "client_user_agent": "OpenAI/Python 1.0",
        },
    }


def write_recording(root: Path, name: str, document: dict[str, Any]) -> Path:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(RecordingStore.serialize(document))
    return path


def seeded_directory(root: Path) -> Path:
    """The seed recording plus two chat recordings that differ in temperature and answer."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(SEED, root / SEED.name)
    write_recording(root, "openai/chat-capital-a.json", chat_recording("What is the capital of France?", "Paris."))
    write_recording(
        root,
        "openai/chat-capital-b.json",
        chat_recording("What is the capital of France?", "It is Paris.", temperature=0.9),
    )
    return root


def many_recordings(root: Path, count: int) -> Path:
    """`count` distinct recordings, written as fast as the disk allows (bench and load tests)."""
    for number in range(count):
        document = chat_recording(
            f"Question number {number}: what is {number} squared?",
            f"It is {number * number}.",
            model=("gpt-4o", "gpt-4o-mini", "local-model")[number % 3],
            prompt_tokens=10 + number % 7,
            completion_tokens=3 + number % 5,
        )
        write_recording(root, f"openai/{number // 1000:02d}/chat-{number:05d}.json", document)
    return root


def _own(route: str, endpoint: str, body: Any, response: Any, *, streamed: bool = False, fmt: str = "json") -> dict:
    framing: dict[str, Any] = {"format": fmt}
    if fmt == "sse":
        framing |= {"line_ending": "\n", "event_field": "type", "end": ""}
    if fmt == "ndjson":
        framing |= {"line_ending": "\n", "end": ""}
    return {
        "request": {
            "method": "POST",
            "url": "http://upstream" + endpoint,
            "headers": {},
            "body": body,
            "endpoint": endpoint,
            "model": body.get("model", ""),
            "route": route,
        },
        "response": {"status": 200, "headers": {}, "body": response, "is_streaming": streamed, "framing": framing},
        "provenance": {"tool": "llmproxy", "version": __version__, "recorded_at": "2025-09-10T12:00:00+00:00"},
    }


PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="


def provider_recordings() -> dict[str, dict[str, Any]]:
    """One recording per provider shape, each with system, user (with an image), a tool call and
    its result, and an answer; the expected bubbles are in the tests."""
    anthropic_stream = [
        {"type": "message_start", "message": {"usage": {"input_tokens": 30, "output_tokens": 1}}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "It is "}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "sunny."}},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 6}},
        {"type": "message_stop"},
    ]
    return {
        "openai-chat": _own(
            "openai",
            "/v1/chat/completions",
            {
                "model": "gpt-4o",
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "Weather here?"},
                            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + PNG}},
                        ],
                    },
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [
                            {
                                "id": "c1",
                                "type": "function",
                                "function": {"name": "weather", "arguments": '{"c":"Oslo"}'},
                            }
                        ],
                    },
                    {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
                ],
            },
            {
                "__type__": "openai.types.chat.chat_completion.ChatCompletion",
                "__data__": {
                    "object": "chat.completion",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "It is sunny."}}],
                    "usage": {"prompt_tokens": 30, "completion_tokens": 6, "total_tokens": 36},
                },
            },
        ),
        "openai-responses": _own(
            "openai",
            "/v1/responses",
            {
                "model": "gpt-4o",
                "instructions": "Be brief.",
                "input": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "input_text", "text": "Weather here?"},
                            {"type": "input_image", "image_url": "data:image/png;base64," + PNG},
                        ],
                    },
                    {"type": "function_call", "call_id": "c1", "name": "weather", "arguments": '{"c":"Oslo"}'},
                    {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
                ],
            },
            {
                "__type__": "openai.types.responses.response.Response",
                "__data__": {
                    "object": "response",
                    "output": [
                        {
                            "type": "message",
                            "role": "assistant",
                            "content": [{"type": "output_text", "text": "It is sunny."}],
                        }
                    ],
                    "usage": {"input_tokens": 30, "output_tokens": 6},
                },
            },
        ),
        "anthropic": _own(
            "anthropic",
            "/v1/messages",
            {
                "model": "claude-sonnet-4-5",
                "system": "Be brief.",
                "stream": True,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "Weather here?"},
                            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
                        ],
                    },
                    {
                        "role": "assistant",
                        "content": [{"type": "tool_use", "id": "t1", "name": "weather", "input": {"c": "Oslo"}}],
                    },
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "sunny"}]},
                ],
            },
            [
                {"__type__": "anthropic.types.raw_message_stream_event.RawMessageStreamEvent", "__data__": e}
                for e in anthropic_stream
            ],
            streamed=True,
            fmt="sse",
        ),
        "ollama": _own(
            "ollama",
            "/api/chat",
            {
                "model": "llama3.2",
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Weather here?", "images": [PNG]},
                    {
                        "role": "assistant",
                        "content": "",
                        "tool_calls": [{"function": {"name": "weather", "arguments": {"c": "Oslo"}}}],
                    },
                    {"role": "tool", "content": "sunny"},
                ],
            },
            [
                {
                    "__type__": "ollama._types.ChatResponse",
                    "__data__": {"message": {"role": "assistant", "content": "It is "}, "done": False},
                },
                {
                    "__type__": "ollama._types.ChatResponse",
                    "__data__": {"message": {"role": "assistant", "content": "sunny."}, "done": False},
                },
                {
                    "__type__": "ollama._types.ChatResponse",
                    "__data__": {
                        "message": {"role": "assistant", "content": ""},
                        "done": True,
                        "prompt_eval_count": 30,
                        "eval_count": 6,
                    },
                },
            ],
            streamed=True,
            fmt="ndjson",
        ),
        "gemini": _own(
            "gemini",
            "/v1beta/models/gemini-2.0-flash:generateContent",
            {
                "systemInstruction": {"parts": [{"text": "Be brief."}]},
                "contents": [
                    {
                        "role": "user",
                        "parts": [{"text": "Weather here?"}, {"inlineData": {"mimeType": "image/png", "data": PNG}}],
                    },
                    {"role": "model", "parts": [{"functionCall": {"name": "weather", "args": {"c": "Oslo"}}}]},
                    {
                        "role": "user",
                        "parts": [{"functionResponse": {"name": "weather", "response": {"result": "sunny"}}}],
                    },
                ],
            },
            {
                "__type__": "google.genai.types.GenerateContentResponse",
                "__data__": {
                    "candidates": [
                        {"content": {"role": "model", "parts": [{"text": "It is sunny."}]}, "finishReason": "STOP"}
                    ],
                    "usageMetadata": {"promptTokenCount": 30, "candidatesTokenCount": 6},
                },
            },
        ),
    }
