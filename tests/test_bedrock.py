"""AWS Bedrock Runtime through the proxy, with boto3 as the client.

boto3 signs for the proxy's host with the client's (fake) keys; the proxy signs again with the
AWS credentials of its own environment; the local upstream verifies that signature as AWS
would. Then the upstream is stopped and everything replays: same parsed results, same bytes,
no credential or signature on disk.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import boto3
import pytest
from botocore.config import Config
from botocore.eventstream import EventStreamBuffer
from botocore.exceptions import ClientError

from llmproxy.providers import client_environment, get_provider
from llmproxy.tools.explain import show
from tests.providers_support import write_config
from tests.support import CliProxy, LoopThread, RunningApp, assert_no_secret, files_under, start_proxy
from tests.upstreams.bedrock_wire import SIGNATURE_MISMATCH, BedrockWire, event, exception

# The proxy's own ("real") credentials, which the upstream accepts.
PROXY_KEY = "AKIAPROXYREALKEY0001"
PROXY_SECRET = "proxy/Secret+Key/0123456789abcdefghijklmn"
PROXY_TOKEN = "FQoGZXIvYXdzEProxySessionToken0123456789abcdef"
# The client's: it signs for the proxy's host with these; the upstream would refuse them.
CLIENT_KEY = "AKIACLIENTFAKEKEY001"
CLIENT_SECRET = "client/Secret+Key/9876543210zyxwvutsrqpo"
CLIENT_TOKEN = "FQoGZXIvYXdzEClientSessionToken9876543210fedcba"

MODEL = "anthropic.claude-3-5-sonnet-20240620-v1:0"
PROFILE_ARN = "arn:aws:bedrock:us-west-2:123456789012:inference-profile/us.anthropic.claude-3-7-sonnet-20250219-v1:0"
USER_HI = {"role": "user", "content": "hi"}
AWS_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_BEARER_TOKEN_BEDROCK",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_BEDROCK_RUNTIME",
)


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[pytest.MonkeyPatch]:
    """An environment with no AWS credentials at all (no files, no instance metadata probe)."""
    for name in AWS_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_REGION", "eu-central-1")
    yield monkeypatch


@pytest.fixture
def proxy_credentials(aws_env: pytest.MonkeyPatch) -> None:
    aws_env.setenv("AWS_ACCESS_KEY_ID", PROXY_KEY)
    aws_env.setenv("AWS_SECRET_ACCESS_KEY", PROXY_SECRET)
    aws_env.setenv("AWS_SESSION_TOKEN", PROXY_TOKEN)


def client(base_url: str, key: str = CLIENT_KEY, secret: str = CLIENT_SECRET, token: str | None = CLIENT_TOKEN) -> Any:
    return boto3.client(
        "bedrock-runtime",
        endpoint_url=base_url,
        region_name="us-west-2",
        aws_access_key_id=key,
        aws_secret_access_key=secret,
        aws_session_token=token,
        config=Config(retries={"max_attempts": 1, "mode": "standard"}),
    )


def without_metadata(value: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in value.items() if k != "ResponseMetadata"}


def calls(base_url: str, key: str = CLIENT_KEY, secret: str = CLIENT_SECRET) -> dict[str, Any]:
    bedrock = client(base_url, key, secret)
    messages = [{"role": "user", "content": [{"text": "Why is the sky blue?"}]}]
    out: dict[str, Any] = {}
    out["converse"] = without_metadata(
        bedrock.converse(modelId=MODEL, messages=messages, inferenceConfig={"maxTokens": 64, "temperature": 0.5})
    )
    out["converse_arn"] = without_metadata(bedrock.converse(modelId=PROFILE_ARN, messages=messages))
    stream = bedrock.converse_stream(modelId=MODEL, messages=[{"role": "user", "content": [{"text": "Tell a story"}]}])
    out["converse_stream"] = list(stream["stream"])
    invoked = bedrock.invoke_model(
        modelId=MODEL,
        contentType="application/json",
        accept="application/json",
        body=json.dumps(
            {
                "anthropic_version": "bedrock-2023-05-31",
                "max_tokens": 32,
                "messages": [{"role": "user", "content": "hi"}],
            }
        ),
    )
    out["invoke"] = {"contentType": invoked["contentType"], "body": json.loads(invoked["body"].read())}
    streamed = bedrock.invoke_model_with_response_stream(
        modelId=MODEL,
        contentType="application/json",
        body=json.dumps({"anthropic_version": "bedrock-2023-05-31", "max_tokens": 32, "messages": []}),
    )
    out["invoke_stream"] = [json.loads(item["chunk"]["bytes"]) for item in streamed["body"]]
    out["invoke_stream_type"] = streamed["contentType"]
    try:
        bedrock.converse(modelId="anthropic.nonexistent-v1:0", messages=messages)
    except bedrock.exceptions.ValidationException as exc:  # the code comes from x-amzn-ErrorType
        out["error"] = {"code": exc.response["Error"]["Code"], "message": exc.response["Error"]["Message"]}
    return out


def test_boto3_converse_stream_invoke_record_resigned_then_replay(
    loop_thread: LoopThread, tmp_path: Path, proxy_credentials: None
) -> None:
    upstream = BedrockWire(PROXY_KEY, PROXY_SECRET, PROXY_TOKEN)
    app = RunningApp(loop_thread, upstream.app()).start()
    config = write_config(tmp_path / "llmproxy.toml", [{"name": "bedrock", "provider": "bedrock", "upstream": app.url}])
    recordings = tmp_path / "recordings"
    # Recorded by the CLI (its own process, its own environment: the proxy's credentials).
    proxy = CliProxy("record", "--config", str(config), "--recordings", str(recordings), "--port", "0")
    try:
        recorded = calls(proxy.url)
    finally:
        log_lines = "\n".join(proxy.lines) + "\n".join(str(event) for event in proxy.stop())
        app.stop()
    assert upstream.rejected == []
    assert len(upstream.authorizations) == 6
    # Signed by the proxy, with its key, for the client's region (the upstream host names none).
    assert all(f"Credential={PROXY_KEY}/" in auth and "/us-west-2/bedrock/" in auth for auth in upstream.authorizations)
    assert all(r["headers"]["X-Amz-Security-Token"] == PROXY_TOKEN for r in upstream.requests)
    # The model id reaches the upstream encoded as boto3 encoded it (":" as %3A, the ARN's "/" as %2F).
    raw_paths = [r["raw_path"] for r in upstream.requests]
    assert raw_paths[0] == "/model/anthropic.claude-3-5-sonnet-20240620-v1%3A0/converse"
    assert raw_paths[1].startswith("/model/arn%3Aaws%3Abedrock%3Aus-west-2%3A123456789012%3Ainference-profile%2Fus.")

    assert recorded["converse"]["output"]["message"]["content"][0]["text"].startswith("Hello from anthropic")
    assert recorded["converse"]["stopReason"] == "end_turn"
    deltas = [e["contentBlockDelta"]["delta"]["text"] for e in recorded["converse_stream"] if "contentBlockDelta" in e]
    assert "".join(deltas).startswith("Hello from anthropic.claude-3-5-sonnet")
    assert list(recorded["converse_stream"][-1]) == ["metadata"]
    assert recorded["invoke"]["body"]["content"][0]["text"] == "Invoked with hi"
    assert recorded["invoke_stream"][-1]["type"] == "message_stop"
    assert recorded["invoke_stream_type"] == "application/json"
    assert recorded["error"] == {"code": "ValidationException", "message": "The provided model identifier is invalid."}

    # Replay: no upstream, a client with yet other keys; every call is answered from disk.
    replay = start_proxy(loop_thread, "replay", recordings, config=config)
    try:
        replayed = calls(replay.url, key="AKIAOTHERCLIENTKEY01", secret="other-secret")
        byte_exact = replayed_bytes(loop_thread, upstream, replay.url)
    finally:
        replay.stop()
    assert replay.server.mode.outcome.misses == 0
    assert replayed == recorded
    assert byte_exact == upstream.sent
    for data in (sent for sent, r in zip(upstream.sent, upstream.requests, strict=True) if "stream" in r["path"]):
        buffer = EventStreamBuffer()
        buffer.add_data(data)
        assert len(list(buffer)) >= 4  # botocore's decoder accepts every frame, CRCs included

    signatures = [auth.rpartition("Signature=")[2] for auth in upstream.authorizations]
    secrets = [PROXY_KEY, PROXY_SECRET, PROXY_TOKEN, CLIENT_KEY, CLIENT_SECRET, CLIENT_TOKEN, *signatures]
    assert_no_secret(recordings, *secrets)
    assert "recorded" in log_lines
    for secret in secrets:
        assert secret not in log_lines
    documents = [json.loads(p.read_text()) for p in files_under(recordings)]
    assert len(documents) == 6
    assert {d["request"]["model"] for d in documents} == {MODEL, PROFILE_ARN, "anthropic.nonexistent-v1:0"}
    assert all(d["request"]["headers"] == {} for d in documents)
    # `llmproxy show` reads the conversation out of every kind of Bedrock answer.
    shown = {
        d["request"]["endpoint"].rsplit("/", 1)[-1] + (" arn" if "arn:" in d["request"]["endpoint"] else ""): show(
            Path("f.json"), d, lambda _method, _path: get_provider("bedrock")
        )
        for d in documents
        if d["response"]["status"] == 200
    }
    assert "[user] Why is the sky blue?" in shown["converse"]
    assert "[assistant] Hello from anthropic.claude-3-5-sonnet-20240620-v1:0 about Why is" in shown["converse"]
    assert "[assistant] Hello from us.anthropic.claude-3-7" in shown["converse arn"]
    assert "[assistant] Hello from anthropic.claude-3-5-sonnet-20240620-v1:0 about Tell a" in shown["converse-stream"]
    assert "[assistant] Invoked with hi" in shown["invoke"]
    assert "answered by claude-3-5-sonnet-20240620" in shown["invoke"]
    assert "[assistant] Streamed invoke" in shown["invoke-with-response-stream"]
    [stream_doc] = [d for d in documents if d["request"]["endpoint"].endswith("/converse-stream")]
    assert stream_doc["response"]["is_streaming"] and stream_doc["response"]["framing"]["format"] == "eventstream"
    frames = stream_doc["response"]["body"]
    assert [f["__headers__"][":event-type"] for f in frames][:2] == ["messageStart", "contentBlockDelta"]
    assert frames[-1]["__data__"]["usage"]["inputTokens"] == 9  # readable JSON, not base64
    assert all(f["__type__"] == "bedrock-runtime.ConverseStreamOutput" for f in frames)


def replayed_bytes(loop: LoopThread, upstream: BedrockWire, proxy_url: str) -> list[bytes]:
    """The replay proxy's answers to the upstream's requests, sent raw and unsigned."""

    async def fetch() -> list[bytes]:
        out = []
        async with aiohttp.ClientSession(auto_decompress=False) as session:
            for request in upstream.requests:
                url = proxy_url + request["raw_path"]
                headers = {"Content-Type": request["headers"].get("Content-Type", "application/json")}
                async with session.post(url, data=request["raw"], headers=headers) as response:
                    assert response.status == (400 if "nonexistent" in url else 200)
                    out.append(await response.read())
        return out

    return loop.run(fetch())


def test_the_clients_own_signature_is_rejected_upstream(
    loop_thread: LoopThread, tmp_path: Path, proxy_credentials: None
) -> None:
    """A proxy that forwarded boto3's request as it is (even signed with the very keys the
    upstream accepts) is refused: the signature covers the proxy's host. Re-signed, it passes."""
    upstream = BedrockWire(PROXY_KEY, PROXY_SECRET, PROXY_TOKEN)
    app = RunningApp(loop_thread, upstream.app()).start()
    config = write_config(tmp_path / "llmproxy.toml", [{"name": "bedrock", "provider": "bedrock", "upstream": app.url}])
    proxy = start_proxy(loop_thread, "record", tmp_path / "recordings", config=config)
    sent: list[Any] = []
    try:
        bedrock = client(proxy.url, key=PROXY_KEY, secret=PROXY_SECRET, token=PROXY_TOKEN)
        bedrock.meta.events.register("before-send.bedrock-runtime.Converse", lambda request, **_: sent.append(request))
        answer = bedrock.converse(modelId=MODEL, messages=[{"role": "user", "content": [{"text": "hi"}]}])
        assert answer["stopReason"] == "end_turn"  # through the proxy: re-signed, accepted
        assert upstream.rejected == []
        [as_sent] = sent
        assert as_sent.url.startswith(proxy.url + "/model/")

        async def forward_unchanged() -> tuple[int, str]:
            headers = {
                k: v.decode() if isinstance(v, bytes) else v
                for k, v in as_sent.headers.items()
                if k.lower() not in ("host", "content-length")
            }
            path = as_sent.url[len(proxy.url) :]
            async with aiohttp.ClientSession() as session:
                url = app.url + path
                async with session.post(url, data=as_sent.body, headers=headers) as response:
                    return response.status, response.headers.get("x-amzn-ErrorType", "")

        status, error_type = loop_thread.run(forward_unchanged())
    finally:
        proxy.stop()
        app.stop()
    assert status == 403
    assert error_type.startswith("InvalidSignatureException")
    assert upstream.rejected == [f"InvalidSignatureException: {SIGNATURE_MISMATCH}"]


