"""`llmproxy run` points Cohere's and Vertex AI's SDKs at the proxy through the variables their
providers declare (CO_API_URL, GOOGLE_VERTEX_BASE_URL): a child that names no base URL records,
then replays with the upstreams gone and no Cohere key at all (a placeholder stands in)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from llmproxy import providers
from tests.providers_support import write_config
from tests.support import LoopThread, RunningApp, assert_no_secret, files_under
from tests.upstreams.cohere_wire import CohereWire
from tests.upstreams.vertex_wire import VertexWire

COHERE_KEY = "co-test-SECRET-env-key-0123456789abcdef"
OAUTH_TOKEN = "ya29.a0FAKE-env-oauth-token-0123456789abcdef"

CHILD = """
import os, sys
import cohere
from google import genai
from google.oauth2.credentials import Credentials

co = cohere.ClientV2()  # base URL (CO_API_URL) and key (CO_API_KEY) from the environment
reply = co.chat(model="command-a-03-2025", messages=[{"role": "user", "content": "env"}])
print(reply.message.content[0].text)
events = list(co.chat_stream(model="command-a-03-2025", messages=[{"role": "user", "content": "envs"}]))
print(events[-1].type)
vertex = genai.Client(vertexai=True, project="p", location="us-central1", credentials=Credentials(token=sys.argv[1]))
print(vertex.models.generate_content(model="gemini-2.5-flash", contents="from env").text)
print(os.environ["CO_API_URL"], os.environ["GOOGLE_VERTEX_BASE_URL"])
"""


def _run(mode: str, recordings: Path, config: Path, child: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "llmproxy", "run", mode, "--recordings", str(recordings), "--config", str(config)]
    return subprocess.run(
        [*command, "--", sys.executable, str(child), OAUTH_TOKEN],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_cohere_and_vertex_sdks_find_the_proxy_through_their_variables(loop_thread: LoopThread, tmp_path: Path) -> None:
    settings = providers.client_environment("http://127.0.0.1:9")
    assert settings["CO_API_URL"] == "http://127.0.0.1:9/cohere"
    assert settings["GOOGLE_VERTEX_BASE_URL"] == "http://127.0.0.1:9/vertex"
    assert providers.PLACEHOLDER_KEYS["CO_API_KEY"]
    cohere_up, vertex_up = CohereWire(), VertexWire()
    cohere_app = RunningApp(loop_thread, cohere_up.app()).start()
    vertex_app = RunningApp(loop_thread, vertex_up.app()).start()
    config = write_config(
        tmp_path / "llmproxy.toml",
        [
            {"name": "cohere", "provider": "cohere", "upstream": cohere_app.url},
            {"name": "vertex", "provider": "vertex", "upstream": vertex_app.url},
        ],
    )
    child = tmp_path / "child.py"
    child.write_text(CHILD)
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("CO_", "COHERE_", "GOOGLE_"))}
    recordings = tmp_path / "recordings"
    try:
        recorded = _run("record", recordings, config, child, {**base_env, "CO_API_KEY": COHERE_KEY})
    finally:
        cohere_app.stop()
        vertex_app.stop()
    assert recorded.returncode == 0, recorded.stderr[-2000:]
    assert [r["path"] for r in cohere_up.requests] == ["/v2/chat", "/v2/chat"]
    assert cohere_up.requests[0]["headers"]["Authorization"] == f"Bearer {COHERE_KEY}"
    assert vertex_up.requests[0]["path"].startswith("/v1beta1/projects/p/locations/us-central1/publishers/google/")
    assert vertex_up.requests[0]["headers"]["Authorization"] == f"Bearer {OAUTH_TOKEN}"
    assert_no_secret(recordings, COHERE_KEY, OAUTH_TOKEN)
    assert sorted(p.parent.name for p in files_under(recordings)) == ["cohere", "cohere", "vertex"]
    replayed = _run("replay", recordings, config, child, base_env)  # no CO_API_KEY: the placeholder starts the SDK
    assert replayed.returncode == 0, replayed.stderr[-2000:]
    lines = recorded.stdout.splitlines()
    assert lines[:3] == ["Echo: env", "message-end", "Vertex gemini-2.5-flash says: from env"]
    assert replayed.stdout.splitlines()[:3] == lines[:3]
    cohere_url, vertex_url = lines[3].split()
    assert cohere_url.endswith("/cohere") and vertex_url.endswith("/vertex")
    assert "hits=3" in replayed.stderr
