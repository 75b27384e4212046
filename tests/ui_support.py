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
