"""The recordings browser's JSON API: list, search, filters, view, diff, coverage and misses,
token and Host rules, path traversal refused, 10,000 recordings, and the /_llmproxy/ mount."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import openai
import pytest

from llmproxy.config import load_settings
from llmproxy.tools.ui import UIServer
from tests.support import CORPUS, SEED, CliProxy, LoopThread, start_proxy
from tests.ui_support import chat_recording, many_recordings, provider_recordings, seeded_directory, write_recording

SEED_ID = SEED.name


class Browser:
    """A running `llmproxy ui` server and a plain HTTP client for it."""

    def __init__(self, loop: LoopThread, root: Path, **options: Any) -> None:
        self.loop = loop
        self.server = UIServer(root, load_settings(None, {}).router(), port=0, **options)
        loop.run(self.server.start())

    def raw(self, target: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        """GET exactly this target (no client-side normalisation of '..' or %2e)."""
        connection = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=60)
        try:
            connection.request("GET", target, headers=headers or {})
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def get(self, path: str, headers: dict[str, str] | None = None, **params: Any) -> tuple[int, Any]:
        status, body = self.raw(f"/api/{path}" + (f"?{urlencode(params)}" if params else ""), headers)
        return status, json.loads(body)

    def ok(self, path: str, **params: Any) -> Any:
        status, data = self.get(path, **params)
        assert status == 200, data
        return data

    def loaded(self) -> Browser:
        assert self.server.catalog.loaded.wait(120), "the catalog did not finish loading"
        return self

    def stop(self) -> None:
        self.loop.run(self.server.stop())


@pytest.fixture
def browser(tmp_path: Path, loop_thread: LoopThread) -> Iterator[Browser]:
    running = Browser(loop_thread, seeded_directory(tmp_path / "recordings")).loaded()
    yield running
    running.stop()


def test_list_has_every_column(browser: Browser) -> None:
    data = browser.ok("recordings")
    assert data["loading"] is False and data["total"] == 3
    rows = {row["id"]: row for row in data["items"]}
    seed = rows[SEED_ID]
    assert seed["route"] == "openai" and seed["endpoint"] == "/v1/chat/completions" and seed["model"] == "gpt-4o"
    assert seed["status"] == 200 and seed["streamed"] is True and seed["chunks"] == 10
    assert seed["size"] == SEED.stat().st_size and seed["path"] == SEED_ID
    # The seed's stream carries no usage and no timing: shown as unknown, not as zero.
    assert seed["tokens_in"] is None and seed["cost_usd"] is None and seed["ttfc_ms"] is None
    assert seed["recorded_at"] is None and seed["age_s"] is None
    chat = rows["openai/chat-capital-a.json"]
    assert (chat["tokens_in"], chat["tokens_out"]) == (12, 5)
    assert chat["cost_usd"] == pytest.approx(12 * 2.5e-6 + 5 * 10e-6)
    assert (chat["ttfc_ms"], chat["total_ms"], chat["chunks"]) == (90.0, 90.0 + 15 * 3, 4)
    assert chat["recorded_at"] == "2025-09-10T12:00:00+00:00" and chat["age_s"] > 0
    assert chat["scope"] == "" and chat["used"] == "unknown" and chat["error"] is False
    assert data["facets"]["routes"] == ["openai"]
    assert data["totals"]["tokens_in"] == 24 and data["totals"]["unknown_cost"] == 1


def test_search_filters_sort_and_pages(browser: Browser) -> None:
    def ids(**params: Any) -> list[str]:
        return [row["id"] for row in browser.ok("recordings", **params)["items"]]

    assert ids(q="capital france") == ["openai/chat-capital-a.json", "openai/chat-capital-b.json"]
    assert ids(q="humans live on earth") == [SEED_ID]  # the answer, assembled from its chunks
    assert ids(q="which planet") == [SEED_ID]  # the prompt
    assert ids(q="capital", sort="tokens_in", order="asc", limit=1, offset=1) == ["openai/chat-capital-b.json"]
    assert ids(sort="cost_usd", order="desc")[-1] == SEED_ID  # unknown cost sorts last either way
    assert ids(status="error") == []
    assert ids(streamed="no") == []
    assert len(ids(model="gpt-4o", endpoint="chat")) == 3
    assert ids(older_than="30d") == [SEED_ID, "openai/chat-capital-a.json", "openai/chat-capital-b.json"]
    assert ids(newer_than="1h") == []  # unknown age is not shown as fresh
    status, data = browser.get("recordings", sort="../../etc")
    assert status == 400 and "cannot sort by" in data["error"]["message"]
    status, data = browser.get("recordings", older_than="yesterday")
    assert status == 400 and "30d" in data["error"]["message"]


def test_recording_view_has_conversation_answer_timeline_and_raw(browser: Browser) -> None:
    seed = browser.ok("recording", id=SEED_ID)
    assert [(b["role"], b["text"]) for b in seed["conversation"]] == [
        ("user", "Which planet do humans live on?"),
        ("assistant", "Humans live on Earth."),
        ("user", "Repeat your previous response in all caps."),
    ]
    assert [(b["role"], b["text"]) for b in seed["answer"]] == [("assistant", "HUMANS LIVE ON EARTH.")]
    assert seed["params"] == {"model": "gpt-4o", "response_format": {"type": "text"}, "stream": True}
    assert seed["raw"] == SEED.read_text()
    chat = browser.ok("recording", id="openai/chat-capital-a.json")
    assert chat["timing"] == {"headers_ms": 80.0, "chunk_ms": [90.0, 105.0, 120.0, 135.0]}
    assert chat["response_headers"]["x-request-id"] == "req_1"
    assert chat["provenance"]["response_model"] == "gpt-4o-2024-08-06"
    assert chat["usage"]["input_tokens"] == 12 and chat["conversation"][0]["role"] == "system"


def test_diff_of_two_recordings(browser: Browser) -> None:
    diff = browser.ok("diff", a="openai/chat-capital-a.json", b="openai/chat-capital-b.json")
    assert diff["request"] == ["temperature: 0.9 != 0.2 recorded"]
    assert (diff["answer_a"], diff["answer_b"]) == ("Paris.", "It is Paris.")
    assert ["-", "Paris."] in diff["answer_diff"] and ["+", "It is Paris."] in diff["answer_diff"]


@pytest.mark.parametrize(
    "target",
    [
        "/api/recording?id=../../etc/passwd",
        "/api/recording?id=%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "/api/recording?id=%2Fetc%2Fpasswd",
        "/api/recording?id=openai/../../outside.json",
        "/api/recording?id=openai%2F..%2F..%2Foutside.json",
        "/api/recording?id=linked.json",
        "/api/recording?id=linkdir/outside.json",
        "/api/diff?a=../outside.json&b=" + SEED_ID,
        "/../../outside.json",
        "/%2e%2e/%2e%2e/outside.json",
        "/api/../../outside.json",
        "/static/..%2f..%2foutside.json",
    ],
)
def test_paths_outside_the_directory_are_refused(tmp_path: Path, loop_thread: LoopThread, target: str) -> None:
    root = seeded_directory(tmp_path / "recordings")
    secret = "OUTSIDE-THE-RECORDINGS-DIRECTORY"
    outside = write_recording(tmp_path, "outside.json", chat_recording(secret, secret))
    os.symlink(outside, root / "linked.json")
    os.symlink(tmp_path, root / "linkdir")
    running = Browser(loop_thread, root).loaded()
    try:
        status, body = running.raw(target)
        assert status in (400, 404), (status, body[:200])
        assert secret.encode() not in body
        # Symlinks are not listed either, and nothing reads through them.
        listed = running.ok("recordings", q=secret.lower())
        assert listed["items"] == [] and running.ok("recordings")["total"] == 3
    finally:
        running.stop()


def test_token_and_host_rules(tmp_path: Path, loop_thread: LoopThread) -> None:
    running = Browser(loop_thread, seeded_directory(tmp_path / "recordings"), token="s3cret").loaded()
    try:
        status, data = running.get("recordings")
        assert status == 401 and "x-llmproxy-token" in data["error"]["message"]
        status, data = running.get("recordings", headers={"x-llmproxy-token": "wrong"})
        assert status == 401
        status, data = running.get("recordings", headers={"x-llmproxy-token": "s3cret"})
        assert status == 200 and data["total"] == 3
        status, page = running.raw("/")  # the page holds no data: it asks for the token
        assert status == 200 and b"llmproxy recordings" in page
        # A page elsewhere reaching 127.0.0.1 through a DNS name it controls is refused.
        status, body = running.raw("/", headers={"Host": "attacker.example:80"})
        assert status == 403 and b"llmproxy recordings" not in body
        status, _ = running.get("recordings", headers={"x-llmproxy-token": "s3cret", "Host": "localhost:1"})
        assert status == 200
    finally:
        running.stop()


def test_ten_thousand_recordings_first_page(tmp_path: Path, loop_thread: LoopThread) -> None:
    root = many_recordings(tmp_path / "recordings", 10_000)
    running = Browser(loop_thread, root)
    try:
        first = running.ok("recordings", limit=100)  # answered while the catalog still loads
        # What is loaded so far, never more than a page: the page paints before the catalog is whole.
        assert first["total"] == first["loaded"] and len(first["items"]) == min(100, first["loaded"])
        running.loaded()
        page = running.ok("recordings", limit=100)
        assert page["total"] == 10_000 and len(page["items"]) == 100
        assert page["items"][0]["id"] == "openai/00/chat-00000.json"
        last = running.ok("recordings", limit=100, offset=9_950, sort="path")
        assert [row["id"] for row in last["items"]][-1] == "openai/09/chat-09999.json"
        assert running.ok("recordings", q="number 4242:")["total"] == 1
    finally:
        running.stop()


def test_coverage_and_a_miss_against_its_nearest_recording(tmp_path: Path, loop_thread: LoopThread) -> None:
    root = seeded_directory(tmp_path / "recordings")
    report = tmp_path / "report.json"
    proxy = start_proxy(loop_thread, "replay", root, report=report)
    try:
        client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0)
        messages: Any = [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "What is the capital of France?"},
        ]
        for temperature in (0.2, 0.3):  # the first is recorded, the second is not
            try:
                client.chat.completions.create(
                    model="gpt-4o",
                    messages=messages,
                    temperature=temperature,
                    stream=True,
                    stream_options={"include_usage": True},
                ).close()
            except openai.NotFoundError as exc:
                assert temperature == 0.3 and "no recording" in str(exc)
    finally:
        proxy.stop()
    running = Browser(loop_thread, root, report=report).loaded()
    try:
        coverage = running.ok("coverage")
        assert coverage["used"] == ["openai/chat-capital-a.json"]
        assert coverage["unused"] == [SEED_ID, "openai/chat-capital-b.json"]
        assert [(m["n"], m["path"]) for m in coverage["missed"]] == [(0, "/v1/chat/completions")]
        listed = running.ok("recordings", used="unused")
        assert [row["id"] for row in listed["items"]] == [SEED_ID, "openai/chat-capital-b.json"]
        assert listed["report"]["misses"] == 1 and listed["report"]["saved"]["replays"] == 1
        miss = running.ok("miss", n=0)
        assert miss["nearest"]["id"] == "openai/chat-capital-a.json"
        assert miss["differences"] == ["temperature: 0.3 != 0.2 recorded"]
        status, data = running.get("miss", n=5)
        assert status == 404
    finally:
        running.stop()
    # A teammate's checkout of the same recordings, elsewhere on disk, reads the report the same way.
    checkout = shutil.copytree(root, tmp_path / "checkout")
    elsewhere = Browser(loop_thread, checkout, report=report).loaded()
    try:
        assert elsewhere.ok("coverage")["unused"] == [SEED_ID, "openai/chat-capital-b.json"]
    finally:
        elsewhere.stop()


def test_mounted_on_a_running_proxy(tmp_path: Path, loop_thread: LoopThread) -> None:
    root = seeded_directory(tmp_path / "recordings")
    proxy = start_proxy(loop_thread, "replay", root, ui=True, token="t0k")
    try:
        host = proxy.url.removeprefix("http://")
        connection = http.client.HTTPConnection(host, timeout=60)
        connection.request("GET", "/_llmproxy/")
        response = connection.getresponse()
        assert response.status == 200 and b"llmproxy recordings" in response.read()
        connection.request("GET", "/_llmproxy/api/recordings?q=humans", headers={"x-llmproxy-token": "t0k"})
        response = connection.getresponse()
        data = json.loads(response.read())
        assert response.status == 200 and [row["id"] for row in data["items"]] == [SEED_ID]
        connection.request("GET", "/_llmproxy/api/recordings")
        assert connection.getresponse().status == 401
        connection.close()
        # The proxy itself still replays.
        client = openai.OpenAI(
            base_url=proxy.url + "/v1", api_key="unused", default_headers={"x-llmproxy-token": "t0k"}
        )
        stream = client.chat.completions.create(
            model="gpt-4o",
            messages=[
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": "What is the capital of France?"},
            ],
            temperature=0.2,
            stream=True,
            stream_options={"include_usage": True},
        )
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "Paris."
    finally:
        proxy.stop()


def test_ui_command_serves_the_page(tmp_path: Path) -> None:
    root = seeded_directory(tmp_path / "recordings")
    cli = CliProxy("ui", "--recordings", str(root), "--port", "0")
    try:
        connection = http.client.HTTPConnection("127.0.0.1", cli.port, timeout=60)
        connection.request("GET", "/")
        response = connection.getresponse()
        assert response.status == 200 and b"<script>" in response.read()
        assert "default-src 'none'" in (response.getheader("Content-Security-Policy") or "")
        connection.request("GET", "/api/recording?id=" + SEED_ID)
        response = connection.getresponse()
        assert response.status == 200 and "HUMANS LIVE ON EARTH." in response.read().decode()
        connection.close()
    finally:
        events = cli.stop()
    assert any(event.get("event") == "listening" and event.get("mode") == "ui" for event in events)


EXPECTED_CONVERSATION = [
    ("system", "text", "Be brief."),
    ("user", "text", "Weather here?"),
    ("user", "image", "[image]"),
    ("assistant", "tool_call", "weather"),
    ("tool", "tool_result", "sunny"),
]


@pytest.mark.parametrize("shape", sorted(provider_recordings()))
def test_conversation_bubbles_per_provider(shape: str, tmp_path: Path, loop_thread: LoopThread) -> None:
    root = tmp_path / "recordings"
    write_recording(root, f"{shape}.json", provider_recordings()[shape])
    running = Browser(loop_thread, root).loaded()
    try:
        view = running.ok("recording", id=f"{shape}.json")
        assert view["row"]["problem"] == ""
        found = []
        for bubble in view["conversation"]:
            # Images are placeholders (never the base64), tool calls are named, results are text.
            summary = bubble["name"] if bubble["kind"] == "tool_call" else bubble["text"]
            if bubble["kind"] == "image":
                assert bubble["text"].startswith("[image") and "iVBOR" not in bubble["text"]
                summary = "[image]"
            found.append((bubble["role"], bubble["kind"], summary))
        assert [f[:2] for f in found] == [e[:2] for e in EXPECTED_CONVERSATION]
        assert [f[2] for f in found if f[1] != "tool_result"] == [
            e[2] for e in EXPECTED_CONVERSATION if e[1] != "tool_result"
        ]
        assert "sunny" in found[-1][2]
        assert [(b["role"], b["text"]) for b in view["answer"]] == [("assistant", "It is sunny.")]
        assert (view["row"]["tokens_in"], view["row"]["tokens_out"]) == (30, 6)
        assert running.ok("recordings", q="weather sunny")["total"] == 1
    finally:
        running.stop()


def test_unreadable_files_are_listed_as_errors_and_reload_sees_new_files(
    tmp_path: Path, loop_thread: LoopThread
) -> None:
    root = seeded_directory(tmp_path / "recordings")
    (root / "broken.json").write_text('{"request": ')
    running = Browser(loop_thread, root).loaded()
    try:
        errors = running.ok("recordings", status="error")["items"]
        assert [row["id"] for row in errors] == ["broken.json"]
        assert errors[0]["problem"].startswith("not valid JSON")
        view = running.ok("recording", id="broken.json")
        assert view["raw"] == '{"request": ' and "conversation" not in view
        write_recording(root, "openai/new.json", chat_recording("A new question", "A new answer."))
        assert running.ok("recordings", q="new question")["total"] == 0
        running.ok("reload")
        running.loaded()
        assert [row["id"] for row in running.ok("recordings", q="new question")["items"]] == ["openai/new.json"]
    finally:
        running.stop()


def test_a_missed_request_with_a_credential_is_not_written_to_the_report(
    tmp_path: Path, loop_thread: LoopThread
) -> None:
    root = seeded_directory(tmp_path / "recordings")
    report = tmp_path / "report.json"
    secret = "sk-proj-" + "A1b2C3d4E5" * 4
    proxy = start_proxy(loop_thread, "replay", root, report=report)
    try:
        client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": f"my key is {secret}"}]
            )
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "harmless"}])
    finally:
        proxy.stop()
    text = report.read_text()
    assert secret not in text
    first, second = json.loads(text)["misses"]
    assert "body" not in first and first["dropped"].startswith("request left out: openai key")
    assert second["body"]["messages"] == [{"role": "user", "content": "harmless"}]


def test_another_recorders_corpus_browses_whole(loop_thread: LoopThread) -> None:
    if not CORPUS.is_dir():
        pytest.skip(f"the shared corpus is not here ({CORPUS})")
    running = Browser(loop_thread, CORPUS).loaded()
    try:
        rows = running.ok("recordings", limit=500)["items"]
        assert len(rows) == 77 and [row["problem"] for row in rows if row["problem"]] == []
        # Its top-level test_id, where it kept one, is the test column.
        scopes = [row["scope"] for row in rows if row["scope"]]
        assert len(scopes) == 22 and all(scope.startswith("tests/integration/") for scope in scopes)
        answers = {}
        for row in rows:
            if row["endpoint"] in ("/v1/messages", "/v1beta/interactions") and not row["error"]:
                view = running.ok("recording", id=row["id"])
                answers[row["id"]] = [(b["kind"], b["name"], b["text"]) for b in view["answer"]]
        # Anthropic thinking comes before the answer; Gemini Interactions text deltas are the answer.
        assert ("text", "", "Your name is Alice.") in [kinds[-1] for kinds in answers.values()]
        assert sum(1 for kinds in answers.values() if kinds and kinds[0][1] == "thinking") == 4
        assert ("text", "", "Hi there! How can I help you today?") in [k for kinds in answers.values() for k in kinds]
        # Model lists and embeddings are summarised, not dumped into a bubble.
        for row in rows:
            if row["endpoint"] in ("/v1/models", "/v1/embeddings"):
                (answer,) = running.ok("recording", id=row["id"])["answer"]
                assert answer["text"].endswith(("models]", "dimensions]")), answer
        by_route = {item["group"]: item for item in running.ok("costs", by="route")["items"]}
        assert by_route["anthropic"]["tokens_in"] > 0 and by_route["ollama"]["tokens_out"] > 0
    finally:
        running.stop()


def test_expect_on_the_mounted_page_gets_one_100_continue(tmp_path: Path, loop_thread: LoopThread) -> None:
    """The front answers `Expect: 100-continue` before the body; the page's router must not
    answer it a second time (the client would read the second as part of the answer)."""
    root = seeded_directory(tmp_path / "recordings")
    proxy = start_proxy(loop_thread, "replay", root, ui=True)
    try:
        with socket.create_connection(("127.0.0.1", proxy.server.port), timeout=30) as sock:
            sock.sendall(
                b"POST /_llmproxy/api/recordings HTTP/1.1\r\nHost: 127.0.0.1\r\nExpect: 100-continue\r\n"
                b"Content-Length: 2\r\nConnection: close\r\n\r\n"
            )
            interim = b""
            while b"\r\n\r\n" not in interim:
                chunk = sock.recv(65536)
                assert chunk, interim
                interim += chunk
            assert interim.startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
            sock.sendall(b"{}")
            data = interim
            while chunk := sock.recv(65536):
                data += chunk
        assert data.count(b"100 Continue") == 1, data[:300]
        final = data.partition(b"HTTP/1.1 100 Continue\r\n\r\n")[2]
        assert final.startswith(b"HTTP/1.1 ") and not final.startswith(b"HTTP/1.1 1")
    finally:
        proxy.stop()