def test_converse_stream_frames_pass_through_as_they_arrive(
    loop_thread: LoopThread, tmp_path: Path, proxy_credentials: None
) -> None:
    """The upstream holds its stream after the first frame until the client has parsed that
    frame: a proxy that buffered the stream would never let it through (read timeout)."""
    upstream = BedrockWire(PROXY_KEY, PROXY_SECRET, PROXY_TOKEN)
    upstream.gate = loop_thread.run(_new_event())
    app = RunningApp(loop_thread, upstream.app()).start()
    config = write_config(tmp_path / "llmproxy.toml", [{"name": "bedrock", "provider": "bedrock", "upstream": app.url}])
    proxy = start_proxy(loop_thread, "record", tmp_path / "recordings", config=config)
    try:
        bedrock = boto3.client(
            "bedrock-runtime",
            endpoint_url=proxy.url + "/bedrock",  # the provider's prefix, as `llmproxy run` sets it
            region_name="us-west-2",
            aws_access_key_id=CLIENT_KEY,
            aws_secret_access_key=CLIENT_SECRET,
            config=Config(retries={"max_attempts": 1}, read_timeout=10),
        )
        stream = bedrock.converse_stream(modelId=MODEL, messages=[{"role": "user", "content": [{"text": "hi"}]}])
        events = iter(stream["stream"])
        first = next(events)
        loop_thread.loop.call_soon_threadsafe(upstream.gate.set)
        rest = list(events)
    finally:
        proxy.stop()
        app.stop()
    assert first == {"messageStart": {"role": "assistant"}}
    assert list(rest[-1]) == ["metadata"]
    assert upstream.requests[0]["raw_path"] == "/model/anthropic.claude-3-5-sonnet-20240620-v1%3A0/converse-stream"
    assert len(files_under(tmp_path / "recordings")) == 1


