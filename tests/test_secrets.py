"""Secrets never reach disk or logs: keys inside bodies that are not JSON, the request's own
credentials echoed by an upstream, refusal by default, redaction (that still replays) on request,
an allow-list, and console tracebacks without local variables."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.support import REPO, CliProxy, LoopThread, RunningApp, assert_no_secret, files_under

OPENAI_KEY = "sk-proj-" + "A1b2C3d4E5f6G7h8I9j0" * 2
ANTHROPIC_KEY = "sk-ant-api03-" + "Z9y8X7w6V5u4T3s2R1q0" * 2
AZURE_KEY = "0123456789abcdef0123456789abcdef"  # Azure's api-key: 32 hex, no known prefix
GROQ_KEY = "gsk_" + "Qw3rTy7uI0pAsDfGhJkL" * 2
COOKIE = "sess-" + "c00k1e" * 6
QUERY_KEY = "qk-" + "9f8e7d6c5b4a" * 3


class EchoUpstream:
    """An OpenAI-shaped upstream that quotes what it got back in its answer, as real upstreams
    do in error messages ("Incorrect API key provided: ..."): body text, and every credential."""

    def __init__(self) -> None:
        self.calls = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self.chat)  # any provider's path: it only echoes
        return app

    async def chat(self, request: web.Request) -> web.Response:
        self.calls += 1
        body = await request.text()
        credentials = [
            request.headers.get(name, "") for name in ("Authorization", "api-key", "x-api-key", "Cookie")
        ] + [value for name, value in request.query.items() if name in ("api_key", "token")]
        quoted = " ".join(value for value in credentials if value)
        status = int(request.headers.get("x-answer-status", "200"))
        if status != 200:
            error = {"message": f"Incorrect API key provided: {quoted}", "type": "invalid_request_error"}
            return web.json_response({"error": error}, status=status)
        content = f"you sent {body[:200]} with {quoted}"
        answer = {
            "id": "chatcmpl-echo",
            "object": "chat.completion",
            "created": 1,
            "model": "gpt-4o",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        }
        return web.json_response(answer)


@pytest.fixture
def upstream(loop_thread: LoopThread) -> Iterator[tuple[EchoUpstream, RunningApp]]:
    echo = EchoUpstream()
    app = RunningApp(loop_thread, echo.app()).start()
    yield echo, app
    app.stop()


def _config(tmp_path: Path, **proxy: Any) -> Path:
    lines = ["[proxy]"] + [f"{key} = {json.dumps(value)}" for key, value in proxy.items()]
    path = tmp_path / "llmproxy.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _proxy(mode: str, recordings: Path, upstream_url: str | None, config: Path | None = None) -> CliProxy:
    args = [mode, "--recordings", str(recordings), "--port", "0"]
    if upstream_url:
        args += ["--upstream", upstream_url]
    if config is not None:
        args += ["--config", str(config)]
    return CliProxy(*args)


async def _post(
    url: str,
    data: bytes,
    content_type: str,
    headers: dict[str, str] | None = None,
    params: dict | None = None,
    path: str = "/v1/chat/completions",
) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as session:
        async with session.post(
            url + path,
            data=data,
            params=params,
            headers={"Content-Type": content_type, **(headers or {})},
        ) as response:
            return response.status, json.loads(await response.text())


def _recordings(directory: Path) -> list[Path]:
    return [p for p in files_under(directory) if p.suffix == ".json"] if directory.exists() else []


def _refusals(events: list[dict[str, Any]]) -> list[str]:
    return [e["findings"] for e in events if e["event"] == "recording refused: it would hold a credential"]


def _no_secret_in_logs(events: list[dict[str, Any]], *secrets: str) -> None:
    text = json.dumps(events)
    for secret in secrets:
        assert secret not in text


@pytest.mark.parametrize(
    ("body", "content_type", "secret"),
    [
        (b"model=gpt-4o&api_key=" + OPENAI_KEY.encode() + b"&q=hi", "application/x-www-form-urlencoded", OPENAI_KEY),
        (b"please use " + ANTHROPIC_KEY.encode(), "text/plain", ANTHROPIC_KEY),
    ],
)
def test_key_in_a_body_that_is_not_json_is_refused_and_check_finds_it(
    loop_thread: LoopThread, tmp_path: Path, upstream: Any, body: bytes, content_type: str, secret: str
) -> None:
    echo, app = upstream
    recordings = tmp_path / "rec"
    proxy = _proxy("record", recordings, app.url)
    status, answer = loop_thread.run(_post(proxy.url, body, content_type))
    events = proxy.stop()
    assert status == 200 and answer["object"] == "chat.completion"  # the client is served
    assert _recordings(recordings) == []  # but nothing is written
    refusals = _refusals(events)
    assert refusals and "request.body(decoded)" in refusals[0]
    _no_secret_in_logs(events, secret)
    # `check` decodes such bodies too: the same file written by hand (base64, as the format has it).
    hand = recordings / "openai" / "by-hand.json"
    hand.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "request": {
            "method": "POST",
            "url": "https://api.openai.com/v1/chat/completions",
            "endpoint": "/v1/chat/completions",
            "headers": {},
            "body": {"__type__": "llmproxy.bytes", "__data__": base64.b64encode(body).decode()},
        },
        "response": {"status": 200, "headers": {}, "body": {"ok": True}, "is_streaming": False},
        "provenance": {"tool": "llmproxy"},
    }
    hand.write_text(json.dumps(document))
    checked = subprocess.run(
        [sys.executable, "-m", "llmproxy", "check", str(recordings)], capture_output=True, text=True, cwd=tmp_path
    )
    assert checked.returncode == 1
    assert "secret" in checked.stdout and "request.body(decoded)" in checked.stdout
    assert secret not in checked.stdout + checked.stderr


@pytest.mark.parametrize(
    ("headers", "params", "secret", "where"),
    [
        # Each credential on its own provider's route (another provider's route refuses it unsent).
        ({"api-key": AZURE_KEY}, {"api-version": "2024-06-01"}, AZURE_KEY, "header api-key"),
        ({"x-api-key": GROQ_KEY, "anthropic-version": "2023-06-01"}, None, GROQ_KEY, "header x-api-key"),
        ({"Cookie": f"session={COOKIE}; theme=dark"}, None, COOKIE, "cookie session"),
        ({}, {"api_key": QUERY_KEY}, QUERY_KEY, "query api_key"),
        ({}, {"token": QUERY_KEY}, QUERY_KEY, "query token"),
    ],
)
def test_credential_echoed_by_the_upstream_is_refused_and_named(
    loop_thread: LoopThread,
    tmp_path: Path,
    upstream: Any,
    headers: dict[str, str],
    params: dict | None,
    secret: str,
    where: str,
) -> None:
    echo, app = upstream
    recordings = tmp_path / "rec"
    paths = {
        "api-key": ("azure", "/azure/openai/deployments/gpt-4o/chat/completions"),
        "x-api-key": ("anthropic", "/anthropic/v1/messages"),
    }
    provider, path = next((paths[name] for name in headers if name in paths), ("openai", "/v1/chat/completions"))
    config = tmp_path / "llmproxy.toml"
    config.write_text(f'[[routes]]\nname = "{provider}"\nprovider = "{provider}"\nupstream = "{app.url}"\n')
    proxy = _proxy("record", recordings, None, config)
    body = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}).encode()
    status, answer = loop_thread.run(
        _post(proxy.url, body, "application/json", {**headers, "x-answer-status": "401"}, params, path)
    )
    events = proxy.stop()
    assert status == 401 and secret in answer["error"]["message"]  # the client sees the upstream's answer
    assert _recordings(recordings) == []
    assert_no_secret(recordings, secret) if recordings.exists() else None
    refusals = _refusals(events)
    assert refusals and f"credential from request {where} in response.body" in refusals[0], refusals
    _no_secret_in_logs(events, secret)


def test_redact_records_placeholders_names_fields_and_still_replays(
    loop_thread: LoopThread, tmp_path: Path, upstream: Any
) -> None:
    echo, app = upstream
    recordings = tmp_path / "rec"
    config = _config(tmp_path, secrets="redact")
    body = json.dumps(
        {"model": "gpt-4o", "messages": [{"role": "user", "content": f"my key is {OPENAI_KEY}, keep it"}]}
    ).encode()
    form = b"model=gpt-4o&api_key=" + OPENAI_KEY.encode()
    auth = {"Authorization": f"Bearer {GROQ_KEY}"}
    proxy = _proxy("record", recordings, app.url, config)
    # A credential-named query parameter stays in the URL (only known ones are dropped): redacted too.
    params = {"session_token": QUERY_KEY}
    first = loop_thread.run(_post(proxy.url, body, "application/json", auth, params))
    second = loop_thread.run(_post(proxy.url, form, "application/x-www-form-urlencoded", auth))
    events = proxy.stop()
    assert first[0] == second[0] == 200 and OPENAI_KEY in first[1]["choices"][0]["message"]["content"]
    files = _recordings(recordings)
    assert len(files) == 2
    assert_no_secret(recordings, OPENAI_KEY, GROQ_KEY, QUERY_KEY)
    text = " ".join(path.read_text() for path in files)
    assert "[redacted openai key]" in text and "[redacted credential from request header authorization]" in text
    redactions = [e for e in events if e["event"] == "credentials redacted from the recording"]
    assert len(redactions) == 2
    assert any("response.body" in field for e in redactions for field in e["fields"])
    _no_secret_in_logs(events, OPENAI_KEY, GROQ_KEY, QUERY_KEY)
    # Replay (same config) matches the same requests, secrets and all, and serves the redacted answer.
    replay = _proxy("replay", recordings, None, config)
    try:
        replayed = loop_thread.run(_post(replay.url, body, "application/json", auth, params))
        replayed_form = loop_thread.run(_post(replay.url, form, "application/x-www-form-urlencoded", auth))
    finally:
        replay_events = replay.stop()
    assert replayed[0] == replayed_form[0] == 200, (replayed, replayed_form)
    content = replayed[1]["choices"][0]["message"]["content"]
    assert "[redacted openai key]" in content and OPENAI_KEY not in content
    assert echo.calls == 2  # replay never went upstream
    assert not [e for e in replay_events if e["event"] == "replay miss"]


def test_secret_allow_lets_a_listed_test_key_be_recorded(
    loop_thread: LoopThread, tmp_path: Path, upstream: Any
) -> None:
    echo, app = upstream
    recordings = tmp_path / "rec"
    test_key = "sk-test-" + "0" * 24
    config = _config(tmp_path, secret_allow=[test_key])
    proxy = _proxy("record", recordings, app.url, config)
    body = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": f"fixture {test_key}"}]})
    status, _ = loop_thread.run(_post(proxy.url, body.encode(), "application/json"))
    events = proxy.stop()
    assert status == 200 and not _refusals(events)
    files = _recordings(recordings)
    assert len(files) == 1 and test_key in files[0].read_text()


def test_console_traceback_never_shows_local_variables(tmp_path: Path) -> None:
    """structlog's console renderer prints every frame's locals when rich is installed (the
    client's Authorization header appeared in the log)."""
    pytest.importorskip("rich")  # the fault needs rich; the test extra installs it
    script = (
        "import structlog\n"
        "from llmproxy.logs import configure_logging\n"
        "configure_logging(level='info')\n"
        "def handle():\n"
        f"    authorization = 'Bearer {OPENAI_KEY}'\n"
        "    raise RuntimeError('boom')\n"
        "try:\n"
        "    handle()\n"
        "except RuntimeError:\n"
        "    structlog.get_logger('t').exception('recording not written')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *sys.path])},
    )
    assert done.returncode == 0, done.stderr
    assert "recording not written" in done.stderr and "RuntimeError: boom" in done.stderr
    assert OPENAI_KEY not in done.stderr


DIGITS_KEY = "481516234248151623"  # a gateway token of digits: echoed as a JSON number, it is those digits


def _shape_upstream() -> web.Application:
    """An upstream that puts the bearer token where no string holds it: as a number, or as a
    field name (the scanner names fields by path, and paths are logged)."""

    async def answer(request: web.Request) -> web.Response:
        token = request.headers["Authorization"].removeprefix("Bearer ")
        if request.headers["x-shape"] == "number":
            text = '{"id":"chatcmpl-1","object":"chat.completion","usage":{"total_tokens":' + token + "}}"
        else:
            text = json.dumps({"id": "chatcmpl-1", "object": "chat.completion", "seen": {token: {"ok": token}}})
        return web.Response(text=text, content_type="application/json")

    app = web.Application()
    app.router.add_post("/{tail:.*}", answer)
    return app


@pytest.mark.parametrize("policy", ["refuse", "redact"])
@pytest.mark.parametrize(("shape", "secret"), [("number", DIGITS_KEY), ("name", GROQ_KEY)])
def test_credential_echoed_as_a_number_or_a_field_name_never_reaches_disk_or_logs(
    loop_thread: LoopThread, tmp_path: Path, shape: str, secret: str, policy: str
) -> None:
    app = RunningApp(loop_thread, _shape_upstream()).start()
    recordings = tmp_path / "rec"
    proxy = _proxy("record", recordings, app.url, _config(tmp_path, secrets=policy))
    body = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}).encode()
    headers = {"Authorization": f"Bearer {secret}", "x-shape": shape}
    try:
        status, answer = loop_thread.run(_post(proxy.url, body, "application/json", headers))
    finally:
        events = proxy.stop()
        app.stop()
    assert status == 200 and secret in json.dumps(answer)  # the client gets the answer as sent
    files = _recordings(recordings)
    if policy == "refuse":
        assert files == [] and len(_refusals(events)) == 1
    else:
        assert len(files) == 1 and "[redacted credential from request header authorization]" in files[0].read_text()
    if recordings.exists():
        assert_no_secret(recordings, secret)
    _no_secret_in_logs(events, secret)


