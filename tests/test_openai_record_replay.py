"""Record OpenAI traffic through the real proxy with the real SDK, stop the upstream, replay."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.support import LoopThread, RunningApp, assert_no_secret, files_under, start_proxy
from tests.upstreams.openai_wire import OpenAIWire

API_KEY = "sk-test-RECORDING-KEY-must-never-reach-disk-0123456789"
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "say hello to the proxy"},
]


def _dump(value: Any) -> Any:
    if isinstance(value, list):
        return [_dump(item) for item in value]
    return value.model_dump(mode="json")


SYNC_CALLS: dict[str, Callable[[openai.OpenAI], Any]] = {
    "chat": lambda c: c.chat.completions.create(model="gpt-4o", messages=MESSAGES, temperature=0.2),
    "chat_stream": lambda c: list(
        c.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
    ),
    "completion": lambda c: c.completions.create(model="gpt-3.5-turbo-instruct", prompt="once upon", max_tokens=8),
    "completion_stream": lambda c: list(
        c.completions.create(model="gpt-3.5-turbo-instruct", prompt="once upon", max_tokens=8, stream=True)
    ),
    "embeddings_base64": lambda c: c.embeddings.create(model="text-embedding-3-small", input=["alpha", "beta"]),
    "embeddings_float": lambda c: c.embeddings.create(
        model="text-embedding-3-small", input="gamma", encoding_format="float"
    ),
    "models": lambda c: list(c.models.list()),
}


async def _collect(stream: Any) -> list[Any]:
    return [item async for item in stream]


ASYNC_CALLS: dict[str, Callable[[openai.AsyncOpenAI], Any]] = {
    "chat": lambda c: c.chat.completions.create(model="gpt-4o", messages=MESSAGES, temperature=0.7),
    "chat_stream": lambda c: _stream_chat(c),
    "completion": lambda c: c.completions.create(model="gpt-3.5-turbo-instruct", prompt="async upon", max_tokens=8),
    "completion_stream": lambda c: _stream_completion(c),
    "embeddings_base64": lambda c: c.embeddings.create(model="text-embedding-3-small", input=["delta"]),
    "models": lambda c: _collect(c.models.list()),
}


async def _stream_chat(client: openai.AsyncOpenAI) -> list[Any]:
    stream = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES[1:], stream=True)
    return await _collect(stream)


async def _stream_completion(client: openai.AsyncOpenAI) -> list[Any]:
    stream = await client.completions.create(model="gpt-3.5-turbo-instruct", prompt="async", stream=True)
    return await _collect(stream)


def _run_all(base_url: str) -> dict[str, Any]:
    results: dict[str, Any] = {}
    client = openai.OpenAI(base_url=base_url + "/v1", api_key=API_KEY, max_retries=0)
    for name, call in SYNC_CALLS.items():
        results[f"sync:{name}"] = _dump(call(client))

    async def run_async() -> None:
        async_client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key=API_KEY, max_retries=0)
        for name, call in ASYNC_CALLS.items():
            results[f"async:{name}"] = _dump(await call(async_client))
        await async_client.close()

    asyncio.run(run_async())
    return results


def test_record_then_replay_gives_identical_results(loop_thread: LoopThread, tmp_path: Path) -> None:
    wire = OpenAIWire()
    upstream = RunningApp(loop_thread, wire.app()).start()
    proxy = start_proxy(loop_thread, "record", tmp_path, upstream=upstream.url)
    try:
        recorded = _run_all(proxy.url)
    finally:
        proxy.stop()
        upstream.stop()

    # The upstream really was called, with the client's key, on the real paths.
    paths = {request["path"] for request in wire.requests}
    assert paths == {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models"}
    assert all(request["headers"]["Authorization"] == f"Bearer {API_KEY}" for request in wire.requests)

    files = files_under(tmp_path)
    # One file per exchange: the async model list repeats the sync one and is its sequence 2.
    assert len(files) == len(SYNC_CALLS) + len(ASYNC_CALLS)
    assert len([f for f in files if f.name.startswith("models-") and f.name.endswith("-2.json")]) == 1
    assert_no_secret(tmp_path, API_KEY, "sessioncookie-should-not-be-stored")

    replay = start_proxy(loop_thread, "replay", tmp_path)
    try:
        replayed = _run_all(replay.url)
    finally:
        replay.stop()
    assert replayed == recorded
    assert replay.server.mode.outcome.hits == len(recorded)
    assert replay.server.mode.outcome.misses == 0


def test_recording_file_is_the_seed_format_extended(loop_thread: LoopThread, tmp_path: Path) -> None:
    wire = OpenAIWire()
    upstream = RunningApp(loop_thread, wire.app()).start()
    proxy = start_proxy(loop_thread, "record", tmp_path, upstream=upstream.url)
    try:
        client = openai.OpenAI(base_url=proxy.url + "/v1", api_key=API_KEY, max_retries=0)
        chunks = list(client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True))
    finally:
        proxy.stop()
        upstream.stop()
    [path] = files_under(tmp_path)
    assert path.parent.name == "openai" and path.name.startswith("chat-completions-gpt-4o-")
    text = path.read_text()
    assert text.startswith('{\n  "request": {\n')  # pretty-printed, request first as in the seed
    document = json.loads(text)
    request, response = document["request"], document["response"]
    assert request["method"] == "POST"
    assert request["url"] == upstream.url + "/v1/chat/completions"  # the real URL, no /v1/v1
    assert request["endpoint"] == "/v1/chat/completions"
    assert request["model"] == "gpt-4o"
    assert request["headers"] == {}
    assert request["body"]["messages"] == MESSAGES
    assert response["is_streaming"] is True
    assert response["status"] == 200
    assert response["headers"]["content-type"] == "text/event-stream; charset=utf-8"
    assert response["headers"]["x-request-id"].startswith("req_")
    assert "set-cookie" not in response["headers"]
    assert response["framing"]["end"] == "data: [DONE]\n\n"
    labels = {item["__type__"] for item in response["body"]}
    assert labels == {"openai.types.chat.chat_completion_chunk.ChatCompletionChunk"}
    assert [item["__data__"] for item in response["body"]] == [
        c.model_dump(mode="json", exclude_unset=True) for c in chunks
    ]
    assert len(response["timing"]["chunk_ms"]) == len(chunks)
    assert document["provenance"]["tool"] == "llmproxy"
    assert document["provenance"]["client_user_agent"].startswith("OpenAI/Python")


def test_rerecording_gives_an_identical_file_apart_from_provenance(loop_thread: LoopThread, tmp_path: Path) -> None:
    wire = OpenAIWire()
    upstream = RunningApp(loop_thread, wire.app()).start()
    documents = []
    try:
        for attempt in ("one", "two"):
            directory = tmp_path / attempt
            proxy = start_proxy(loop_thread, "record", directory, upstream=upstream.url)
            client = openai.OpenAI(base_url=proxy.url + "/v1", api_key=API_KEY, max_retries=0)
            list(client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True))
            proxy.stop()
            [path] = files_under(directory)
            documents.append((path.relative_to(directory), json.loads(path.read_text())))
    finally:
        upstream.stop()
    (name_one, first), (name_two, second) = documents
    assert name_one == name_two
    for document in (first, second):
        document.pop("provenance")
        document["response"].pop("timing")
        document["response"]["headers"].pop("x-request-id")  # an id the upstream made
    assert first == second


def test_streamed_chunks_reach_the_client_while_the_upstream_is_still_sending(
    loop_thread: LoopThread, tmp_path: Path
) -> None:
    """The upstream sends one chunk, then waits until the client has it before sending the rest.

    A proxy that held chunks back would deadlock here until the upstream's 10 s wait fails."""
    wire = OpenAIWire()
    wire.gate = asyncio.Event()
    upstream = RunningApp(loop_thread, wire.app()).start()
    proxy = start_proxy(loop_thread, "record", tmp_path, upstream=upstream.url)
    try:
        client = openai.OpenAI(base_url=proxy.url + "/v1", api_key=API_KEY, max_retries=0, timeout=20)
        stream = client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
        iterator = iter(stream)
        first = next(iterator)
        upstream_sent_everything = len(wire.requests) == 1 and wire.gate.is_set()
        loop_thread.loop.call_soon_threadsafe(wire.gate.set)
        rest = list(iterator)
    finally:
        proxy.stop()
        upstream.stop()
    assert first.choices[0].delta.role == "assistant"
    assert not upstream_sent_everything
    assert "".join(c.choices[0].delta.content or "" for c in rest) == "ECHO: SAY HELLO TO THE PROXY"
    assert len(files_under(tmp_path)) == 1