async def _new_event() -> asyncio.Event:
    return asyncio.Event()


def test_a_stream_cut_mid_frame_is_not_recorded(
    loop_thread: LoopThread, tmp_path: Path, proxy_credentials: None
) -> None:
    """botocore would replay a cut stream as a shorter, clean answer: it must not be recorded."""
    upstream = BedrockWire(PROXY_KEY, PROXY_SECRET, PROXY_TOKEN)
    upstream.cut = True
    app = RunningApp(loop_thread, upstream.app()).start()
    config = write_config(tmp_path / "llmproxy.toml", [{"name": "bedrock", "provider": "bedrock", "upstream": app.url}])
    recordings = tmp_path / "recordings"
    proxy = start_proxy(loop_thread, "record", recordings, config=config)
    try:
        bedrock = client(proxy.url)
        stream = bedrock.converse_stream(modelId=MODEL, messages=[{"role": "user", "content": [{"text": "hi"}]}])
        events = list(stream["stream"])
        body = json.dumps({"anthropic_version": "bedrock-2023-05-31", "max_tokens": 32, "messages": []})
        chunks = list(bedrock.invoke_model_with_response_stream(modelId=MODEL, body=body)["body"])
    finally:
        proxy.stop()
        app.stop()
    assert events and "metadata" not in events[-1]  # the client got what there was, silently
    assert len(chunks) == 2
    assert proxy.server.mode.outcome.truncated == 2
    assert files_under(recordings) == []