# -- a key split across a stream's chunks ------------------------------------------------------


def _split(text: str, parts: int = 3) -> list[str]:
    """The text in `parts` pieces, as a model repeating it token by token streams it."""
    size = -(-len(text) // parts)
    return [text[start : start + size] for start in range(0, len(text), size)]


def _split_upstream() -> web.Application:
    """Streams back, split across several deltas, the request's own key (x-echo: own) or another
    key it never sent (x-echo: foreign), in each provider's exact stream format."""

    async def answer(request: web.Request) -> web.StreamResponse:
        own = request.headers.get("x-api-key") or request.headers.get("Authorization", "").removeprefix("Bearer ")
        secret = ANTHROPIC_KEY if request.headers.get("x-echo") == "foreign" else own
        pieces = ["Your key: ", *_split(secret), " (kept)"]
        # A field every chunk repeats unchanged, that joined end to start would look like a key.
        constant = "-abcdefghijklmnopqrstuvwxyz0123-sk"
        if request.path.endswith("/api/chat"):
            lines = [
                {
                    "model": "llama3.2",
                    "created_at": f"2025-01-01T00:00:0{n}Z",
                    "message": {"role": "assistant", "content": p},
                    "done": False,
                }
                for n, p in enumerate(pieces)
            ]
            lines.append(
                {
                    "model": "llama3.2",
                    "created_at": "2025-01-01T00:00:09Z",
                    "message": {"role": "assistant", "content": ""},
                    "done": True,
                    "done_reason": "stop",
                }
            )
            events = [json.dumps(line).encode() + b"\n" for line in lines]
            content_type = "application/x-ndjson"
        elif request.path.endswith("/v1/messages"):
            message = {
                "id": "msg_1",
                "type": "message",
                "role": "assistant",
                "model": "claude-3-5-haiku-latest",
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {"input_tokens": 1, "output_tokens": 1},
            }
            sequence = [
                ("message_start", {"type": "message_start", "message": message}),
                (
                    "content_block_start",
                    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                ),
                *[
                    (
                        "content_block_delta",
                        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": p}},
                    )
                    for p in pieces
                ],
                ("content_block_stop", {"type": "content_block_stop", "index": 0}),
                (
                    "message_delta",
                    {
                        "type": "message_delta",
                        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                        "usage": {"output_tokens": 5},
                    },
                ),
                ("message_stop", {"type": "message_stop"}),
            ]
            events = [f"event: {name}\ndata: {json.dumps(data)}\n\n".encode() for name, data in sequence]
            content_type = "text/event-stream"
        else:
            chunks = [{"role": "assistant", "content": ""}] + [{"content": p} for p in pieces]
            events = [
                b"data: "
                + json.dumps(
                    {
                        "id": constant,
                        "object": "chat.completion.chunk",
                        "created": 1,
                        "model": "gpt-4o",
                        "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
                    }
                ).encode()
                + b"\n\n"
                for delta in chunks
            ]
            if request.headers.get("x-echo") == "verbatim":  # spelled as no serialiser does: kept as text
                events = [event.replace(b'{"id"', b'{ "id"') for event in events]
            events.append(b"data: [DONE]\n\n")
            content_type = "text/event-stream"
        response = web.StreamResponse(headers={"Content-Type": content_type})
        await response.prepare(request)
        for event in events:
            await response.write(event)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/{tail:.*}", answer)
    return app


def _client_text(provider: str, base: str, key: str, secret: str) -> str:
    """The text the provider's own SDK joins from the stream."""
    headers = {"x-echo": secret}
    if provider == "openai":
        import openai

        client = openai.OpenAI(base_url=base + "/v1", api_key=key, default_headers=headers, max_retries=0)
        stream = client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        return "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    if provider == "anthropic":
        import anthropic

        client = anthropic.Anthropic(base_url=base + "/anthropic", api_key=key, default_headers=headers, max_retries=0)
        with client.messages.stream(
            model="claude-3-5-haiku-latest", max_tokens=16, messages=[{"role": "user", "content": "hi"}]
        ) as stream:
            return "".join(stream.text_stream)
    import ollama

    client = ollama.Client(host=base + "/ollama", headers={"Authorization": f"Bearer {key}", **headers})
    return "".join(
        part.message.content or ""
        for part in client.chat(model="llama3.2", messages=[{"role": "user", "content": "hi"}], stream=True)
    )


SPLIT_FIELDS = {
    "openai": "response.body[*].__data__.choices[0].delta.content(joined)",
    "anthropic": "response.body[*].__data__.delta.text(joined)",
    "ollama": "response.body[*].__data__.message.content(joined)",
}


@pytest.mark.parametrize("policy", ["refuse", "redact"])
@pytest.mark.parametrize(
    ("provider", "secret"),
    [("openai", "own"), ("openai", "foreign"), ("openai", "verbatim"), ("anthropic", "own"), ("ollama", "own")],
)
def test_key_split_across_stream_chunks_never_reaches_disk_or_logs(
    loop_thread: LoopThread, tmp_path: Path, provider: str, secret: str, policy: str
) -> None:
    app = RunningApp(loop_thread, _split_upstream()).start()
    recordings = tmp_path / "rec"
    config = _config(tmp_path, secrets=policy)
    routes = f'[[routes]]\nname = "{provider}"\nprovider = "{provider}"\nupstream = "{app.url}"\n'
    config.write_text(config.read_text() + routes)
    proxy = _proxy("record", recordings, None, config)
    key = ANTHROPIC_KEY if provider == "anthropic" else OPENAI_KEY
    echoed = ANTHROPIC_KEY if secret == "foreign" else key
    try:
        text = _client_text(provider, proxy.url, key, secret)
    finally:
        events = proxy.stop()
    # The Anthropic SDK sends its key as x-api-key, and the proxy the same value as authorization too.
    kind = "anthropic key" if secret == "foreign" else "credential from request header authorization"
    try:
        assert text == f"Your key: {echoed} (kept)"  # the client joins the pieces back: served as sent
        field = f"{kind} in {SPLIT_FIELDS[provider]}"
        files = _recordings(recordings)
        if policy == "refuse" or secret == "verbatim":
            assert files == []
            refusals = _refusals(events)
            assert len(refusals) == 1 and field in refusals[0], events
        if policy == "redact" and secret == "verbatim":
            # Its events are kept as their exact text too, where no piece can be redacted alone.
            warnings = [e for e in events if e["event"].startswith("a credential split across stream chunks")]
            assert len(warnings) == 1 and field in warnings[0]["fields"][0], events
        elif policy == "redact":
            # The key's part in its first piece became the placeholder, its other parts are gone.
            assert len(files) == 1 and not _refusals(events)
            redactions = [e for e in events if e["event"] == "credentials redacted from the recording"]
            assert len(redactions) == 1 and field in redactions[0]["fields"][0], events
            redacted = "[redacted anthropic key]" if secret == "foreign" else "[redacted credential from request header"
            replay = _proxy("replay", recordings, None, config)
            try:
                replayed = _client_text(provider, replay.url, key, secret)
            finally:
                replay_events = replay.stop()
            assert replayed.startswith(f"Your key: {redacted}") and replayed.endswith("] (kept)"), replayed
            _no_secret_in_logs(replay_events, echoed, *_split(echoed))
    finally:
        app.stop()
    # Nothing on disk (the journal included) holds the key or any piece of it.
    for path in files_under(recordings) if recordings.exists() else []:
        data = path.read_bytes()
        assert echoed.encode() not in data, path
        assert not [piece for piece in _split(echoed) if piece.encode() in data], path
    _no_secret_in_logs(events, echoed, *_split(echoed))


def test_a_field_repeated_in_every_chunk_is_not_joined_into_a_key_shape(
    loop_thread: LoopThread, tmp_path: Path
) -> None:
    """Every chunk's id is "-abc...-sk": two of them end to start read "-sk-abc...", a key shape;
    no one streamed it, and the stream (its own key hidden as the test key) is recorded."""
    app = RunningApp(loop_thread, _split_upstream()).start()
    recordings = tmp_path / "rec"
    test_key = "sk-test-" + "0" * 24
    config = _config(tmp_path, secret_allow=[test_key])
    proxy = _proxy("record", recordings, app.url, config)
    try:
        text = _client_text("openai", proxy.url, test_key, "own")
    finally:
        events = proxy.stop()
        app.stop()
    assert text == f"Your key: {test_key} (kept)"
    assert not _refusals(events), _refusals(events)
    files = _recordings(recordings)
    assert len(files) == 1 and "-abcdefghijklmnopqrstuvwxyz0123-sk" in files[0].read_text()


# -- other spellings of a credential ----------------------------------------------------------

QUOTED_KEY = 'gw-"quo\\te-' + "7h3K9x2P4m"  # a gateway token with a quote and a backslash


def _raw_text_upstream() -> web.Application:
    """Echoes the bearer token in a body the recording keeps as raw text: a JSON body with a
    duplicated field (kept verbatim so it replays byte for byte; the key is JSON-escaped in it),
    or a stream event that is not JSON (kept as its text; the key as sent)."""

    async def answer(request: web.Request) -> web.StreamResponse:
        token = request.headers["Authorization"].removeprefix("Bearer ")
        if request.headers["x-spelling"] == "escaped":
            note = json.dumps(f"you sent {token}")
            text = '{"id":"chatcmpl-1","object":"chat.completion","note":' + note + ',"note":"none","choices":[]}'
            return web.Response(text=text, content_type="application/json")
        chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o", "choices": []}
        events = [f"data: you sent {token}\n\n", f"data: {json.dumps(chunk)}\n\n", "data: [DONE]\n\n"]
        return web.Response(text="".join(events), content_type="text/event-stream")

    app = web.Application()
    app.router.add_post("/{tail:.*}", answer)
    return app


@pytest.mark.parametrize("policy", ["refuse", "redact"])
@pytest.mark.parametrize("spelling", ["escaped", "raw"])
def test_key_with_a_quote_echoed_in_a_body_kept_as_raw_text_never_reaches_disk_or_logs(
    loop_thread: LoopThread, tmp_path: Path, spelling: str, policy: str
) -> None:
    app = RunningApp(loop_thread, _raw_text_upstream()).start()
    recordings = tmp_path / "rec"
    proxy = _proxy("record", recordings, app.url, _config(tmp_path, secrets=policy))
    body = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}).encode()
    headers = {"Authorization": f"Bearer {QUOTED_KEY}", "x-spelling": spelling}

    async def post() -> str:
        async with aiohttp.ClientSession() as session:
            async with session.post(proxy.url + "/v1/chat/completions", data=body, headers=headers) as response:
                assert response.status == 200
                return await response.text()

    try:
        text = loop_thread.run(post())
    finally:
        events = proxy.stop()
        app.stop()
    spelled = json.dumps(QUOTED_KEY)[1:-1] if spelling == "escaped" else QUOTED_KEY
    assert spelled in text  # the client gets the answer as sent
    files = _recordings(recordings)
    if policy == "refuse":
        assert files == [] and len(_refusals(events)) == 1
    else:
        assert len(files) == 1 and "[redacted credential from request header authorization]" in files[0].read_text()
    # Every spelling the bytes on disk could hold it in: as sent, JSON-escaped, escaped twice.
    spellings = [QUOTED_KEY, json.dumps(QUOTED_KEY)[1:-1], json.dumps(json.dumps(QUOTED_KEY)[1:-1])[1:-1]]
    for path in files_under(recordings) if recordings.exists() else []:
        data = path.read_bytes()
        assert not [s for s in spellings if s.encode() in data], path
    _no_secret_in_logs(events, *spellings)