def test_gzip_from_the_upstream_is_decoded_once(loop_thread: LoopThread, tmp_path: Path) -> None:
    wire = OpenAIWire(gzip_json=True)
    upstream = RunningApp(loop_thread, wire.app()).start()
    proxy = start_proxy(loop_thread, "record", tmp_path, upstream=upstream.url)
    try:
        client = openai.OpenAI(base_url=proxy.url + "/v1", api_key=API_KEY, max_retries=0)
        recorded = client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    finally:
        proxy.stop()
        upstream.stop()
    [path] = files_under(tmp_path)
    document = json.loads(path.read_text())
    assert "content-encoding" not in document["response"]["headers"]
    assert (
        document["response"]["body"]["__data__"]["choices"][0]["message"]["content"] == "ECHO: SAY HELLO TO THE PROXY"
    )
    replay = start_proxy(loop_thread, "replay", tmp_path)
    try:
        client = openai.OpenAI(base_url=replay.url + "/v1", api_key="anything", max_retries=0)
        raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES)
        assert "content-encoding" not in raw.headers
        assert raw.parse().model_dump() == recorded.model_dump()
    finally:
        replay.stop()


def test_replay_miss_is_a_404_in_openai_shape_naming_what_is_missing(loop_thread: LoopThread, tmp_path: Path) -> None:
    wire = OpenAIWire()
    upstream = RunningApp(loop_thread, wire.app()).start()
    proxy = start_proxy(loop_thread, "record", tmp_path, upstream=upstream.url)
    try:
        client = openai.OpenAI(base_url=proxy.url + "/v1", api_key=API_KEY, max_retries=0)
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES, temperature=0.7)
    finally:
        proxy.stop()
        upstream.stop()
    replay = start_proxy(loop_thread, "replay", tmp_path)
    try:
        client = openai.OpenAI(base_url=replay.url + "/v1", api_key="anything", max_retries=0)
        with pytest.raises(openai.NotFoundError) as caught:
            client.chat.completions.create(model="gpt-4o", messages=MESSAGES, temperature=0.2)
    finally:
        replay.stop()
    error = caught.value
    assert error.status_code == 404
    body = error.body
    assert isinstance(body, dict) and set(body) >= {"message", "type", "code"}
    message = body["message"]
    assert body["code"] == "recording_not_found"
    assert "POST /v1/chat/completions" in message
    assert "model gpt-4o" in message
    assert "key " in message
    assert "temperature: 0.2 != 0.7 recorded" in message
    assert str(files_under(tmp_path)[0]) in message
    assert "llmproxy record" in message
    assert replay.server.mode.outcome.misses == 1