def test_no_proxy_credentials_is_a_clear_error_and_nothing_goes_upstream(
    loop_thread: LoopThread, tmp_path: Path, aws_env: pytest.MonkeyPatch
) -> None:
    upstream = BedrockWire(PROXY_KEY, PROXY_SECRET, PROXY_TOKEN)
    app = RunningApp(loop_thread, upstream.app()).start()
    config = write_config(tmp_path / "llmproxy.toml", [{"name": "bedrock", "provider": "bedrock", "upstream": app.url}])
    recordings = tmp_path / "recordings"
    proxy = start_proxy(loop_thread, "record", recordings, config=config)
    try:
        # Found through the variable `llmproxy run` and the pytest plugin set, not endpoint_url.
        endpoint = client_environment(proxy.url)["AWS_ENDPOINT_URL_BEDROCK_RUNTIME"]
        assert endpoint == proxy.url + "/bedrock"
        aws_env.setenv("AWS_ENDPOINT_URL_BEDROCK_RUNTIME", endpoint)
        bedrock = boto3.client(
            "bedrock-runtime",
            region_name="us-west-2",
            aws_access_key_id=CLIENT_KEY,
            aws_secret_access_key=CLIENT_SECRET,
            config=Config(retries={"max_attempts": 1}),
        )
        with pytest.raises(ClientError) as caught:
            bedrock.converse(modelId=MODEL, messages=[{"role": "user", "content": [{"text": "hi"}]}])
    finally:
        proxy.stop()
        app.stop()
    error = caught.value.response
    assert error["ResponseMetadata"]["HTTPStatusCode"] == 502
    assert error["Error"]["Code"] == "no_upstream_credentials"
    assert "no AWS credentials" in error["Error"]["Message"]
    assert upstream.requests == []
    assert files_under(recordings) == []