LATIN1_KEY = b"gw-\xe9" + b"Xq7Zk2Vw9Jp4"  # a gateway token with a byte that is not UTF-8 (latin-1 e-acute)


def _decoding_upstream() -> web.Application:
    """Echoes the bearer token as text decoded from its bytes, as servers do: the byte that is not
    UTF-8 replaced by U+FFFD, or dropped."""

    async def answer(request: web.Request) -> web.Response:
        raw = dict(request.raw_headers)[b"Authorization"].removeprefix(b"Bearer ")
        token = raw.decode("utf-8", "replace" if request.headers["x-decode"] == "replace" else "ignore")
        content = f"you sent {token}"
        choice = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
        answer = {"id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-4o", "choices": [choice]}
        return web.Response(body=json.dumps(answer, ensure_ascii=False).encode(), content_type="application/json")

    app = web.Application()
    app.router.add_post("/{tail:.*}", answer)
    return app


async def _raw_post(port: int, headers: list[bytes], body: bytes) -> bytes:
    """A request written byte for byte (no client library writes a header that is not UTF-8)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = [b"POST /v1/chat/completions HTTP/1.1", f"Host: 127.0.0.1:{port}".encode(), *headers]
    head += [b"Content-Type: application/json", f"Content-Length: {len(body)}".encode(), b"Connection: close"]
    writer.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
    await writer.drain()
    answer = await reader.read()  # to the end: the connection closes after the answer
    writer.close()
    await writer.wait_closed()
    return answer


@pytest.mark.parametrize("policy", ["refuse", "redact"])
@pytest.mark.parametrize("decode", ["replace", "drop"])
def test_key_with_a_byte_not_utf8_echoed_decoded_never_reaches_disk_or_logs(
    loop_thread: LoopThread, tmp_path: Path, decode: str, policy: str
) -> None:
    app = RunningApp(loop_thread, _decoding_upstream()).start()
    recordings = tmp_path / "rec"
    proxy = _proxy("record", recordings, app.url, _config(tmp_path, secrets=policy))
    body = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}).encode()
    headers = [b"Authorization: Bearer " + LATIN1_KEY, b"x-decode: " + decode.encode()]
    try:
        answer = loop_thread.run(_raw_post(proxy.port, headers, body))
    finally:
        events = proxy.stop()
        app.stop()
    echoed = LATIN1_KEY.decode("utf-8", "replace" if decode == "replace" else "ignore")
    assert answer.startswith(b"HTTP/1.1 200") and echoed.encode() in answer  # served as sent
    files = _recordings(recordings)
    if policy == "refuse":
        assert files == [] and len(_refusals(events)) == 1, events
    else:
        assert len(files) == 1 and "[redacted credential from request header authorization]" in files[0].read_text()
    # Neither the echo nor the key's readable part (all but the one byte) is on disk or in the logs.
    tail = LATIN1_KEY.split(b"\xe9")[1]
    for path in files_under(recordings) if recordings.exists() else []:
        data = path.read_bytes()
        assert echoed.encode() not in data and tail not in data, path
    _no_secret_in_logs(events, echoed, tail.decode())


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("line one\n" + OPENAI_KEY, OPENAI_KEY),  # JSON spells the newline `\n`: a letter before "sk-"
        ("tab\t" + OPENAI_KEY, OPENAI_KEY),
        ("caf\u00e9" + OPENAI_KEY, OPENAI_KEY),  # a letter, but not one the shape's rule names
        ("ask" + ANTHROPIC_KEY[2:], ANTHROPIC_KEY[2:]),  # "...sk-ant-": Anthropic's shape may follow a letter
    ],
)
def test_a_key_shape_after_an_escape_or_a_letter_is_still_refused(
    loop_thread: LoopThread, tmp_path: Path, upstream: Any, text: str, key: str
) -> None:
    """The quick pass skips an "sk-" inside a word ("task-"), which no key shape matches; what
    the walk reads as a key start still sends it to the walk."""
    _, app = upstream
    recordings = tmp_path / "rec"
    proxy = _proxy("record", recordings, app.url)
    body = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": text}]}).encode()
    status, _ = loop_thread.run(_post(proxy.url, body, "application/json"))
    events = proxy.stop()
    assert status == 200
    assert _recordings(recordings) == []
    refusals = _refusals(events)
    assert refusals and "key in request.body.messages[0].content" in refusals[0], refusals
    _no_secret_in_logs(events, key)


def test_sk_inside_a_word_is_recorded(loop_thread: LoopThread, tmp_path: Path, upstream: Any) -> None:
    _, app = upstream
    recordings = tmp_path / "rec"
    proxy = _proxy("record", recordings, app.url)
    text = "a task-proj-" + "A1b2C3d4E5f6G7h8I9j0" * 2 + " and a risk-based plan"
    body = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": text}]}).encode()
    status, _ = loop_thread.run(_post(proxy.url, body, "application/json"))
    events = proxy.stop()
    assert status == 200 and not _refusals(events)
    (recording,) = _recordings(recordings)
    assert text in json.loads(recording.read_text())["request"]["body"]["messages"][0]["content"]
