"""Every provider, wire-exact: record with the real SDK against a local upstream speaking the
provider's format, stop the upstream, replay, and compare parsed results and wire bytes."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anthropic
import ollama
import openai
import pytest
from google import genai
from google.genai import types as genai_types

from tests.providers_support import replayed_bytes_equal_upstream, write_config
from tests.support import LoopThread, RunningApp, assert_no_secret, files_under, start_proxy
from tests.upstreams.anthropic_wire import AnthropicWire
from tests.upstreams.gemini_wire import GeminiWire
from tests.upstreams.ollama_wire import OllamaWire
from tests.upstreams.openai_wire import OpenAIWire

SECRET = "sk-ant-test-SECRET-0123456789abcdef-never-on-disk"


def dump(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [dump(item) for item in value]
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    return value


def record_and_replay(
    loop: LoopThread,
    tmp_path: Path,
    upstream: Any,
    routes: list[dict[str, Any]],
    calls: Callable[[str], Any],
    prefix: str = "",
) -> tuple[Any, Any, Any]:
    """Run `calls` through a recording proxy, stop the upstream, run them again on replay."""
    app = RunningApp(loop, upstream.app()).start()
    config = write_config(tmp_path / "llmproxy.toml", [{**r, "upstream": r.get("upstream", app.url)} for r in routes])
    recordings = tmp_path / "recordings"
    proxy = start_proxy(loop, "record", recordings, config=config)
    try:
        recorded = calls(proxy.url)
    finally:
        proxy.stop()
        app.stop()
    replay = start_proxy(loop, "replay", recordings, config=config)
    try:
        replayed = calls(replay.url)
        compared = replayed_bytes_equal_upstream(loop, upstream, replay.url, prefix)
        assert compared == len(upstream.requests)
    finally:
        replay.stop()
    assert replay.server.mode.outcome.misses == 0
    return recorded, replayed, recordings


@pytest.fixture
def anthropic_wire() -> Iterator[AnthropicWire]:
    yield AnthropicWire()


TOOLS = [
    {
        "name": "get_weather",
        "description": "Weather for a city",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    }
]


def test_anthropic_messages_streams_helper_and_tools(loop_thread: LoopThread, tmp_path: Path) -> None:
    upstream = AnthropicWire()

    def calls(base_url: str) -> dict[str, Any]:
        client = anthropic.Anthropic(base_url=base_url, api_key=SECRET, max_retries=0)
        messages = [{"role": "user", "content": "Hello there"}]
        out: dict[str, Any] = {}
        created = client.messages.create(model="claude-test", max_tokens=64, messages=messages)
        out["create"] = dump(created)
        out["request_id"] = created._request_id
        out["stream_events"] = dump(
            list(client.messages.create(model="claude-test", max_tokens=64, messages=messages, stream=True))
        )
        with client.messages.stream(
            model="claude-test", max_tokens=32, messages=[{"role": "user", "content": "via the helper"}]
        ) as stream:
            out["helper_text"] = "".join(stream.text_stream)
            out["helper_final"] = dump(stream.get_final_message())
        out["tools"] = dump(client.messages.create(model="claude-test", max_tokens=64, messages=messages, tools=TOOLS))
        with client.messages.stream(model="claude-test", max_tokens=64, messages=messages, tools=TOOLS) as stream:
            out["tools_stream_final"] = dump(stream.get_final_message())
        return out

    recorded, replayed, recordings = record_and_replay(
        loop_thread, tmp_path, upstream, [{"name": "anthropic", "provider": "anthropic"}], calls
    )
    assert replayed == recorded
    assert recorded["helper_text"] == "Echo: via the helper"
    assert recorded["stream_events"][2]["type"] == "content_block_delta"  # the ping was skipped by the SDK
    assert recorded["tools_stream_final"]["content"][1]["input"] == {"city": "Paris", "unit": "c"}
    assert recorded["request_id"].startswith("req_011C")
    assert_no_secret(recordings, SECRET)
    streamed = [json.loads(p.read_text()) for p in files_under(recordings)]
    stream_file = next(d for d in streamed if d["response"]["is_streaming"])
    assert stream_file["response"]["framing"]["event_field"] == "type"
    labels = {item["__type__"] for item in stream_file["response"]["body"]}
    assert labels == {"anthropic.types.raw_message_stream_event.RawMessageStreamEvent"}
    # The SDK skips pings, but they are on the wire, so they are kept (and replayed).
    assert {"type": "ping"} in [item["__data__"] for item in stream_file["response"]["body"]]


def test_openai_responses_api_streams_and_helper(loop_thread: LoopThread, tmp_path: Path) -> None:
    upstream = OpenAIWire()

    def calls(base_url: str) -> dict[str, Any]:
        client = openai.OpenAI(base_url=base_url + "/v1", api_key=SECRET, max_retries=0)
        out = {"create": dump(client.responses.create(model="gpt-4.1", input="plain"))}
        out["events"] = dump(list(client.responses.create(model="gpt-4.1", input="stream me", stream=True)))
        with client.responses.stream(model="gpt-4.1", input="helper") as stream:
            out["helper_deltas"] = [event.delta for event in stream if event.type == "response.output_text.delta"]
            out["helper_final"] = dump(stream.get_final_response())
        return out

    recorded, replayed, recordings = record_and_replay(
        loop_thread, tmp_path, upstream, [{"name": "openai", "provider": "openai"}], calls
    )
    assert replayed == recorded
    assert [e["sequence_number"] for e in recorded["events"]] == list(range(len(recorded["events"])))
    assert recorded["helper_final"]["output"][0]["content"][0]["text"] == "Responses say: helper"
    documents = [json.loads(p.read_text()) for p in files_under(recordings)]
    streamed = [d for d in documents if d["response"]["is_streaming"]]
    assert all(d["response"]["framing"]["end"] == "" for d in streamed)  # no [DONE] in Responses
    assert all(d["response"]["framing"]["event_field"] == "type" for d in streamed)


def test_azure_openai_deployments_and_v1_paths(loop_thread: LoopThread, tmp_path: Path) -> None:
    upstream = OpenAIWire()
    azure_key = "azure-KEY-0123456789abcdef0123456789"

    def calls(base_url: str) -> dict[str, Any]:
        client = openai.AzureOpenAI(azure_endpoint=base_url, api_version="2024-10-21", api_key=azure_key, max_retries=0)
        out = {
            "chat": dump(
                client.chat.completions.create(model="my-gpt4o", messages=[{"role": "user", "content": "azure"}])
            )
        }
        out["stream"] = dump(
            list(
                client.chat.completions.create(
                    model="my-gpt4o", messages=[{"role": "user", "content": "s"}], stream=True
                )
            )
        )
        out["embed"] = dump(client.embeddings.create(model="my-embedder", input="x"))
        # Unprefixed, /openai/v1/ is the OpenAI prefix: Azure's v1 API goes through the /azure prefix.
        v1 = openai.OpenAI(base_url=base_url + "/azure/openai/v1/", api_key=azure_key, max_retries=0)
        out["v1"] = dump(v1.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "v1"}]))
        return out

    recorded, replayed, recordings = record_and_replay(
        loop_thread, tmp_path, upstream, [{"name": "azure", "provider": "azure"}], calls, prefix="/azure"
    )
    assert replayed == recorded
    first = upstream.requests[0]
    assert first["path_qs"] == "/openai/deployments/my-gpt4o/chat/completions?api-version=2024-10-21"
    assert first["headers"]["api-key"] == azure_key
    assert_no_secret(recordings, azure_key)
    names = {p.name.split("-")[0] for p in files_under(recordings)}
    assert names == {"openai"}  # openai-deployments-my-gpt4o-chat-completions-..., openai-v1-chat-...
    assert upstream.requests[-1]["path"] == "/openai/v1/chat/completions"
    # api-version is part of the request identity: another version is a miss, not a wrong answer.
    replay = start_proxy(loop_thread, "replay", recordings, config=tmp_path / "llmproxy.toml")
    try:
        other = openai.AzureOpenAI(azure_endpoint=replay.url, api_version="2025-01-01", api_key="x", max_retries=0)
        with pytest.raises(openai.NotFoundError) as caught:
            other.chat.completions.create(model="my-gpt4o", messages=[{"role": "user", "content": "azure"}])
        assert "api-version" in str(caught.value)
    finally:
        replay.stop()


def test_ollama_native_api(loop_thread: LoopThread, tmp_path: Path) -> None:
    upstream = OllamaWire()

    def calls(base_url: str) -> dict[str, Any]:
        client = ollama.Client(host=base_url)
        out: dict[str, Any] = {}
        out["chat"] = dump(client.chat(model="llama3.2", messages=[{"role": "user", "content": "hi there"}]))
        out["chat_stream"] = dump(
            list(client.chat(model="llama3.2", messages=[{"role": "user", "content": "stream it"}], stream=True))
        )
        out["generate"] = dump(client.generate(model="llama3.2", prompt="upon a time"))
        out["generate_stream"] = dump(list(client.generate(model="llama3.2", prompt="stream", stream=True)))
        out["embed"] = dump(client.embed(model="all-minilm", input=["a", "bb"]))
        out["list"] = dump(client.list())
        out["show"] = dump(client.show("llama3.2"))
        out["ps"] = dump(client.ps())
        return out

    recorded, replayed, recordings = record_and_replay(
        loop_thread, tmp_path, upstream, [{"name": "ollama", "provider": "ollama"}], calls
    )
    assert replayed == recorded
    assert "".join(c["message"]["content"] for c in recorded["chat_stream"]) == "Hello from stream it"
    documents = [json.loads(p.read_text()) for p in files_under(recordings)]
    streams = [d for d in documents if d["response"]["is_streaming"]]
    assert len(streams) == 2
    assert all(d["response"]["framing"]["format"] == "ndjson" for d in streams)
    assert all(d["response"]["headers"]["content-type"] == "application/x-ndjson" for d in streams)


def test_gemini_generate_stream_and_embed(loop_thread: LoopThread, tmp_path: Path) -> None:
    upstream = GeminiWire()
    google_key = "AIzaSyFAKE-gemini-key-0123456789abcdefg"

    def calls(base_url: str) -> dict[str, Any]:
        client = genai.Client(api_key=google_key, http_options=genai_types.HttpOptions(base_url=base_url))
        out: dict[str, Any] = {}
        out["generate"] = dump(
            client.models.generate_content(model="gemini-2.0-flash", contents="Why is the sky blue?")
        )
        out["stream"] = dump(
            list(client.models.generate_content_stream(model="gemini-2.0-flash", contents="Tell me a story"))
        )
        out["embed"] = dump(client.models.embed_content(model="text-embedding-004", contents=["one", "two"]))
        return out

    recorded, replayed, recordings = record_and_replay(
        loop_thread, tmp_path, upstream, [{"name": "gemini", "provider": "gemini"}], calls
    )
    for result in (recorded, replayed):
        for value in result.values():  # the SDK keeps the raw HTTP headers; they are not content
            for item in value if isinstance(value, list) else [value]:
                item.pop("sdk_http_response", None)
    assert replayed == recorded
    assert "".join(c["candidates"][0]["content"]["parts"][0]["text"] for c in recorded["stream"]).startswith("Hi from")
    stream_request = next(r for r in upstream.requests if "stream" in r["path"])
    assert stream_request["query"] == {"alt": "sse"}
    assert stream_request["headers"]["x-goog-api-key"] == google_key
    assert_no_secret(recordings, google_key)
    documents = [json.loads(p.read_text()) for p in files_under(recordings)]
    [stream_doc] = [d for d in documents if d["response"]["is_streaming"]]
    assert stream_doc["response"]["framing"]["line_ending"] == "\r\n"
    assert stream_doc["response"]["framing"]["end"] == ""


def test_one_instance_records_openai_anthropic_and_ollama_then_replays_all(
    loop_thread: LoopThread, tmp_path: Path
) -> None:
    upstreams = {"openai": OpenAIWire(), "anthropic": AnthropicWire(), "ollama": OllamaWire()}
    apps = {name: RunningApp(loop_thread, wire.app()).start() for name, wire in upstreams.items()}
    config = write_config(
        tmp_path / "llmproxy.toml",
        [{"name": name, "provider": name, "upstream": app.url} for name, app in apps.items()],
    )
    recordings = tmp_path / "recordings"

    def calls(base_url: str) -> list[Any]:
        oa = openai.OpenAI(base_url=base_url + "/v1", api_key=SECRET, max_retries=0)
        an = anthropic.Anthropic(base_url=base_url, api_key=SECRET, max_retries=0)
        ol = ollama.Client(host=base_url)
        return [
            dump(
                list(
                    oa.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "a"}], stream=True)
                )
            ),
            dump(an.messages.create(model="claude-test", max_tokens=20, messages=[{"role": "user", "content": "b"}])),
            dump(list(ol.chat(model="llama3.2", messages=[{"role": "user", "content": "c"}], stream=True))),
            dump(oa.models.list().data),
        ]

    proxy = start_proxy(loop_thread, "record", recordings, config=config)
    try:
        recorded = calls(proxy.url)
    finally:
        proxy.stop()
        for app in apps.values():
            app.stop()
    assert {p.parent.name for p in files_under(recordings)} == {"openai", "anthropic", "ollama"}
    replay = start_proxy(loop_thread, "replay", recordings, config=config)
    try:
        assert calls(replay.url) == recorded
    finally:
        replay.stop()
    assert replay.server.mode.outcome.hits == 4


def test_multipart_upload_and_binary_response_round_trip(loop_thread: LoopThread, tmp_path: Path) -> None:
    upstream = OpenAIWire()
    audio_in = bytes(range(256)) * 8  # not UTF-8: must not go near the JSON path

    def calls(base_url: str) -> dict[str, Any]:
        client = openai.OpenAI(base_url=base_url + "/v1", api_key=SECRET, max_retries=0)
        out = {
            "transcript": dump(
                client.audio.transcriptions.create(model="whisper-1", file=("clip.wav", audio_in, "audio/wav"))
            )
        }
        out["speech"] = client.audio.speech.create(model="tts-1", voice="alloy", input="hello").content
        return out

    recorded, replayed, recordings = record_and_replay(
        loop_thread, tmp_path, upstream, [{"name": "openai", "provider": "openai"}], calls
    )
    assert replayed == recorded
    assert recorded["speech"].startswith(b"ID3") and recorded["speech"].endswith(b"hello")
    documents = {p.name.split("-")[1]: json.loads(p.read_text()) for p in files_under(recordings)}
    form = documents["transcriptions"]["request"]["body"]
    assert form["__type__"] == "llmproxy.multipart"
    fields = {field["name"]: field for field in form["__data__"]}
    assert fields["model"]["value"] == "whisper-1"
    assert fields["file"]["filename"] == "clip.wav" and fields["file"]["size"] == len(audio_in)
    assert documents["speech"]["response"]["body"]["__type__"] == "llmproxy.bytes"
    assert documents["speech"]["response"]["headers"]["content-type"] == "audio/mpeg"
