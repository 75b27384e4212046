"""Credentials of every style are forwarded upstream in record mode and never reach disk or logs."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import openai
import pytest

from tests.providers_support import write_config
from tests.support import CliProxy, LoopThread, RunningApp, assert_no_secret, files_under, start_proxy
from tests.upstreams.anthropic_wire import AnthropicWire
from tests.upstreams.gemini_wire import GeminiWire
from tests.upstreams.openai_wire import OpenAIWire

SECRETS = {
    "bearer": "sk-proj-BEARERSECRET0123456789abcdef",
    "cookie": "COOKIESECRET0123456789",
    "x_api_key": "sk-ant-api03-XAPIKEYSECRET0123456789",
    "azure": "AZUREKEYSECRET0123456789abcdef",
    "goog_header": "AIzaGOOGHEADERSECRET0123456789",
    "goog_query": "AIzaGOOGQUERYSECRET0123456789",
    "openai_query": "QUERYKEYSECRET0123456789",
}


def test_no_credential_style_reaches_recordings_or_logs(loop_thread: LoopThread, tmp_path: Path) -> None:
    oa, an, ge = OpenAIWire(), AnthropicWire(), GeminiWire()
    apps = [RunningApp(loop_thread, wire.app()).start() for wire in (oa, an, ge)]
    config = write_config(
        tmp_path / "llmproxy.toml",
        [
            {"name": "openai", "provider": "openai", "upstream": apps[0].url},
            {"name": "azure", "provider": "azure", "upstream": apps[0].url},
            {"name": "anthropic", "provider": "anthropic", "upstream": apps[1].url},
            {"name": "gemini", "provider": "gemini", "upstream": apps[2].url},
        ],
    )
    recordings = tmp_path / "recordings"
    proxy = CliProxy(
        "record", "--config", str(config), "--recordings", str(recordings), "--port", "0", "--log-level", "debug"
    )
    chat = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}

    async def send_all() -> None:
        async with aiohttp.ClientSession() as session:
            requests = [
                (
                    # ?key= is Gemini's credential (refused on other routes); api_key is a generic name.
                    "/v1/chat/completions?api_key=" + SECRETS["openai_query"],
                    chat,
                    {"Authorization": f"Bearer {SECRETS['bearer']}", "Cookie": f"session={SECRETS['cookie']}"},
                ),
                (
                    "/v1/messages",
                    {"model": "claude-test", "max_tokens": 5, "messages": chat["messages"]},
                    {"x-api-key": SECRETS["x_api_key"], "anthropic-version": "2023-06-01"},
                ),
                (
                    "/openai/deployments/dep/chat/completions?api-version=2024-10-21",
                    chat,
                    {"api-key": SECRETS["azure"]},
                ),
                (
                    "/v1beta/models/gemini-2.0-flash:generateContent",
                    {"contents": [{"parts": [{"text": "hi"}]}]},
                    {"x-goog-api-key": SECRETS["goog_header"]},
                ),
                (
                    "/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse&key=" + SECRETS["goog_query"],
                    {"contents": [{"parts": [{"text": "hi"}]}]},
                    {},
                ),
            ]
            for path, body, headers in requests:
                async with session.post(proxy.url + path, json=body, headers=headers) as response:
                    assert response.status == 200, await response.text()
                    await response.read()

    try:
        loop_thread.run(send_all())
    finally:
        events = proxy.stop()
        for app in apps:
            app.stop()
    # Forwarded: the upstreams saw every credential.
    assert oa.requests[0]["headers"]["Authorization"] == f"Bearer {SECRETS['bearer']}"
    assert SECRETS["cookie"] in oa.requests[0]["headers"]["Cookie"]
    assert oa.requests[1]["headers"]["api-key"] == SECRETS["azure"]
    assert an.requests[0]["headers"]["x-api-key"] == SECRETS["x_api_key"]
    assert ge.requests[0]["headers"]["x-goog-api-key"] == SECRETS["goog_header"]
    assert ge.requests[1]["query"]["key"] == SECRETS["goog_query"]
    # Never written: not in any file, not in any log line.
    assert len(files_under(recordings)) == 5
    assert_no_secret(recordings, *SECRETS.values())
    log_text = json.dumps(events)
    for secret in SECRETS.values():
        assert secret not in log_text
    gemini_stream = next(p for p in files_under(recordings) if "streamgeneratecontent" in p.name)
    document = json.loads(gemini_stream.read_text())
    assert document["request"]["url"].endswith(":streamGenerateContent?alt=sse")


def test_key_headers_join_the_key_only_where_configured(loop_thread: LoopThread, tmp_path: Path) -> None:
    wire = AnthropicWire()
    app = RunningApp(loop_thread, wire.app()).start()
    config = write_config(
        tmp_path / "llmproxy.toml",
        [{"name": "anthropic", "provider": "anthropic", "upstream": app.url, "key_headers": ["anthropic-beta"]}],
    )
    recordings = tmp_path / "recordings"
    body = {"model": "claude-test", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    proxy = start_proxy(loop_thread, "record", recordings, config=config)

    async def post(url: str, beta: str) -> int:
        async with aiohttp.ClientSession() as session:
            async with session.post(
                url + "/v1/messages", json=body, headers={"anthropic-beta": beta, "x-api-key": "k"}
            ) as r:
                await r.read()
                return r.status

    try:
        assert loop_thread.run(post(proxy.url, "tools-2024-04-04")) == 200
    finally:
        proxy.stop()
        app.stop()
    [path] = files_under(recordings)
    assert json.loads(path.read_text())["request"]["headers"] == {"anthropic-beta": "tools-2024-04-04"}
    replay = start_proxy(loop_thread, "replay", recordings, config=config)
    try:
        assert loop_thread.run(post(replay.url, "tools-2024-04-04")) == 200
        assert loop_thread.run(post(replay.url, "another-beta")) == 404
    finally:
        replay.stop()


def test_prefix_route_strips_its_prefix_and_replays_through_the_same_route(
    loop_thread: LoopThread, tmp_path: Path
) -> None:
    main, local = OpenAIWire(), OpenAIWire()
    main_app, local_app = RunningApp(loop_thread, main.app()).start(), RunningApp(loop_thread, local.app()).start()
    config = write_config(
        tmp_path / "llmproxy.toml",
        [
            {"name": "openai", "provider": "openai", "upstream": main_app.url},
            {"name": "local-llm", "provider": "openai", "prefix": "/local", "upstream": local_app.url + "/v1"},
        ],
    )
    recordings = tmp_path / "recordings"
    proxy = start_proxy(loop_thread, "record", recordings, config=config)
    messages = [{"role": "user", "content": "same request, two upstreams"}]
    try:
        via_main = openai.OpenAI(base_url=proxy.url + "/v1", api_key="k", max_retries=0)
        via_local = openai.OpenAI(base_url=proxy.url + "/local/v1", api_key="k", max_retries=0)
        via_main.chat.completions.create(model="gpt-4o", messages=messages)
        local_answer = via_local.chat.completions.create(model="gpt-4o", messages=messages)
    finally:
        proxy.stop()
        main_app.stop()
        local_app.stop()
    assert [r["path"] for r in main.requests] == ["/v1/chat/completions"]
    assert [r["path"] for r in local.requests] == ["/v1/chat/completions"]  # prefix stripped, no /v1/v1
    assert {p.parent.name for p in files_under(recordings)} == {"openai", "local-llm"}
    replay = start_proxy(loop_thread, "replay", recordings, config=config)
    try:
        client = openai.OpenAI(base_url=replay.url + "/local/v1", api_key="k", max_retries=0)
        assert (
            client.chat.completions.create(model="gpt-4o", messages=messages).model_dump() == local_answer.model_dump()
        )
        assert replay.server.mode.outcome.hits == 1
    finally:
        replay.stop()


@pytest.mark.parametrize("name", ["../escape", "a/b", ".hidden"])
def test_route_names_cannot_escape_the_recordings_directory(tmp_path: Path, name: str) -> None:
    from llmproxy.store.directory import RecordingStore

    store = RecordingStore(tmp_path / "rec")
    relative = store.name_for(route=name, path="/v1/../../etc/passwd", model="../../x", key="0" * 64)
    written = store.write(relative, {"request": {}, "response": {}})
    assert (tmp_path / "rec").resolve() in written.resolve().parents
    assert not written.name.startswith(".")


def test_a_replay_placeholder_key_is_never_sent_upstream_or_recorded(loop_thread: LoopThread, tmp_path: Path) -> None:
    """A test marked to record inside a replay run (or `llmproxy run replay` with a miss sent
    live) has only the placeholder key `run` and the plugin set: a clear 401, nothing upstream."""
    import anthropic

    from llmproxy.tools.run import client_environment

    oa, an = OpenAIWire(), AnthropicWire()
    apps = [RunningApp(loop_thread, wire.app()).start() for wire in (oa, an)]
    config = write_config(
        tmp_path / "llmproxy.toml",
        [
            {"name": "openai", "provider": "openai", "upstream": apps[0].url},
            {"name": "anthropic", "provider": "anthropic", "upstream": apps[1].url},
        ],
    )
    (tmp_path / "recordings").mkdir()
    proxy = start_proxy(loop_thread, "record", tmp_path / "recordings", config)
    try:
        replay_env = client_environment(proxy.url, "replay", {})
        client = openai.OpenAI(base_url=proxy.url + "/v1", api_key=replay_env["OPENAI_API_KEY"], max_retries=0)
        with pytest.raises(openai.AuthenticationError) as refused:
            client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
        assert "OPENAI_API_KEY" in str(refused.value) and "placeholder" in str(refused.value)
        # Any whitespace between the scheme and the key.
        tabbed = openai.OpenAI(
            base_url=proxy.url + "/v1",
            api_key="unused",
            max_retries=0,
            default_headers={"Authorization": "Bearer\t" + replay_env["OPENAI_API_KEY"]},
        )
        with pytest.raises(openai.AuthenticationError):
            tabbed.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
        claude = anthropic.Anthropic(base_url=proxy.url, api_key=replay_env["ANTHROPIC_API_KEY"], max_retries=0)
        with pytest.raises(anthropic.AuthenticationError) as refused_too:
            claude.messages.create(
                model="claude-3-5-sonnet-latest", max_tokens=8, messages=[{"role": "user", "content": "hi"}]
            )
        assert "ANTHROPIC_API_KEY" in str(refused_too.value)
        assert refused_too.value.body["error"]["type"] == "authentication_error"  # Anthropic's own type
        # A real key goes through and is recorded.
        real = openai.OpenAI(base_url=proxy.url + "/v1", api_key=SECRETS["bearer"], max_retries=0)
        assert real.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}]).choices
    finally:
        proxy.stop()
        for app in apps:
            app.stop()
    assert len(oa.requests) == 1 and not an.requests
    assert len(files_under(tmp_path / "recordings")) == 1