def test_bedrock_api_key_in_the_proxy_environment_is_sent_as_bearer(
    loop_thread: LoopThread, tmp_path: Path, proxy_credentials: None
) -> None:
    """As botocore does, a Bedrock API key in the proxy's environment wins over its SigV4 keys.
    The proxy runs as its own process: the in-process client would pick the key up too."""
    api_key = "ABSKQmVkcm9ja0FQSUtleS1wcm94eS0wMTIzNDU2Nzg5"
    upstream = BedrockWire(PROXY_KEY, PROXY_SECRET, PROXY_TOKEN)
    upstream.bearer = api_key
    app = RunningApp(loop_thread, upstream.app()).start()
    config = write_config(tmp_path / "llmproxy.toml", [{"name": "bedrock", "provider": "bedrock", "upstream": app.url}])
    recordings = tmp_path / "recordings"
    proxy = CliProxy(
        "record",
        "--config",
        str(config),
        "--recordings",
        str(recordings),
        "--port",
        "0",
        env={"AWS_BEARER_TOKEN_BEDROCK": api_key},
    )
    try:
        answer = client(proxy.url).converse(modelId=MODEL, messages=[{"role": "user", "content": [{"text": "hi"}]}])
    finally:
        log_lines = "\n".join(str(event) for event in proxy.stop())
        app.stop()
    assert answer["stopReason"] == "end_turn"
    [request] = upstream.requests
    assert request["headers"]["Authorization"] == f"Bearer {api_key}"
    assert not any(name.lower().startswith("x-amz-") for name in request["headers"])
    assert_no_secret(recordings, api_key, PROXY_KEY, PROXY_SECRET, CLIENT_KEY, CLIENT_TOKEN)
    assert len(files_under(recordings)) == 1
    assert "recorded" in log_lines
    for secret in (api_key, PROXY_SECRET, PROXY_TOKEN, CLIENT_KEY, CLIENT_TOKEN):
        assert secret not in log_lines


def test_a_broken_aws_profile_in_the_proxy_is_a_clear_error(
    loop_thread: LoopThread, tmp_path: Path, aws_env: pytest.MonkeyPatch
) -> None:
    upstream = BedrockWire(PROXY_KEY, PROXY_SECRET, PROXY_TOKEN)
    app = RunningApp(loop_thread, upstream.app()).start()
    config = write_config(tmp_path / "llmproxy.toml", [{"name": "bedrock", "provider": "bedrock", "upstream": app.url}])
    recordings = str(tmp_path / "recordings")
    # Its own process: the client here would trip over the missing profile itself.
    env = {"AWS_PROFILE": "no-such-profile"}
    proxy = CliProxy("record", "--config", str(config), "--recordings", recordings, "--port", "0", env=env)
    try:
        with pytest.raises(ClientError) as caught:
            client(proxy.url).converse(modelId=MODEL, messages=[{"role": "user", "content": [{"text": "hi"}]}])
    finally:
        proxy.stop()
        app.stop()
    assert caught.value.response["Error"]["Code"] == "upstream_credentials_failed"
    assert "no-such-profile" in caught.value.response["Error"]["Message"]
    assert upstream.requests == []


