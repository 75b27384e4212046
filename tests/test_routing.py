"""Routing is safe: provider-prefixed base URLs for every SDK's URL convention, no catch-all route,
and no credential ever forwarded to another provider's upstream."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import ollama
import openai
import orjson
import pytest
from aiohttp import web
from google import genai

from llmproxy.providers import PROVIDERS, get_provider
from llmproxy.routing import Route, Router, default_routes
from llmproxy.store.directory import RecordingStore
from llmproxy.tools.run import client_environment
from tests.providers_support import normalise_json_whitespace, write_config
from tests.support import REPO, LoopThread, RunningApp, assert_no_secret, files_under, start_proxy
from tests.upstreams.anthropic_wire import AnthropicWire
from tests.upstreams.gemini_wire import GeminiWire
from tests.upstreams.ollama_wire import OllamaWire
from tests.upstreams.openai_wire import OpenAIWire

ANTHROPIC_KEY = "sk-ant-api03-ROUTINGSECRET0123456789abcdef"
OPENAI_KEY = "sk-proj-ROUTINGSECRET0123456789abcdef"
GOOGLE_KEY = "AIzaROUTINGSECRET0123456789abcdefghijk"
AZURE_KEY = "AZUREROUTINGSECRET0123456789abcdef"
OLLAMA_KEY = "ollama-ROUTINGSECRET0123456789abcdef"
ANTHROPIC_HEADERS = {"x-api-key": ANTHROPIC_KEY, "anthropic-version": "2023-06-01"}


class Counted:
    """A fake upstream with every request it receives counted, whatever the path (404s too)."""

    def __init__(self, loop: LoopThread, name: str, wire: Any) -> None:
        self.name = name
        self.wire = wire
        self.received: list[tuple[str, str, dict[str, str]]] = []
        app = wire.app()

        @web.middleware
        async def count(request: web.Request, handler: Callable[[web.Request], Awaitable[Any]]) -> Any:
            self.received.append((request.method, request.path_qs, dict(request.headers)))
            return await handler(request)

        app.middlewares.append(count)
        self.app = RunningApp(loop, app).start()

    @property
    def url(self) -> str:
        return self.app.url


def _routes(upstreams: dict[str, Counted]) -> list[dict[str, str]]:
    return [{"name": name, "provider": name, "upstream": up.url} for name, up in upstreams.items()]


def _start_upstreams(loop: LoopThread) -> dict[str, Counted]:
    return {
        "openai": Counted(loop, "openai", OpenAIWire()),
        "azure": Counted(loop, "azure", OpenAIWire()),
        "anthropic": Counted(loop, "anthropic", AnthropicWire()),
        "gemini": Counted(loop, "gemini", GeminiWire()),
        "ollama": Counted(loop, "ollama", OllamaWire()),
    }


async def _post(url: str, body: Any, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as session:
        async with session.post(url, json=body, headers=headers) as response:
            return response.status, dict(response.headers), await response.read()


def test_ai_sdk_anthropic_url_shape_records_and_replays_through_the_anthropic_route(
    loop_thread: LoopThread, tmp_path: Path
) -> None:
    """`@ai-sdk/anthropic` posts `{ANTHROPIC_BASE_URL}/messages`; the anthropic SDK posts
    `{base_url}/v1/messages`. Under the /anthropic prefix both are Anthropic's /v1/messages,
    recorded once under that path and replayed to either shape."""
    upstreams = _start_upstreams(loop_thread)
    config = write_config(tmp_path / "llmproxy.toml", _routes(upstreams))
    recordings = tmp_path / "recordings"
    ai_sdk_body = {"model": "claude-test", "max_tokens": 20, "messages": [{"role": "user", "content": "from ai-sdk"}]}
    stream_body = {**ai_sdk_body, "stream": True, "messages": [{"role": "user", "content": "ai-sdk stream"}]}

    def sdk_call(base_url: str, **body: Any) -> dict[str, Any]:
        client = anthropic.Anthropic(base_url=base_url, api_key=ANTHROPIC_KEY, max_retries=0)
        return client.messages.create(**body).model_dump(mode="json")  # type: ignore[no-any-return]

    sdk_body = {**ai_sdk_body, "messages": [{"role": "user", "content": "from the sdk"}]}
    proxy = start_proxy(loop_thread, "record", recordings, config=config)
    try:
        # `llmproxy run` (and the pytest plugin) set ANTHROPIC_BASE_URL to the /anthropic prefix.
        base = client_environment(proxy.url, "record", {})["ANTHROPIC_BASE_URL"]
        assert base == proxy.url + "/anthropic"
        status, _, ai_sdk_recorded = loop_thread.run(_post(base + "/messages", ai_sdk_body, ANTHROPIC_HEADERS))
        assert status == 200, ai_sdk_recorded
        status, _, stream_recorded = loop_thread.run(_post(base + "/messages", stream_body, ANTHROPIC_HEADERS))
        assert status == 200, stream_recorded
        sdk_recorded = sdk_call(base, **sdk_body)
    finally:
        proxy.stop()
    assert [path for _, path, _ in upstreams["anthropic"].received] == ["/v1/messages"] * 3
    assert all(not up.received for name, up in upstreams.items() if name != "anthropic")
    for up in upstreams.values():
        up.app.stop()

    store = RecordingStore(recordings)
    documents = [store.read(path) for path in store.paths()]
    assert len(documents) == 3
    assert {(d["request"]["route"], d["request"]["endpoint"]) for d in documents} == {("anthropic", "/v1/messages")}
    assert_no_secret(recordings, ANTHROPIC_KEY)

    # Replay with every upstream gone: each shape, prefixed or legacy, is served the same recording.
    replay = start_proxy(loop_thread, "replay", recordings, config=config)
    try:
        for base_url in (replay.url + "/anthropic", replay.url):  # prefixed, and the legacy base URL
            assert sdk_call(base_url, **sdk_body) == sdk_recorded
            from_ai_sdk = sdk_call(base_url, **ai_sdk_body)  # the AI SDK's recording, read by the anthropic SDK
            expected = orjson.loads(ai_sdk_recorded)
            assert (from_ai_sdk["id"], from_ai_sdk["content"][0]["text"]) == (expected["id"], "Echo: from ai-sdk")
        for url in (replay.url + "/anthropic/messages", replay.url + "/anthropic/v1/messages"):
            status, _, replayed = loop_thread.run(_post(url, ai_sdk_body, ANTHROPIC_HEADERS))
            assert (status, orjson.loads(replayed)) == (200, orjson.loads(ai_sdk_recorded))
            status, headers, replayed = loop_thread.run(_post(url, stream_body, ANTHROPIC_HEADERS))
            assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
            # Byte-exact JSON text in events is the wire layer's business (issue 9 item 6).
            assert normalise_json_whitespace(replayed) == normalise_json_whitespace(stream_recorded)
    finally:
        replay.stop()


def test_a_credential_never_reaches_another_providers_upstream(loop_thread: LoopThread, tmp_path: Path) -> None:
    """Each provider's credential on a path of another provider, or of none: refused with a
    clear 400/404 in an error shape, and not one byte reaches any upstream."""
    upstreams = _start_upstreams(loop_thread)
    config = write_config(tmp_path / "llmproxy.toml", _routes(upstreams))
    recordings = tmp_path / "recordings"
    credentials: dict[str, tuple[dict[str, str], str]] = {
        "anthropic": (ANTHROPIC_HEADERS, ""),
        "anthropic-key-only": ({"x-api-key": ANTHROPIC_KEY}, ""),
        "anthropic-version-only": ({"anthropic-version": "2023-06-01", "Authorization": f"Bearer {OPENAI_KEY}"}, ""),
        "openai": ({"Authorization": f"Bearer {OPENAI_KEY}"}, ""),
        "ollama": ({"Authorization": f"Bearer {OLLAMA_KEY}"}, ""),
        "azure": ({"api-key": AZURE_KEY}, "?api-version=2024-10-21"),
        "gemini-header": ({"x-goog-api-key": GOOGLE_KEY}, ""),
        "gemini-query": ({}, f"?key={GOOGLE_KEY}"),
    }
    # Paths of every provider, and paths of none (the AI SDK's shape without a prefix among them).
    paths = {
        "openai": ["/v1/chat/completions", "/openai/v1/chat/completions", "/openai/chat/completions"],
        "azure": ["/openai/deployments/dep/chat/completions", "/azure/openai/deployments/dep/chat/completions"],
        "anthropic": ["/v1/messages", "/anthropic/v1/messages", "/anthropic/messages"],
        "gemini": [
            "/v1beta/models/gemini-2.0-flash:generateContent",
            "/gemini/models/gemini-2.0-flash:generateContent",
        ],
        "ollama": ["/api/chat", "/ollama/api/chat", "/ollama/chat"],
        None: ["/messages", "/chat/completions", "/v9/chat", "/totally/unknown"],  # /v2/chat is Cohere's
    }
    # Whose paths each credential may legitimately go to.
    allowed = {
        "anthropic": {"anthropic"},
        "anthropic-key-only": {"anthropic"},
        "anthropic-version-only": {"anthropic"},
        "openai": {"openai", "azure", "gemini", "ollama"},  # Bearer: the shared OpenAI-style scheme
        "ollama": {"openai", "azure", "gemini", "ollama"},
        "azure": {"azure"},
        "gemini-header": {"gemini"},
        "gemini-query": {"gemini"},
    }
    body = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    proxy = start_proxy(loop_thread, "record", recordings, config=config)
    refused: list[tuple[str, str, int, str]] = []
    try:
        for credential, (headers, query) in credentials.items():
            for owner, owner_paths in paths.items():
                if owner in allowed[credential]:
                    continue
                for path in owner_paths:
                    status, response_headers, raw = loop_thread.run(_post(proxy.url + path + query, body, headers))
                    code = response_headers.get("x-llmproxy-error", "")
                    refused.append((credential, path, status, code))
                    assert (status, code) == ((404, "no_route") if owner is None else (400, "credential_mismatch")), (
                        credential,
                        path,
                        raw,
                    )
                    error = orjson.loads(raw)["error"]
                    message = error if isinstance(error, str) else error["message"]  # Ollama's shape is flat
                    assert "/anthropic" in message and "/openai" in message  # the base URLs to use
                    for secret in (ANTHROPIC_KEY, OPENAI_KEY, GOOGLE_KEY, AZURE_KEY, OLLAMA_KEY):
                        assert secret not in message
        assert {name: up.received for name, up in upstreams.items()} == {name: [] for name in upstreams}
        assert files_under(recordings) == []
        # The counting works: each credential on its own provider's prefixed path gets through.
        own = {
            "anthropic": ("anthropic", "/anthropic/messages", "/v1/messages"),
            "openai": ("openai", "/openai/chat/completions", "/v1/chat/completions"),
            "azure": (
                "azure",
                "/azure/openai/deployments/dep/chat/completions",
                "/openai/deployments/dep/chat/completions",
            ),
            "gemini-query": ("gemini", "/gemini/models/gemini-2.0-flash:generateContent", None),
            "ollama": ("ollama", "/ollama/api/chat", "/api/chat"),
        }
        for credential, (name, path, upstream_path) in own.items():
            headers, query = credentials[credential]
            payload: Any = body
            if name == "gemini":
                payload = {"contents": [{"parts": [{"text": "hi"}]}]}
            if name == "ollama":
                payload = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": False}
            status, _, raw = loop_thread.run(_post(proxy.url + path + query, payload, headers))
            assert status == 200, (credential, raw)
            assert len(upstreams[name].received) == 1
            if upstream_path is not None:
                assert upstreams[name].received[0][1].split("?")[0] == upstream_path
    finally:
        proxy.stop()
        for up in upstreams.values():
            up.app.stop()
    assert len(refused) > 60
    assert_no_secret(recordings, ANTHROPIC_KEY, OPENAI_KEY, GOOGLE_KEY, AZURE_KEY, OLLAMA_KEY)


def test_sdks_find_their_route_from_the_environment_run_sets(
    loop_thread: LoopThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every SDK, configured only by the variables `llmproxy run` sets, reaches its own upstream
    through its provider's prefix, at the API's canonical path."""
    upstreams = _start_upstreams(loop_thread)
    config = write_config(tmp_path / "llmproxy.toml", _routes(upstreams))
    proxy = start_proxy(loop_thread, "record", tmp_path / "recordings", config=config)
    try:
        env = client_environment(proxy.url, "record", {})
        assert env["OPENAI_BASE_URL"] == proxy.url + "/openai/v1"
        assert env["ANTHROPIC_BASE_URL"] == proxy.url + "/anthropic"
        assert env["OLLAMA_HOST"] == proxy.url + "/ollama"
        assert env["GOOGLE_GEMINI_BASE_URL"] == proxy.url + "/gemini"
        assert env["AZURE_OPENAI_ENDPOINT"] == proxy.url + "/azure"
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        messages = [{"role": "user", "content": "env"}]
        openai.OpenAI(api_key=OPENAI_KEY, max_retries=0).chat.completions.create(model="gpt-4o", messages=messages)
        openai.AzureOpenAI(api_key=AZURE_KEY, api_version="2024-10-21", max_retries=0).chat.completions.create(
            model="dep", messages=messages
        )
        anthropic.Anthropic(api_key=ANTHROPIC_KEY, max_retries=0).messages.create(
            model="claude-test", max_tokens=5, messages=messages
        )
        ollama.Client().chat(model="llama3", messages=messages, stream=False)
        google = genai.Client(api_key=GOOGLE_KEY)  # held: the client closes its connection pool when collected
        google.models.generate_content(model="gemini-2.0-flash", contents="env")
    finally:
        proxy.stop()
        for up in upstreams.values():
            up.app.stop()
    seen = {name: [path.split("?")[0] for _, path, _ in up.received] for name, up in upstreams.items()}
    assert seen == {
        "openai": ["/v1/chat/completions"],
        "azure": ["/openai/deployments/dep/chat/completions"],
        "anthropic": ["/v1/messages"],
        "ollama": ["/api/chat"],
        "gemini": ["/v1/models/gemini-2.0-flash:generateContent"],  # this google-genai's default API version
    }


