"""Cohere v2 chat through the proxy with the official `cohere` SDK: record against a local upstream
speaking Cohere's wire format, stop it, replay, and compare parsed results and wire bytes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import cohere
import pytest

from llmproxy.providers import get_provider
from llmproxy.routing import Router, default_routes
from llmproxy.tools.explain import show
from tests.providers_support import write_config
from tests.support import LoopThread, RunningApp, assert_no_secret, files_under, start_proxy
from tests.test_providers import dump, record_and_replay
from tests.upstreams.cohere_wire import CohereWire

COHERE_KEY = "co-test-SECRET-key-0123456789abcdef"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]


def _calls(base_url: str) -> dict[str, Any]:
    client = cohere.ClientV2(api_key=COHERE_KEY, base_url=base_url)
    # The provider's own prefix, as `llmproxy run` sets CO_API_URL.
    prefixed = cohere.ClientV2(api_key=COHERE_KEY, base_url=base_url + "/cohere")
    no_retry: Any = {"max_retries": 0}
    messages: Any = [{"role": "user", "content": "Hello there"}]
    out: dict[str, Any] = {}
    out["chat"] = dump(client.chat(model="command-a-03-2025", messages=messages, request_options=no_retry))
    out["stream"] = dump(
        list(client.chat_stream(model="command-a-03-2025", messages=messages, request_options=no_retry))
    )
    model = "command-a-03-2025"
    out["tools"] = dump(client.chat(model=model, messages=messages, tools=TOOLS, request_options=no_retry))
    out["tools_stream"] = dump(
        list(prefixed.chat_stream(model="command-a-03-2025", messages=messages, tools=TOOLS, request_options=no_retry))
    )
    out["embed"] = dump(
        prefixed.embed(
            model="embed-v4.0", texts=["one", "two"], input_type="search_document", embedding_types=["float"]
        )
    )
    out["rerank"] = dump(
        client.rerank(model="rerank-v3.5", query="blue sky", documents=["the sky is blue", "grass"], top_n=2)
    )
    return out


@pytest.mark.parametrize("done_marker", [False, True], ids=["ends-at-message-end", "ends-with-DONE"])
def test_cohere_chat_and_chat_stream_record_then_replay(
    loop_thread: LoopThread, tmp_path: Path, done_marker: bool
) -> None:
    upstream = CohereWire(done_marker=done_marker)
    recorded, replayed, recordings = record_and_replay(
        loop_thread, tmp_path, upstream, [{"name": "cohere", "provider": "cohere"}], _calls
    )
    assert replayed == recorded
    assert recorded["chat"]["message"]["content"][0]["text"] == "Echo: Hello there"
    streamed = "".join(
        e["delta"]["message"]["content"]["text"] for e in recorded["stream"] if e["type"] == "content-delta"
    )
    assert streamed == "Echo: Hello there"
    kinds = [e["type"] for e in recorded["stream"]]
    assert kinds[:2] == ["message-start", "content-start"] and kinds[-2:] == ["content-end", "message-end"]
    assert recorded["tools"]["finish_reason"] == "TOOL_CALL"
    assert recorded["tools_stream"][-1]["delta"]["finish_reason"] == "TOOL_CALL"
    assert {e["type"] for e in recorded["tools_stream"]} >= {"tool-plan-delta", "tool-call-start", "tool-call-delta"}
    # The key went upstream as the SDK sent it, and nowhere to disk.
    assert all(r["headers"]["Authorization"] == f"Bearer {COHERE_KEY}" for r in upstream.requests)
    assert [r["path"] for r in upstream.requests] == ["/v2/chat"] * 4 + ["/v2/embed", "/v2/rerank"]
    assert recorded["embed"]["embeddings"]["float"][1] == [-0.0246913578, 0.0, 0.0246913578]
    assert [r["index"] for r in recorded["rerank"]["results"]] == [0, 1]
    assert_no_secret(recordings, COHERE_KEY)
    documents = [json.loads(p.read_text()) for p in files_under(recordings)]
    assert len(documents) == 6
    labels = {
        d["request"]["endpoint"]: d["response"]["body"]["__type__"]
        for d in documents
        if "/v2/chat" not in d["request"]["endpoint"]
    }
    assert labels == {
        "/v2/embed": "cohere.types.embed_by_type_response.EmbedByTypeResponse",
        "/v2/rerank": "cohere.v2.types.v2rerank_response.V2RerankResponse",
    }
    assert {p.parent.name for p in files_under(recordings)} == {"cohere"}
    streams = [d for d in documents if d["response"]["is_streaming"]]
    assert len(streams) == 2
    for document in streams:
        framing = document["response"]["framing"]
        assert framing["event_field"] == "type"
        assert framing["end"] == ("data: [DONE]\n\n" if done_marker else "")
        assert "verbatim" not in framing
        assert document["response"]["headers"]["content-type"] == "text/event-stream"
        assert document.get("response", {}).get("truncated") is not True
        labels = {item["__type__"] for item in document["response"]["body"]}
        assert labels == {"cohere.v2.types.v2chat_stream_response.V2ChatStreamResponse"}
        assert document["request"]["model"] == "command-a-03-2025"
    chats = [d for d in documents if d["request"]["endpoint"] == "/v2/chat"]
    [plain] = [d for d in chats if not d["response"]["is_streaming"] and "tools" not in d["request"]["body"]]
    assert plain["response"]["body"]["__type__"] == "cohere.v2.types.v2chat_response.V2ChatResponse"
    # `llmproxy show` reads the conversation out of both shapes.
    router = Router(default_routes())

    def resolve(method: str, path: str) -> Any:
        match = router.resolve(method, path, {})
        return match.route.provider if match else None

    [text_stream] = [d for d in streams if "tools" not in d["request"]["body"]]
    for document in (plain, text_stream):
        shown = show(Path("x.json"), document, resolve)
        assert "[user] Hello there" in shown and "[assistant] Echo: Hello there" in shown, shown


def test_another_providers_key_on_the_cohere_path_never_reaches_cohere(loop_thread: LoopThread, tmp_path: Path) -> None:
    upstream = CohereWire()
    app = RunningApp(loop_thread, upstream.app()).start()
    config = write_config(tmp_path / "llmproxy.toml", [{"name": "cohere", "provider": "cohere", "upstream": app.url}])
    proxy = start_proxy(loop_thread, "record", tmp_path / "recordings", config=config)
    anthropic_key = "sk-ant-api03-SECRET-0123456789abcdef"

    async def send() -> tuple[int, Any]:
        async with aiohttp.ClientSession() as session:
            body = {"model": "command-a-03-2025", "messages": [{"role": "user", "content": "hi"}], "stream": False}
            headers = {"x-api-key": anthropic_key, "anthropic-version": "2023-06-01"}
            async with session.post(proxy.url + "/cohere/v2/chat", json=body, headers=headers) as response:
                return response.status, await response.json()

    try:
        status, answer = loop_thread.run(send())
    finally:
        proxy.stop()
        app.stop()
    assert status == 400
    # In the shape of the client's own provider (Anthropic's), whose SDK then shows the message.
    assert answer["type"] == "error" and "x-api-key" in answer["error"]["message"]
    assert upstream.requests == []
    assert not (tmp_path / "recordings").exists() or not files_under(tmp_path / "recordings")


def test_a_replay_miss_is_the_cohere_sdks_own_not_found_error(loop_thread: LoopThread, tmp_path: Path) -> None:
    (tmp_path / "recordings").mkdir()
    proxy = start_proxy(loop_thread, "replay", tmp_path / "recordings")
    try:
        client = cohere.ClientV2(api_key="placeholder", base_url=proxy.url + "/cohere")
        messages: Any = [{"role": "user", "content": "never recorded"}]
        with pytest.raises(cohere.NotFoundError) as plain:
            client.chat(model="command-a-03-2025", messages=messages, request_options={"max_retries": 0})
        with pytest.raises(cohere.NotFoundError) as streamed:
            list(client.chat_stream(model="command-a-03-2025", messages=messages))
    finally:
        proxy.stop()
    for caught in (plain, streamed):
        assert "no recording for POST /v2/chat" in caught.value.body["message"]


def test_a_cohere_stream_file_without_framing_replays_with_event_lines(loop_thread: LoopThread, tmp_path: Path) -> None:
    # A hand-written (or other recorder's) file stores no framing: Cohere's default names each event.
    events = [
        {"id": "c1", "type": "message-start", "delta": {"message": {"role": "assistant"}}},
        {"type": "content-delta", "index": 0, "delta": {"message": {"content": {"text": "Hi"}}}},
        {"type": "message-end", "delta": {"finish_reason": "COMPLETE"}},
    ]
    label = "cohere.v2.types.v2chat_stream_response.V2ChatStreamResponse"
    body = {"model": "command-a-03-2025", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    document = {
        "request": {"method": "POST", "url": "https://api.cohere.com/v2/chat", "endpoint": "/v2/chat", "body": body},
        "response": {"body": [{"__type__": label, "__data__": e} for e in events], "is_streaming": True},
        "provenance": {"tool": "llmproxy"},
    }
    (tmp_path / "cohere").mkdir()
    (tmp_path / "cohere" / "chat.json").write_text(json.dumps(document, indent=2))
    proxy = start_proxy(loop_thread, "replay", tmp_path)

    async def send() -> bytes:
        async with aiohttp.ClientSession() as session:
            async with session.post(proxy.url + "/cohere/v2/chat", json=body) as response:
                assert response.status == 200 and response.content_type == "text/event-stream"
                return await response.read()

    try:
        wire = loop_thread.run(send())
        client = cohere.ClientV2(api_key="placeholder", base_url=proxy.url)
        parsed = list(client.chat_stream(model=body["model"], messages=body["messages"]))
    finally:
        proxy.stop()
    assert wire == b"".join(
        b"event: " + e["type"].encode() + b"\ndata: " + json.dumps(e, separators=(",", ":")).encode() + b"\n\n"
        for e in events
    )
    assert [e.type for e in parsed] == ["message-start", "content-delta", "message-end"]


def test_cohere_labels_name_the_sdk_types_and_errors_stay_plain_json() -> None:
    cohere_provider = get_provider("cohere")
    chat = {"id": "x", "finish_reason": "COMPLETE", "message": {"role": "assistant", "content": []}}
    assert cohere_provider.label("/v2/chat", False, chat) == "cohere.v2.types.v2chat_response.V2ChatResponse"
    assert cohere_provider.label("/v2/chat", False, {"message": "invalid api token"}) == "json"
    assert cohere_provider.label("/v2/embed", False, {"message": "too many texts"}) == "json"
    end = {"type": "message-end", "delta": {"finish_reason": "COMPLETE"}}
    assert cohere_provider.stream_complete("/v2/chat", [end], "")
    assert cohere_provider.stream_complete("/v2/chat", [{"type": "content-delta"}], "data: [DONE]\n\n")
    assert not cohere_provider.stream_complete("/v2/chat", [{"type": "content-delta"}], "")
