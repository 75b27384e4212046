"""Errors nobody expected (a bug, a driver that misbehaves) never escape as a bare 500 or a
traceback with data: the client gets its provider's error shape with an error id, the log one
redacted line with the same id. The fault is injected through the Upstream protocol (a double
of the upstream driver, as upstream/base.py allows), the client is real, the proxy in-process."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
import structlog

from llmproxy.call import Call
from tests.support import LoopThread, files_under, start_proxy

OPENAI_KEY = "sk-proj-" + "Q" * 40
ANTHROPIC_KEY = "sk-ant-api03-" + "Z" * 40
ODD_KEY = "gw-9f8e7d6c5b4a39281706"  # no known key shape: only the request's own value says it is one


class _Response:
    """An upstream response whose parts fail as `fault` says."""

    def __init__(self, call: Call, fault: str) -> None:
        self._call = call
        self._fault = fault
        self.status = 200
        self.url = "http://upstream.invalid" + call.path
        self.headers_ms = 1.0

    @property
    def headers(self) -> list[tuple[str, str]]:
        if self._fault == "headers":
            # A driver error that quotes what it was sent: the request's credentials.
            raise RuntimeError(f"cannot read headers of a call sent with {self._call.headers}")
        return [("Content-Type", "text/event-stream")]

    async def chunks(self) -> AsyncIterator[bytes]:
        yield b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":[]}\n\n'
        if self._fault == "midstream":
            yield f"a str, not bytes, from a call sent with {self._call.headers}"  # type: ignore[misc]

    def close(self) -> None:
        pass


class BuggyUpstream:
    """The Upstream protocol, failing in a way no code path expects."""

    read_timeout = 30.0

    def __init__(self, fault: str) -> None:
        self.fault = fault

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def send(self, call: Call) -> Any:
        if self.fault == "send":
            raise KeyError(f"driver state lost for {call.headers.get('authorization')} {call.query}")
        return _Response(call, self.fault)


def _proxy_with(loop_thread: LoopThread, tmp_path: Path, fault: str) -> Any:
    proxy = start_proxy(loop_thread, "record", tmp_path / "recordings", upstream="http://127.0.0.1:9")
    loop_thread.run(proxy.server.pipeline.upstream.close())
    proxy.server.pipeline.upstream = BuggyUpstream(fault)
    return proxy


def _error_lines(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [event for event in logs if event["event"] == "internal error"]


def _assert_clean(logs: list[dict[str, Any]], err: str, *secrets: str) -> None:
    text = repr(logs) + err
    for secret in secrets:
        assert secret not in text
    assert "Traceback" not in err
    assert "Task exception was never retrieved" not in err


def test_an_unexpected_error_in_the_handler_is_a_provider_shaped_500_with_an_error_id(
    loop_thread: LoopThread, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    proxy = _proxy_with(loop_thread, tmp_path, "headers")
    try:
        with structlog.testing.capture_logs() as logs:
            client = openai.OpenAI(base_url=proxy.url + "/v1", api_key=OPENAI_KEY, max_retries=0)
            with pytest.raises(openai.InternalServerError) as raised:
                client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
            client.close()

            async def anthropic_call() -> aiohttp.ClientResponse:
                async with aiohttp.ClientSession() as session:
                    async with session.post(
                        proxy.url + "/v1/messages",
                        json={"model": "claude-3-5-haiku-latest", "max_tokens": 5, "messages": []},
                        headers={"x-api-key": ANTHROPIC_KEY, "x-gateway-token": ODD_KEY},
                    ) as response:
                        await response.read()
                        return response

            answer = loop_thread.run(anthropic_call())
    finally:
        proxy.stop()
    err = capfd.readouterr().err
    assert raised.value.status_code == 500
    assert raised.value.response.headers["x-llmproxy-error"] == "internal_error"
    error_id = raised.value.response.headers["x-llmproxy-error-id"]
    assert re.fullmatch(r"[0-9a-f]{12}", error_id)
    assert error_id in raised.value.message  # the id the user quotes is the one in the log
    # The Anthropic route answers in Anthropic's shape: its SDK would parse it.
    assert answer.status == 500 and answer.headers["x-llmproxy-error"] == "internal_error"
    lines = _error_lines(logs)
    by_id = {line["error_id"]: line for line in lines}
    anthropic_line = by_id[answer.headers["x-llmproxy-error-id"]]
    assert by_id[error_id]["path"] == "/v1/chat/completions" and anthropic_line["path"] == "/v1/messages"
    # The recording side met the same fault in its own task: one line each too, counted as not written.
    assert len(lines) == 4
    assert all(line["error"] == "RuntimeError" and "in headers" in line["where"] for line in lines)
    assert "[redacted credential from request header x-gateway-token]" in anthropic_line["detail"]
    assert proxy.server.pipeline.outcome.not_recorded_by == {"write_failed": 2}
    _assert_clean(logs, err, OPENAI_KEY, ANTHROPIC_KEY, ODD_KEY)
    assert files_under(tmp_path / "recordings") == []


def test_an_anthropic_sdk_sees_the_error_in_its_own_shape(loop_thread: LoopThread, tmp_path: Path) -> None:
    proxy = _proxy_with(loop_thread, tmp_path, "headers")
    try:
        client = anthropic.Anthropic(base_url=proxy.url, api_key=ANTHROPIC_KEY, max_retries=0)
        with pytest.raises(anthropic.InternalServerError) as raised:
            client.messages.create(
                model="claude-3-5-haiku-latest", max_tokens=5, messages=[{"role": "user", "content": "hi"}]
            )
        client.close()
    finally:
        proxy.stop()
    assert raised.value.body["error"]["type"] == "api_error"  # type: ignore[index]
    assert raised.value.response.headers["x-llmproxy-error-id"] in raised.value.message


def test_an_unexpected_error_in_the_upstream_driver_is_a_502_with_an_error_id(
    loop_thread: LoopThread, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    proxy = _proxy_with(loop_thread, tmp_path, "send")
    try:
        with structlog.testing.capture_logs() as logs:
            client = openai.OpenAI(base_url=proxy.url + "/v1", api_key=OPENAI_KEY, max_retries=0)
            with pytest.raises(openai.APIStatusError) as raised:
                client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
            client.close()
    finally:
        proxy.stop()
    err = capfd.readouterr().err
    assert raised.value.status_code == 502
    assert raised.value.response.headers["x-llmproxy-error"] == "internal_error"
    [line] = _error_lines(logs)
    assert line["error"] == "KeyError" and line["error_id"] in raised.value.message
    _assert_clean(logs, err, OPENAI_KEY)
    assert proxy.server.pipeline.outcome.not_recorded_by == {"upstream_failed": 1}


def test_an_unexpected_error_after_the_answer_started_cuts_the_connection_and_logs_one_line(
    loop_thread: LoopThread, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    proxy = _proxy_with(loop_thread, tmp_path, "midstream")

    async def stream() -> tuple[int, bytes, BaseException | None]:
        received = b""
        async with aiohttp.ClientSession() as session:
            async with session.post(
                proxy.url + "/v1/chat/completions",
                json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "stream": True},
                headers={"Authorization": f"Bearer {OPENAI_KEY}"},
            ) as response:
                try:
                    async for chunk in response.content.iter_any():
                        received += chunk
                except aiohttp.ClientPayloadError as exc:
                    return response.status, received, exc
                return response.status, received, None

    try:
        with structlog.testing.capture_logs() as logs:
            status, received, cut = loop_thread.run(stream())
            loop_thread.run(asyncio.sleep(0))
    finally:
        proxy.stop()
    err = capfd.readouterr().err
    assert status == 200 and received.startswith(b'data: {"id":"c1"')
    assert cut is not None  # cut off, never a clean end that would look like a whole answer
    lines = _error_lines(logs)
    # One line from the handler (the write it could not make), one from the recording side.
    assert len(lines) == 2 and all(line["path"] == "/v1/chat/completions" for line in lines)
    _assert_clean(logs, err, OPENAI_KEY)
    assert files_under(tmp_path / "recordings") == []
