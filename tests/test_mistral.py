"""Mistral's native API through the proxy with the official `mistralai` SDK. Its chat path is
OpenAI's, so it is reached through the `/mistral` prefix (or the SDK's user-agent); OpenAI's
route on the same proxy keeps its own traffic, and no key reaches the other's upstream or disk."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import openai
from mistralai.client import Mistral

from tests.providers_support import replayed_bytes_equal_upstream, write_config
from tests.support import LoopThread, RunningApp, assert_no_secret, files_under, start_proxy
from tests.test_providers import dump
from tests.upstreams.mistral_wire import MistralWire
from tests.upstreams.openai_wire import OpenAIWire

MISTRAL_KEY = "mistral-test-SECRET-0123456789abcdef"
OPENAI_KEY = "sk-test-openai-SECRET-0123456789abcdef"
MODEL = "mistral-small-latest"


def _calls(base_url: str) -> dict[str, Any]:
    prefixed = Mistral(api_key=MISTRAL_KEY, server_url=base_url + "/mistral")
    root = Mistral(api_key=MISTRAL_KEY, server_url=base_url)
    messages: Any = [{"role": "user", "content": "Hello there"}]
    out: dict[str, Any] = {}
    out["complete"] = dump(prefixed.chat.complete(model=MODEL, messages=messages))
    out["stream"] = [dump(event.data) for event in prefixed.chat.stream(model=MODEL, messages=messages)]
    out["fim"] = dump(prefixed.fim.complete(model="codestral-latest", prompt="def f(x):\n    x"))
    # The SDK's root URL: its user-agent tells its request from OpenAI's on the same path.
    out["root"] = dump(root.chat.complete(model=MODEL, messages=[{"role": "user", "content": "at the root"}]))
    client = openai.OpenAI(base_url=base_url + "/v1", api_key=OPENAI_KEY, max_retries=0)
    out["openai"] = dump(client.chat.completions.create(model="gpt-4o-mini", messages=messages))
    return out


def test_mistral_chat_stream_and_fim_record_then_replay_beside_openai(loop_thread: LoopThread, tmp_path: Path) -> None:
    mistral, oai = MistralWire(), OpenAIWire()
    mistral_app = RunningApp(loop_thread, mistral.app()).start()
    openai_app = RunningApp(loop_thread, oai.app()).start()
    routes = [
        {"name": "openai", "provider": "openai", "upstream": openai_app.url},
        # No prefix configured: /mistral is the provider's own, and its rules claim root paths.
        {"name": "mistral", "provider": "mistral", "upstream": mistral_app.url},
    ]
    config = write_config(tmp_path / "llmproxy.toml", routes)
    recordings = tmp_path / "recordings"
    proxy = start_proxy(loop_thread, "record", recordings, config=config)
    try:
        recorded = _calls(proxy.url)
    finally:
        proxy.stop()
        mistral_app.stop()
        openai_app.stop()
    replay = start_proxy(loop_thread, "replay", recordings, config=config)
    try:
        replayed = _calls(replay.url)
        # Raw requests without the SDK's user-agent: through the prefix (the root one's too, same route).
        assert replayed_bytes_equal_upstream(loop_thread, mistral, replay.url, prefix="/mistral") == 4
    finally:
        replay.stop()
    assert replay.server.mode.outcome.misses == 0
    assert replayed == recorded
    assert recorded["complete"]["choices"][0]["message"]["content"] == "Echo: Hello there"
    assert "".join(c["choices"][0]["delta"]["content"] for c in recorded["stream"]) == "Echo: Hello there"
    assert recorded["stream"][-1]["usage"]["total_tokens"] == 17
    assert recorded["fim"]["choices"][0]["message"]["content"] == "return x"
    assert recorded["root"]["choices"][0]["message"]["content"] == "Echo: at the root"
    # Each upstream saw only its own provider's requests and keys.
    assert [r["path"] for r in mistral.requests] == ["/v1/chat/completions"] * 2 + ["/v1/fim/completions"] + [
        "/v1/chat/completions"
    ]
    assert {r["headers"]["Authorization"] for r in mistral.requests} == {f"Bearer {MISTRAL_KEY}"}
    assert [r["headers"]["Authorization"] for r in oai.requests] == [f"Bearer {OPENAI_KEY}"]
    assert_no_secret(recordings, MISTRAL_KEY, OPENAI_KEY)
    by_route: dict[str, list[dict[str, Any]]] = {}
    for path in files_under(recordings):
        by_route.setdefault(path.parent.name, []).append(json.loads(path.read_text()))
    assert sorted(by_route) == ["mistral", "openai"] and len(by_route["mistral"]) == 4
    [stream_doc] = [d for d in by_route["mistral"] if d["response"]["is_streaming"]]
    assert stream_doc["response"]["framing"]["end"] == "data: [DONE]\n\n"
    assert stream_doc["response"]["headers"]["content-type"] == "text/event-stream; charset=utf-8"
    assert {i["__type__"] for i in stream_doc["response"]["body"]} == {
        "mistralai.client.models.completionchunk.CompletionChunk"
    }
    labels = {d["response"]["body"]["__type__"] for d in by_route["mistral"] if not d["response"]["is_streaming"]}
    assert labels == {
        "mistralai.client.models.chatcompletionresponse.ChatCompletionResponse",
        "mistralai.client.models.fimcompletionresponse.FIMCompletionResponse",
    }