def test_a_clients_bedrock_api_key_is_forwarded_as_it_is(
    loop_thread: LoopThread, tmp_path: Path, aws_env: pytest.MonkeyPatch
) -> None:
    """A Bedrock API key is not bound to a host: it goes upstream unchanged (here the proxy has
    no AWS credentials at all), and never to disk. boto3 sends one only over HTTPS, so raw HTTP."""
    api_key = "ABSKQmVkcm9ja0FQSUtleS1jbGllbnQtMDEyMzQ1Njc4OQ"
    upstream = BedrockWire(PROXY_KEY, PROXY_SECRET, PROXY_TOKEN)
    upstream.bearer = api_key
    app = RunningApp(loop_thread, upstream.app()).start()
    config = write_config(tmp_path / "llmproxy.toml", [{"name": "bedrock", "provider": "bedrock", "upstream": app.url}])
    recordings = tmp_path / "recordings"
    proxy = start_proxy(loop_thread, "record", recordings, config=config)

    async def converse() -> tuple[int, dict[str, Any]]:
        async with aiohttp.ClientSession() as session:
            url = f"{proxy.url}/bedrock/model/{MODEL}/converse"
            body = {"messages": [{"role": "user", "content": [{"text": "hi"}]}]}
            async with session.post(url, json=body, headers={"Authorization": f"Bearer {api_key}"}) as response:
                return response.status, await response.json()

    try:
        status, answer = loop_thread.run(converse())
    finally:
        proxy.stop()
        app.stop()
    assert status == 200 and answer["stopReason"] == "end_turn"
    assert upstream.requests[0]["headers"]["Authorization"] == f"Bearer {api_key}"
    assert upstream.requests[0]["raw_path"] == "/model/anthropic.claude-3-5-sonnet-20240620-v1%3A0/converse"
    assert len(files_under(recordings)) == 1
    assert_no_secret(recordings, api_key)


def test_aws_credentials_never_reach_another_provider_and_other_keys_never_reach_bedrock(
    loop_thread: LoopThread, tmp_path: Path, proxy_credentials: None
) -> None:
    upstream = BedrockWire(PROXY_KEY, PROXY_SECRET, PROXY_TOKEN)
    app = RunningApp(loop_thread, upstream.app()).start()
    routes = [{"name": "bedrock", "provider": "bedrock", "upstream": app.url}]
    routes.append({"name": "openai", "provider": "openai", "upstream": app.url})
    config = write_config(tmp_path / "llmproxy.toml", routes)
    proxy = start_proxy(loop_thread, "record", tmp_path / "recordings", config=config)
    try:
        with pytest.raises(ClientError) as caught:  # boto3 pointed at OpenAI's base URL
            client(proxy.url + "/openai").converse(
                modelId=MODEL, messages=[{"role": "user", "content": [{"text": "hi"}]}]
            )

        async def openai_key_to_bedrock() -> tuple[int, dict[str, Any]]:
            async with aiohttp.ClientSession() as session:
                url = f"{proxy.url}/bedrock/model/{MODEL}/converse"
                headers = {"Authorization": "Bearer sk-proj-openaikey0123456789abcdefghij"}
                async with session.post(url, json={"messages": []}, headers=headers) as response:
                    return response.status, await response.json()

        status, body = loop_thread.run(openai_key_to_bedrock())
    finally:
        proxy.stop()
        app.stop()
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert caught.value.response["ResponseMetadata"]["HTTPHeaders"]["x-llmproxy-error"] == "credential_mismatch"
    # Answered in Bedrock's error shape (the client's own provider), so boto3 shows code and message.
    assert caught.value.response["Error"]["Code"] == "credential_mismatch"
    assert "x-amz-date" in caught.value.response["Error"]["Message"]
    assert status == 400
    assert body["code"] == "credential_mismatch" and "authorization" in body["message"]  # Bedrock's error shape
    assert upstream.requests == []


def test_event_stream_encoder_matches_botocore() -> None:
    single = event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "Hi"}})
    # The 148-byte frame of the wire-format reference, prelude and CRCs included.
    assert len(single) == 148
    assert single[:12].hex() == "0000009400000057b4ab9aee"
    assert single[-4:].hex() == "1f944657"
    data = single + exception("throttlingException", "slow down")
    buffer = EventStreamBuffer()
    buffer.add_data(data)
    messages = list(buffer)
    assert [m.headers[":message-type"] for m in messages] == ["event", "exception"]
    assert json.loads(messages[0].payload) == {"contentBlockIndex": 0, "delta": {"text": "Hi"}}