def test_unclaimed_path_is_a_404_naming_the_base_urls(loop_thread: LoopThread, tmp_path: Path) -> None:
    proxy = start_proxy(loop_thread, "replay", tmp_path)
    try:
        status, headers, raw = loop_thread.run(_post(proxy.url + "/messages", {"model": "m"}, {}))
        assert (status, headers["x-llmproxy-error"]) == (404, "no_route")
        message = orjson.loads(raw)["error"]["message"]
        host = proxy.url.removeprefix("http://")
        for provider in PROVIDERS.values():
            assert f"http://{host}{provider.prefix}" in message
        # A request an Anthropic client made gets the answer in Anthropic's error shape.
        status, _, raw = loop_thread.run(_post(proxy.url + "/messages", {"model": "m"}, ANTHROPIC_HEADERS))
        payload = orjson.loads(raw)
        assert status == 404 and payload["type"] == "error" and "no route" in payload["error"]["message"]
    finally:
        proxy.stop()


def test_an_sdk_pointed_at_another_providers_prefix_gets_a_clear_error(loop_thread: LoopThread, tmp_path: Path) -> None:
    """The anthropic SDK given the OpenAI base URL: a 400 its own error class shows, naming the
    header and the base URL to use, and nothing forwarded (replay would have nothing to forward
    either; record mode is the one with an upstream)."""
    upstreams = _start_upstreams(loop_thread)
    config = write_config(tmp_path / "llmproxy.toml", _routes(upstreams))
    proxy = start_proxy(loop_thread, "record", tmp_path / "recordings", config=config)
    try:
        client = anthropic.Anthropic(base_url=proxy.url + "/openai", api_key=ANTHROPIC_KEY, max_retries=0)
        with pytest.raises(anthropic.BadRequestError) as caught:
            client.messages.create(model="claude-test", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
        assert caught.value.status_code == 400
        assert caught.value.body["type"] == "error"  # type: ignore[index]  # Anthropic's own error shape
        message = caught.value.body["error"]["message"]  # type: ignore[index]
        # anthropic 2.x sends its key as a Bearer token, always with anthropic-version.
        assert "anthropic-version (used by anthropic)" in message and proxy.url + "/anthropic" in message
    finally:
        proxy.stop()
        for up in upstreams.values():
            up.app.stop()
    assert {name: up.received for name, up in upstreams.items()} == {name: [] for name in upstreams}


def test_every_registered_provider_has_a_prefix_and_no_provider_claims_every_path() -> None:
    router = Router(default_routes())
    for provider in PROVIDERS.values():
        match = router.resolve("POST", provider.prefix + "/anything", {})
        assert match is not None and match.route.provider is provider
    for path in ("/", "/messages", "/chat/completions", "/v2/whatever", "/health", "/v1/unknown-resource"):
        assert router.resolve("POST", path, {}) is None, path


def test_a_configured_prefix_undoes_the_sdk_convention_only_for_the_apis_paths() -> None:
    """A prefixed custom OpenAI-compatible server: /chat/completions is the API's, but a path that
    is not (e.g. /health) is forwarded as it is."""
    router = Router([Route("local", get_provider("openai"), "http://127.0.0.1:9/v1", prefix="/local")])
    paths = {
        path: router.resolve("POST", "/local" + path, {}).path  # type: ignore[union-attr]
        for path in ("/chat/completions", "/v1/chat/completions", "/health", "/tokenize")
    }
    assert paths == {
        "/chat/completions": "/v1/chat/completions",
        "/v1/chat/completions": "/v1/chat/completions",
        "/health": "/health",
        "/tokenize": "/tokenize",
    }


AI_SDK_SCRIPT = """
const { createAnthropic } = await import(process.env.AI_SDK_ANTHROPIC);
const model = createAnthropic()("claude-test");  // base URL and key from ANTHROPIC_BASE_URL / ANTHROPIC_API_KEY
const ask = (text) => ({ prompt: [{ role: "user", content: [{ type: "text", text }] }], maxOutputTokens: 20 });
const generated = await model.doGenerate(ask("from the vercel ai sdk"));
const { stream } = await model.doStream(ask("streamed by the vercel ai sdk"));
let streamed = "";
for await (const part of stream) {
  if (part.type === "text-delta") streamed += part.delta;
  if (part.type === "error") throw new Error(JSON.stringify(part.error));
}
console.log(JSON.stringify({ base: process.env.ANTHROPIC_BASE_URL, generated: generated.content, streamed }));
"""


def _ai_sdk_anthropic() -> str | None:
    candidates = [
        os.environ.get("AI_SDK_ANTHROPIC"),
        str(REPO / ".venv-node" / "node_modules" / "@ai-sdk" / "anthropic" / "dist" / "index.js"),
    ]
    return next((c for c in candidates if c and Path(c).is_file()), None)


def test_the_real_ai_sdk_anthropic_under_llmproxy_run_records_and_replays(
    loop_thread: LoopThread, tmp_path: Path
) -> None:
    """The real `@ai-sdk/anthropic` (Node), configured only by the ANTHROPIC_BASE_URL `llmproxy run`
    sets: it posts `{base}/messages`, which reaches Anthropic's /v1/messages and replays offline."""
    module, node = _ai_sdk_anthropic(), shutil.which("node")
    if module is None or node is None:
        pytest.skip("node or @ai-sdk/anthropic is not installed (.ci/run installs it into .venv-node)")
    upstream = Counted(loop_thread, "anthropic", AnthropicWire())
    config = write_config(tmp_path / "llmproxy.toml", _routes({"anthropic": upstream}))
    script = tmp_path / "ai_sdk.mjs"
    script.write_text(AI_SDK_SCRIPT)
    recordings = tmp_path / "recordings"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "OPENAI_"))}
    env.update({"AI_SDK_ANTHROPIC": module, "ANTHROPIC_API_KEY": ANTHROPIC_KEY})

    def run(mode: str) -> dict[str, Any]:
        result = subprocess.run(
            [sys.executable, "-m", "llmproxy", "run", mode, "--config", str(config), "--recordings", str(recordings)]
            + ["--", node, str(script)],
            capture_output=True,
            text=True,
            env=env if mode == "record" else {k: v for k, v in env.items() if k != "ANTHROPIC_API_KEY"},
            timeout=60,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        output: dict[str, Any] = json.loads(result.stdout.splitlines()[-1])
        assert output.pop("base").endswith("/anthropic")
        return output

    try:
        recorded = run("record")
    finally:
        upstream.app.stop()
    assert [(method, path) for method, path, _ in upstream.received] == [("POST", "/v1/messages")] * 2
    assert all(headers["x-api-key"] == ANTHROPIC_KEY for _, _, headers in upstream.received)
    assert recorded["generated"] == [{"type": "text", "text": "Echo: from the vercel ai sdk"}]
    assert recorded["streamed"] == "Echo: streamed by the vercel ai sdk"
    assert run("replay") == recorded  # the upstream is gone: both answers come from the recordings
    store = RecordingStore(recordings)
    assert {store.read(p)["request"]["endpoint"] for p in store.paths()} == {"/v1/messages"}
    assert_no_secret(recordings, ANTHROPIC_KEY)
