"""Conformance: every file of another recorder (../shared/corpus/llamastack) replays its response.

The request each file answered is worked out here from the corpus README's rules, on purpose
independently of llmproxy's own normaliser: the response's `__type__` names the real call,
`extra_body` is merged into the wire body, raw-SSE files carry `url`/`method`/`payload`.
Files that share a request are replayed in file-name order, one response each.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest

from tests.support import CORPUS, LoopThread, sse_data, start_proxy

# What each SDK type answers, per the README ("trust __type__ over endpoint").
REAL_CALL = {
    "openai.types.chat.chat_completion.ChatCompletion": ("POST", "/v1/chat/completions"),
    "openai.types.chat.chat_completion_chunk.ChatCompletionChunk": ("POST", "/v1/chat/completions"),
    "openai.types.completion.Completion": ("POST", "/v1/completions"),
    "openai.types.create_embedding_response.CreateEmbeddingResponse": ("POST", "/v1/embeddings"),
    "openai.types.model.Model": ("GET", "/v1/models"),
    "ollama._types.ChatResponse": ("POST", "/api/chat"),
    "ollama._types.GenerateResponse": ("POST", "/api/generate"),
    "ollama._types.EmbedResponse": ("POST", "/api/embed"),
    "ollama._types.ListResponse": ("GET", "/api/tags"),
    "ollama._types.ProcessResponse": ("GET", "/api/ps"),
    "ollama._types.ProgressResponse": ("POST", "/api/pull"),
}

FILES = sorted(CORPUS.glob("*.json")) if CORPUS.is_dir() else []
needs_corpus = pytest.mark.skipif(not FILES, reason=f"conformance corpus not found at {CORPUS}")


def _label(body: Any) -> str | None:
    item = body[0] if isinstance(body, list) and body else body
    return item.get("__type__") if isinstance(item, dict) else None


def _wire_request(document: dict[str, Any]) -> tuple[str, str, Any]:
    request = document["request"]
    body = request.get("body", request.get("payload"))
    if isinstance(body, dict) and "extra_body" in body:
        body = {k: v for k, v in body.items() if k != "extra_body"} | body["extra_body"]
    label = _label(document["response"].get("body"))
    if label in REAL_CALL:
        method, path = REAL_CALL[label]
    else:
        method = request["method"]
        path = request.get("endpoint") or urlsplit(request["url"]).path
    return method, path, None if method == "GET" else body


def _check(document: dict[str, Any], status: int, content_type: str, raw: bytes) -> None:
    response = document["response"]
    body = response.get("body")
    if response.get("is_exception"):
        details = response["exception_data"]
        assert status == details["status_code"]
        assert json.loads(raw)["error"] == details["body"]
        return
    assert status == response.get("status", 200)
    if isinstance(body, list) and body and isinstance(body[0], str):
        # Raw SSE lines: the wire text is exactly those lines.
        assert raw.decode() == "".join(line + "\n" for line in body)
        assert content_type.startswith("text/event-stream")
        return
    expected = [item["__data__"] for item in body] if isinstance(body, list) else body
    if isinstance(body, dict) and "__type__" in body:
        expected = body["__data__"]
    label = _label(body)
    if response.get("is_streaming"):
        if label and label.startswith("ollama."):
            assert content_type.startswith("application/x-ndjson")
            lines = raw.decode().split("\n")
            assert lines[-1] == "" and all(lines[:-1])  # no blank lines: ollama-python needs that
            assert [json.loads(line) for line in lines[:-1]] == expected
        else:
            assert content_type.startswith("text/event-stream")
            assert sse_data(raw) == expected
            if label and label.startswith("openai.types.c"):
                assert raw.endswith(b"data: [DONE]\n\n")
        return
    value = json.loads(raw)
    assert content_type.startswith("application/json")
    if label == "openai.types.model.Model":
        assert value == {"object": "list", "data": expected}
    else:
        assert value == expected


@needs_corpus
def test_every_corpus_file_loads(loop_thread: LoopThread) -> None:
    proxy = start_proxy(loop_thread, "replay", CORPUS)
    try:
        index = proxy.server.mode.index
        assert index.problems == []
        assert len(index) == len(FILES) == 77
    finally:
        proxy.stop()


@needs_corpus
def test_every_corpus_file_replays_its_recorded_response(loop_thread: LoopThread) -> None:
    proxy = start_proxy(loop_thread, "replay", CORPUS)

    async def replay_all() -> list[str]:
        failures = []
        async with aiohttp.ClientSession(auto_decompress=False) as session:
            for path in FILES:
                document = json.loads(path.read_text())
                method, wire_path, body = _wire_request(document)
                kwargs: dict[str, Any] = {} if body is None else {"json": body}
                async with session.request(method, proxy.url + wire_path, **kwargs) as response:
                    raw = await response.read()
                    try:
                        _check(document, response.status, response.headers.get("Content-Type", ""), raw)
                    except (AssertionError, ValueError) as exc:
                        failures.append(f"{path.name}: {method} {wire_path} -> {response.status} {exc!r}"[:400])
        return failures

    try:
        failures = loop_thread.run(replay_all(), timeout=120)
    finally:
        proxy.stop()
    assert failures == []
    assert proxy.server.mode.outcome.misses == 0


@needs_corpus
def test_openai_corpus_streams_replay_through_the_sdk(loop_thread: LoopThread) -> None:
    import openai

    proxy = start_proxy(loop_thread, "replay", CORPUS)
    try:
        client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="none", max_retries=0)
        streams = []
        for path in FILES:
            document = json.loads(path.read_text())
            if _label(document["response"]["body"]) == "openai.types.chat.chat_completion_chunk.ChatCompletionChunk":
                streams.append((path, document, _wire_request(document)[2]))
        bodies = [json.dumps(body, sort_keys=True) for _, _, body in streams]
        checked = 0
        for (path, document, body), canonical in zip(streams, bodies):
            if bodies.count(canonical) > 1:
                continue  # shared requests are served in file order: covered by the raw test above
            rest = {k: v for k, v in body.items() if k not in ("model", "messages", "stream")}
            chunks = list(
                client.chat.completions.create(
                    model=body["model"], messages=body["messages"], stream=True, extra_body=rest or None
                )
            )
            response = document["response"]
            got = [chunk.model_dump(mode="json", exclude_unset=True) for chunk in chunks]
            assert got == [item["__data__"] for item in response["body"]], path.name
            checked += 1
        assert checked >= 5
    finally:
        proxy.stop()