def test_resolving_the_proxys_aws_credentials_never_stalls_other_requests(
    loop_thread: LoopThread, tmp_path: Path, aws_env: pytest.MonkeyPatch
) -> None:
    """The first Bedrock call resolves the proxy's credentials (here a credential_process that
    waits for the test; elsewhere SSO, instance metadata over the network): meanwhile another
    client's OpenAI call goes through the same proxy."""
    import os
    import sys
    from concurrent.futures import ThreadPoolExecutor

    import openai

    from tests.support import wait_until
    from tests.upstreams.openai_wire import OpenAIWire

    release, started = tmp_path / "release", tmp_path / "started"
    os.mkfifo(release)
    process = tmp_path / "credentials.py"
    answer = {"Version": 1, "AccessKeyId": PROXY_KEY, "SecretAccessKey": PROXY_SECRET, "SessionToken": PROXY_TOKEN}
    process.write_text(
        "import json, pathlib\n"
        f"pathlib.Path({str(started)!r}).touch()\n"
        f"open({str(release)!r}).read()\n"
        f"print(json.dumps({answer!r}))\n"
    )
    (tmp_path / "aws-config").write_text(f"[default]\ncredential_process = {sys.executable} {process}\n")
    bedrock_wire, openai_wire = BedrockWire(PROXY_KEY, PROXY_SECRET, PROXY_TOKEN), OpenAIWire()
    apps = [RunningApp(loop_thread, wire.app()).start() for wire in (bedrock_wire, openai_wire)]
    config = write_config(
        tmp_path / "llmproxy.toml",
        [
            {"name": "bedrock", "provider": "bedrock", "upstream": apps[0].url},
            {"name": "openai", "provider": "openai", "upstream": apps[1].url},
        ],
    )
    env = {"AWS_CONFIG_FILE": str(tmp_path / "aws-config")}
    proxy = CliProxy(
        "record", "--config", str(config), "--recordings", str(tmp_path / "recordings"), "--port", "0", env=env
    )
    released = False
    try:
        with ThreadPoolExecutor(1) as pool:
            converse = pool.submit(
                lambda: client(proxy.url).converse(
                    modelId=MODEL, messages=[{"role": "user", "content": [{"text": "hi"}]}]
                )
            )
            wait_until(started.exists, "the proxy to ask for its AWS credentials")
            quick = openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk-other-client", max_retries=0, timeout=20)
            assert quick.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}]).choices
            assert not converse.done()  # still waiting for its credentials
            with open(release, "w") as fifo:
                fifo.write("go")
            released = True
            assert converse.result(timeout=30)["output"]["message"]["role"] == "assistant"
    finally:
        if not released:
            with open(release, "w") as fifo:
                fifo.write("go")
        proxy.stop()
        for app in apps:
            app.stop()
    assert len(bedrock_wire.authorizations) == 1 and PROXY_KEY in bedrock_wire.authorizations[0]


def test_replay_placeholder_aws_credentials_in_the_proxy_never_sign_an_upstream_call(
    loop_thread: LoopThread, tmp_path: Path, aws_env: pytest.MonkeyPatch
) -> None:
    """The pytest plugin sets placeholder AWS keys in its own process, where an in-process
    proxy also finds its credentials: a call marked to record gets a clear error instead."""
    placeholders = get_provider("bedrock").placeholder_keys
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        aws_env.setenv(name, placeholders[name])
    upstream = BedrockWire(PROXY_KEY, PROXY_SECRET, PROXY_TOKEN)
    app = RunningApp(loop_thread, upstream.app()).start()
    config = write_config(tmp_path / "llmproxy.toml", [{"name": "bedrock", "provider": "bedrock", "upstream": app.url}])
    proxy = start_proxy(loop_thread, "record", tmp_path, config)
    try:
        with pytest.raises(ClientError) as caught:
            client(proxy.url).converse(modelId=MODEL, messages=[{"role": "user", "content": [{"text": "hi"}]}])
    finally:
        proxy.stop()
        app.stop()
    assert caught.value.response["Error"]["Code"] == "placeholder_key"
    assert "set real AWS credentials" in caught.value.response["Error"]["Message"]
    assert upstream.requests == []
    assert not [path for path in files_under(tmp_path) if path.suffix == ".json"]
