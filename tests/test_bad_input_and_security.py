"""Bad input gets a clear error (never a traceback, a hang or a write); security claims hold."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import aiohttp
import openai
import pytest

from llmproxy.server import _is_loopback
from tests.netguard import TRIPWIRE
from tests.providers_support import write_config
from tests.support import SEED, CliProxy, LoopThread, RunningApp, files_under, start_proxy
from tests.test_seed_and_cli import SEED_MESSAGES
from tests.upstreams.openai_wire import OpenAIWire


async def _send(
    url: str, method: str = "POST", data: bytes | None = None, headers: dict | None = None
) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as session:
        async with session.request(method, url, data=data, headers=headers or {}) as response:
            text = await response.text()
            try:
                return response.status, json.loads(text)
            except ValueError:
                return response.status, {"text": text}


@pytest.fixture
def recording_proxy(loop_thread: LoopThread, tmp_path: Path):  # type: ignore[no-untyped-def]
    wire = OpenAIWire()
    app = RunningApp(loop_thread, wire.app()).start()
    proxy = CliProxy("record", "--upstream", app.url, "--recordings", str(tmp_path / "rec"), "--port", "0")
    yield proxy, wire, tmp_path / "rec"
    proxy.stop()
    app.stop()


@pytest.mark.parametrize(
    ("name", "body", "content_type", "status", "code"),
    [
        ("invalid JSON", b'{"model": "gpt-4o", "messages": [', "application/json", 400, "invalid_json"),
        ("non-UTF-8 JSON", b'{"model": "\xff\xfe"}', "application/json", 400, "invalid_json"),
        ("JSON with a charset", b'{"model": ', "application/json; charset=utf-8", 400, "invalid_json"),
    ],
)
def test_bad_bodies_get_a_clear_error_and_are_not_forwarded_or_written(
    loop_thread: LoopThread,
    recording_proxy,
    name: str,
    body: bytes,
    content_type: str,
    status: int,
    code: str,  # type: ignore[no-untyped-def]
) -> None:
    proxy, wire, recordings = recording_proxy
    got, payload = loop_thread.run(
        _send(proxy.url + "/v1/chat/completions", data=body, headers={"Content-Type": content_type})
    )
    assert got == status and payload["error"]["code"] == code, name
    assert "not valid JSON" in payload["error"]["message"]
    assert wire.requests == []
    events = proxy.stop()
    assert any(e["event"] == "request body is not valid JSON" for e in events)
    assert not any("Traceback" in json.dumps(e) or e.get("level") == "error" for e in events)
    assert not recordings.exists() or files_under(recordings) == []


def test_huge_body_absurd_header_and_odd_method(loop_thread: LoopThread, tmp_path: Path) -> None:
    proxy = CliProxy("replay", "--recordings", str(tmp_path), "--port", "0")
    try:
        status, _ = loop_thread.run(
            _send(
                proxy.url + "/v1/chat/completions",
                data=b"{" + b" " * (65 * 1024 * 1024) + b"}",
                headers={"Content-Type": "application/json"},
            )
        )
        assert status == 413
        status, _ = loop_thread.run(_send(proxy.url + "/v1/models", method="GET", headers={"X-Absurd": "x" * 100_000}))
        assert status in (400, 431)
        status, payload = loop_thread.run(_send(proxy.url + "/v1/models", method="TRACE"))
        assert status == 405 and payload["error"]["code"] == "method_not_allowed"
        # Still serving after all that.
        client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="k", max_retries=0)
        with pytest.raises(openai.NotFoundError):
            client.models.list()
    finally:
        events = proxy.stop()
    text = json.dumps(events)
    assert "Traceback" not in text and '"exception"' not in text
    assert any(e["event"] == "request body too large" for e in events)


def test_unknown_path_without_a_catch_all_route_is_a_404(loop_thread: LoopThread, tmp_path: Path) -> None:
    config = write_config(tmp_path / "llmproxy.toml", [{"name": "anthropic", "provider": "anthropic"}])
    proxy = start_proxy(loop_thread, "replay", tmp_path, config=config)
    try:
        status, payload = loop_thread.run(_send(proxy.url + "/totally/unknown", method="GET"))
    finally:
        proxy.stop()
    assert status == 404 and payload["error"]["code"] == "no_route"


def test_replay_opens_zero_outbound_connections(tmp_path: Path) -> None:
    """The proxy runs with every outbound connect turned into a loud failure."""
    shutil.copy(SEED, tmp_path / SEED.name)
    proxy = CliProxy("replay", "--recordings", str(tmp_path), "--port", "0", netguard="no-outbound")
    try:
        client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="k", max_retries=0)
        stream = client.chat.completions.create(
            model="gpt-4o", messages=SEED_MESSAGES, response_format={"type": "text"}, stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in stream) == "HUMANS LIVE ON EARTH."
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "miss"}])
    finally:
        proxy.stop()
    assert TRIPWIRE not in "\n".join(proxy.lines)


def test_the_tripwire_does_fire_on_an_outbound_connection(tmp_path: Path) -> None:
    """The guard used above is real: record mode through it trips on its first upstream call."""
    proxy = CliProxy(
        "record",
        "--upstream",
        "http://127.0.0.1:9",
        "--recordings",
        str(tmp_path),
        "--port",
        "0",
        netguard="no-outbound",
    )
    try:
        client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="k", max_retries=0)
        with pytest.raises(openai.InternalServerError):
            client.models.list()
    finally:
        proxy.stop()
    assert TRIPWIRE in "\n".join(proxy.lines)


def test_shared_token_guards_an_exposed_proxy_and_is_never_forwarded(loop_thread: LoopThread, tmp_path: Path) -> None:
    wire = OpenAIWire()
    app = RunningApp(loop_thread, wire.app()).start()
    proxy = start_proxy(loop_thread, "record", tmp_path, upstream=app.url, token="team-secret-token")
    try:
        anonymous = openai.OpenAI(base_url=proxy.url + "/v1", api_key="k", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as caught:
            anonymous.models.list()
        assert "x-llmproxy-token" in caught.value.message
        member = openai.OpenAI(
            base_url=proxy.url + "/v1",
            api_key="k",
            max_retries=0,
            default_headers={"x-llmproxy-token": "team-secret-token"},
        )
        assert member.models.list().data[0].id == "gpt-4o"
    finally:
        proxy.stop()
        app.stop()
    assert len(wire.requests) == 1
    assert "x-llmproxy-token" not in {name.lower() for name in wire.requests[0]["headers"]}
    assert all("team-secret-token" not in p.read_text() for p in files_under(tmp_path))


def test_loopback_detection_behind_the_public_bind_warning() -> None:
    assert _is_loopback("127.0.0.1") and _is_loopback("::1") and _is_loopback("localhost")
    assert not _is_loopback("0.0.0.0") and not _is_loopback("192.168.1.10") and not _is_loopback("example.com")


def test_default_bind_is_loopback(tmp_path: Path) -> None:
    proxy = CliProxy("replay", "--recordings", str(tmp_path), "--port", "0")
    try:
        listening = next(
            e for e in (json_line for json_line in map(json.loads, proxy.lines)) if e["event"] == "listening"
        )
        assert listening["host"] == "127.0.0.1"
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=2):
            pass
    finally:
        proxy.stop()


def test_wrong_content_types_are_handled_by_what_the_body_is(loop_thread: LoopThread, tmp_path: Path) -> None:
    """A JSON body labelled text/plain keys as JSON; a 'multipart' label on a body that is not
    multipart keys by its bytes; neither is an error, a crash or a hang."""
    shutil.copy(SEED, tmp_path / SEED.name)
    seed_body = json.loads(SEED.read_text())["request"]["body"]
    proxy = start_proxy(loop_thread, "replay", tmp_path)
    try:
        status, payload = loop_thread.run(
            _send(
                proxy.url + "/v1/chat/completions",
                data=json.dumps(seed_body).encode(),
                headers={"Content-Type": "text/plain"},
            )
        )
        assert status == 200  # the seed's stream, found by its JSON content
        status, payload = loop_thread.run(
            _send(
                proxy.url + "/v1/chat/completions",
                data=b"not a form at all",
                headers={"Content-Type": "multipart/form-data; boundary=xyz"},
            )
        )
        assert status == 404 and payload["error"]["code"] == "recording_not_found"
    finally:
        proxy.stop()
