"""Integration tier against an upstream nobody on this project wrote: `llmock` from PyPI.

Our fake upstreams and our proxy could share a misunderstanding of a wire format; llmock's
authors made their own reading of it. Record through llmproxy with the real SDKs, stop llmock,
replay. `.ci/run` installs llmock into `.venv-llmock`; without it this tier skips, visibly."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
from google import genai
from google.genai import types as genai_types

from tests.providers_support import write_config
from tests.support import REPO, LoopThread, files_under, free_port, start_proxy, wait_until
from tests.test_providers import dump

pytestmark = pytest.mark.llmock


def _llmock_binary() -> str | None:
    candidates = [os.environ.get("LLMOCK_BIN"), str(REPO / ".venv-llmock" / "bin" / "llmock"), shutil.which("llmock")]
    return next((c for c in candidates if c and Path(c).is_file()), None)


class Llmock:
    def __init__(self, process: subprocess.Popen[bytes], url: str) -> None:
        self.process = process
        self.url = url

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


@pytest.fixture
def llmock() -> Iterator[Llmock]:
    binary = _llmock_binary()
    if binary is None:
        pytest.skip("llmock is not installed (.ci/run installs it into .venv-llmock): third-party tier skipped")
    port = free_port()
    process = subprocess.Popen(
        [
            binary,
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--response-style",
            "echo",
            "--log-level",
            "warning",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def accepting() -> bool:
        if process.poll() is not None:
            pytest.fail(f"llmock exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        except OSError:
            return False
        return True

    try:
        wait_until(accepting, "llmock to accept connections", timeout=60)
    except TimeoutError:
        process.kill()
        raise
    server = Llmock(process, f"http://127.0.0.1:{port}")
    try:
        yield server
    finally:
        server.stop()


def _calls(base_url: str) -> dict[str, Any]:
    oa = openai.OpenAI(base_url=base_url + "/v1", api_key="sk-llmock-test-key-000000000000", max_retries=0)
    an = anthropic.Anthropic(base_url=base_url + "/anthropic", api_key="sk-ant-llmock-key-0000000000", max_retries=0)
    ge = genai.Client(
        api_key="AIza-llmock-key-000000000000000",
        http_options=genai_types.HttpOptions(base_url=base_url + "/gemini", api_version="v1beta"),
    )
    messages = [{"role": "user", "content": "record me through the proxy"}]
    out: dict[str, Any] = {
        "chat": dump(oa.chat.completions.create(model="gpt-4o", messages=messages)),
        "chat_stream": dump(list(oa.chat.completions.create(model="gpt-4o", messages=messages, stream=True))),
        "responses": dump(oa.responses.create(model="gpt-4o", input="responses via llmock")),
        "embeddings": dump(oa.embeddings.create(model="text-embedding-3-small", input="vector")),
        "models": dump(oa.models.list().data),
        "anthropic": dump(an.messages.create(model="claude-test", max_tokens=50, messages=messages)),
        "anthropic_stream": dump(
            list(an.messages.create(model="claude-test", max_tokens=50, messages=messages, stream=True))
        ),
        "gemini": dump(ge.models.generate_content(model="gemini-2.0-flash", contents="gemini via llmock")),
        "gemini_stream": dump(list(ge.models.generate_content_stream(model="gemini-2.0-flash", contents="stream it"))),
    }
    with oa.responses.stream(model="gpt-4o", input="helper via llmock") as stream:
        out["responses_helper"] = dump(stream.get_final_response())
    with an.messages.stream(model="claude-test", max_tokens=50, messages=messages) as stream:
        out["anthropic_helper"] = "".join(stream.text_stream)
    for key in ("gemini", "gemini_stream"):
        for item in out[key] if isinstance(out[key], list) else [out[key]]:
            item.pop("sdk_http_response", None)
    return out


def test_record_llmock_with_real_sdks_then_replay_with_llmock_stopped(
    loop_thread: LoopThread, tmp_path: Path, llmock: Llmock
) -> None:
    upstream = llmock.url
    config = write_config(
        tmp_path / "llmproxy.toml",
        [
            {"name": "openai", "provider": "openai", "upstream": upstream},
            {"name": "anthropic", "provider": "anthropic", "prefix": "/anthropic", "upstream": upstream + "/anthropic"},
            {"name": "gemini", "provider": "gemini", "prefix": "/gemini", "upstream": upstream + "/gemini"},
        ],
    )
    recordings = tmp_path / "recordings"
    proxy = start_proxy(loop_thread, "record", recordings, config=config)
    try:
        recorded = _calls(proxy.url)
    finally:
        proxy.stop()
        llmock.stop()
    assert proxy.server.mode.outcome.errors == 0
    assert {p.parent.name for p in files_under(recordings)} == {"openai", "anthropic", "gemini"}
    replay = start_proxy(loop_thread, "replay", recordings, config=config)
    try:
        replayed = _calls(replay.url)
    finally:
        replay.stop()
    assert replayed == recorded
    assert replay.server.mode.outcome.misses == 0
    assert recorded["anthropic_helper"] == "".join(
        event["delta"]["text"] for event in recorded["anthropic_stream"] if event["type"] == "content_block_delta"
    )
