"""Beyond one machine: recordings in an S3-compatible bucket, single-flight through Redis.

Real services, started by the tests: moto's S3 server (`moto[server]`, the `test` extra) and
`redis-server` (the Debian package .ci/run installs). Where one cannot be started, its tests
skip and say why. Proxies are `llmproxy` child processes on their own ports, as replicas are.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from llmproxy.store.base import open_store
from tests.support import REPO, CliProxy, LoopThread, RunningApp, files_under, free_port, start_proxy, wait_until
from tests.upstreams.openai_wire import OpenAIWire

AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing-access-key",
    "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


class Service:
    """A server child process on a free 127.0.0.1 port."""

    def __init__(self, command: list[str], port: int) -> None:
        self.port = port
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_until(lambda: _listening(port) or self.process.poll() is not None, f"{command[0]} to listen")
        if self.process.poll() is not None:
            raise RuntimeError(
                f"{command} exited: {self.process.stderr.read().decode() if self.process.stderr else ''}"
            )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=15)


@pytest.fixture
def s3_server() -> Iterator[dict[str, str]]:
    # One server per test: moto's server was seen wedging (every GET timing out) after a few
    # tests' worth of traffic, so no test depends on the traffic of the ones before it.
    if importlib.util.find_spec("moto") is None or importlib.util.find_spec("aiobotocore") is None:
        pytest.skip("moto[server] and aiobotocore are not installed (pip install -e '.[s3,test]')")
    port = free_port()
    service = Service([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], port)
    yield {**AWS_ENV, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    service.stop()


@pytest.fixture
def aws(s3_server: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for name, value in s3_server.items():
        monkeypatch.setenv(name, value)
    return s3_server


_buckets = iter(range(10_000))


@pytest.fixture
def bucket(aws: dict[str, str]) -> str:
    """A new, empty bucket; its s3:// location."""
    import boto3

    name = f"llmproxy-test-{os.getpid()}-{next(_buckets)}"
    boto3.client("s3", endpoint_url=aws["AWS_ENDPOINT_URL"]).create_bucket(Bucket=name)
    return f"s3://{name}/recordings"


@pytest.fixture
def redis_server() -> Iterator[Service]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server; .ci/run does)")
    if importlib.util.find_spec("redis") is None:
        pytest.skip("the redis client is not installed (pip install -e '.[redis]')")
    port = free_port()
    service = Service([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"], port)
    yield service
    service.stop()


def _objects(location: str) -> dict[str, bytes]:
    """Every recording in the bucket, by name, read back independently of the proxy (boto3)."""
    import boto3

    bucket, _, prefix = location.removeprefix("s3://").partition("/")
    client = boto3.client("s3")
    found = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        for item in page.get("Contents", []):
            found[item["Key"]] = client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
    return found


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="sk-test-not-a-real-key", max_retries=0, timeout=60)


def _ask(url: str, prompt: str) -> tuple[str, str]:
    """The answer's text and the upstream's request id (distinct per upstream answer)."""
    raw = _client(url).chat.completions.with_raw_response.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": prompt}],  # type: ignore[list-item]
    )
    return raw.parse().choices[0].message.content or "", raw.headers["x-request-id"]


def _stream(url: str, prompt: str) -> str:
    stream = _client(url).chat.completions.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": prompt}],  # type: ignore[list-item]
        stream=True,
    )
    return "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)


def _proxy(mode: str, location: str, upstream: str, env: dict[str, str], *extra: str) -> CliProxy:
    args = ["record", "--missing"] if mode == "record-missing" else [mode]
    return CliProxy(*args, "--recordings", location, "--upstream", upstream, "--port", "0", *extra, env=env)


def _valid_recordings(objects: dict[str, bytes]) -> list[dict[str, Any]]:
    documents = [orjson.loads(data) for data in objects.values()]
    for document in documents:
        assert document["response"]["status"] == 200 and document["request"]["url"].endswith("/v1/chat/completions")
    return documents


def test_a_records_to_the_bucket_and_b_replays_it_without_a_restart(
    loop_thread: LoopThread, bucket: str, aws: dict[str, str], tmp_path: Path
) -> None:
    wire = OpenAIWire()
    upstream = RunningApp(loop_thread, wire.app()).start()
    # B starts first, on the empty bucket: what A records later must reach it by refresh.
    b = _proxy("replay", bucket, upstream.url, aws, "--config", str(_refresh_config(tmp_path, 0.2)))
    a = _proxy("record", bucket, upstream.url, aws)
    try:
        with pytest.raises(openai.NotFoundError):
            _ask(b.url, "shared between replicas")
        answer, request_id = _ask(a.url, "shared between replicas")
        wait_until(lambda: len(_objects(bucket)) == 1, "A's recording in the bucket")
        b.wait_for_event("recordings added since start")
        assert _ask(b.url, "shared between replicas") == (answer, request_id)
        assert len(wire.requests) == 1  # B answered from the bucket
    finally:
        a.stop()
        events = b.stop()
        upstream.stop()
    (name,) = _objects(bucket)
    assert name.startswith("recordings/openai/chat-completions-gpt-4o-") and name.endswith(".json")
    summary = next(e for e in events if e["event"] == "summary")
    assert summary["hits"] == 1
    # Credentials for the bucket come from the environment and never reach a log line.
    assert not any(aws["AWS_SECRET_ACCESS_KEY"] in line for line in b.lines + a.lines)


def _refresh_config(tmp_path: Path, seconds: float) -> Path:
    config = tmp_path / f"refresh-{seconds}.toml"
    config.write_text(f"[proxy]\nrefresh_seconds = {seconds}\n")
    return config


def _gated_wire(loop_thread: LoopThread) -> OpenAIWire:
    wire = OpenAIWire()

    async def make_gate() -> asyncio.Event:
        return asyncio.Event()

    wire.gate = loop_thread.run(make_gate())
    return wire


def _open_gate(loop_thread: LoopThread, wire: OpenAIWire) -> None:
    assert wire.gate is not None
    loop_thread.loop.call_soon_threadsafe(wire.gate.set)


def test_identical_calls_across_two_replicas_go_upstream_once_with_redis(
    loop_thread: LoopThread, bucket: str, aws: dict[str, str], redis_server: Service
) -> None:
    wire = _gated_wire(loop_thread)
    upstream = RunningApp(loop_thread, wire.app()).start()
    redis = ["--redis-url", f"redis://127.0.0.1:{redis_server.port}/0", "--log-level", "info"]
    a = _proxy("record-missing", bucket, upstream.url, aws, *redis)
    b = _proxy("record-missing", bucket, upstream.url, aws, *redis)
    try:
        with ThreadPoolExecutor(max_workers=32) as pool:
            futures = [pool.submit(_stream, proxy.url, "one call for all") for proxy in (a, b) for _ in range(16)]
            a.wait_for_event("live call: no recording yet", count=16)
            b.wait_for_event("live call: no recording yet", count=16)
            _open_gate(loop_thread, wire)
            answers = [future.result(timeout=60) for future in futures]
        wait_until(lambda: len(_objects(bucket)) == 1, "the one recording")
    finally:
        a.stop()
        b.stop()
        upstream.stop()
    assert len(wire.requests) == 1, "identical calls across replicas went upstream more than once"
    assert answers == ["ECHO: ONE CALL FOR ALL"] * 32
    (document,) = _valid_recordings(_objects(bucket))
    assert document["request"].get("sequence", 1) == 1


def test_redis_stopped_mid_run_calls_go_upstream_and_nothing_is_torn_or_lost(
    loop_thread: LoopThread, bucket: str, aws: dict[str, str], redis_server: Service
) -> None:
    wire = _gated_wire(loop_thread)
    upstream = RunningApp(loop_thread, wire.app()).start()
    redis = ["--redis-url", f"redis://127.0.0.1:{redis_server.port}/0", "--log-level", "info"]
    a = _proxy("record-missing", bucket, upstream.url, aws, *redis)
    b = _proxy("record-missing", bucket, upstream.url, aws, *redis)
    try:
        with ThreadPoolExecutor(max_workers=32) as pool:
            futures = [pool.submit(_stream, proxy.url, "redis goes away") for proxy in (a, b) for _ in range(16)]
            a.wait_for_event("live call: no recording yet", count=16)
            b.wait_for_event("live call: no recording yet", count=16)
            # One replica leads (holding the Redis lock, its answer held upstream); the other waits.
            wait_until(lambda: len(wire.requests) >= 1, "the leader's upstream call")
            redis_server.stop()
            # The waiting replica loses Redis, so it stops waiting and goes upstream itself.
            wait_until(lambda: len(wire.requests) >= 2, "the other replica going upstream without Redis")
            _open_gate(loop_thread, wire)
            answers = [future.result(timeout=60) for future in futures]
        calls = len(wire.requests)
        wait_until(lambda: len(_objects(bucket)) == calls, "one recording per upstream call")
    finally:
        events = a.stop() + b.stop()
        upstream.stop()
    assert answers == ["ECHO: REDIS GOES AWAY"] * 32
    documents = _valid_recordings(_objects(bucket))
    assert len(documents) == calls  # every upstream call recorded, none overwritten
    assert sorted(d["request"].get("sequence", 1) for d in documents) == list(range(1, calls + 1))
    assert any(e["event"].startswith("redis unavailable") for e in events)


def test_two_record_processes_on_one_bucket_each_twice_make_four_distinct_repeats(
    loop_thread: LoopThread, bucket: str, aws: dict[str, str]
) -> None:
    wire = OpenAIWire()
    upstream = RunningApp(loop_thread, wire.app()).start()
    # Unshared, so the two processes' calls at the same moment both go upstream (shared, the
    # second would be served the first's recording): both then claim repeat 1, 2... at once.
    # Debug: "recorded" is a debug event (one per file).
    first = _proxy("record", bucket, upstream.url, aws, "--no-share-inflight", "--log-level", "debug")
    second = _proxy("record", bucket, upstream.url, aws, "--no-share-inflight", "--log-level", "debug")

    def twice(proxy: CliProxy) -> list[str]:
        ids = []
        for count in (1, 2):
            ids.append(_ask(proxy.url, "sample me four times")[1])
            proxy.wait_for_event("recorded", count=count)
        return ids

    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            both = [pool.submit(twice, first), pool.submit(twice, second)]  # at the same time
            ids = [request_id for future in both for request_id in future.result(timeout=60)]
    finally:
        first.stop()
        second.stop()
        upstream.stop()
    objects = _objects(bucket)
    documents = _valid_recordings(objects)
    assert len(objects) == 4 and len(set(objects)) == 4
    assert sorted(d["request"].get("sequence", 1) for d in documents) == [1, 2, 3, 4]
    # Each file holds its own upstream answer: none was overwritten by another writer's.
    assert sorted(d["response"]["headers"]["x-request-id"] for d in documents) == sorted(ids)
    assert len(set(ids)) == 4


def _llmproxy(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llmproxy", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **env},
        timeout=120,
    )


def test_sync_round_trip_directory_bucket_directory_is_byte_identical(
    bucket: str, aws: dict[str, str], tmp_path: Path
) -> None:
    source = REPO.parent / "shared" / "corpus"
    if not source.is_dir():
        pytest.skip(f"{source} (the shared corpus) is not on this machine")
    original = tmp_path / "original"
    shutil.copytree(source, original)
    names = {p.relative_to(original): p.read_bytes() for p in files_under(original) if p.suffix == ".json"}
    assert len(names) > 50

    up = _llmproxy("sync", str(original), bucket, env=aws)
    assert up.returncode == 0, up.stderr
    assert f"copied {len(names)}, unchanged 0, failed 0" in up.stdout
    assert {key.removeprefix("recordings/") for key in _objects(bucket)} == {p.as_posix() for p in names}

    copy = tmp_path / "copy"
    down = _llmproxy("sync", bucket, str(copy), env=aws)
    assert down.returncode == 0, down.stderr
    assert {p.relative_to(copy): p.read_bytes() for p in files_under(copy)} == names

    # Only what differs moves: nothing the second time; one changed file the third.
    again = _llmproxy("sync", str(original), bucket, env=aws)
    assert f"copied 0, unchanged {len(names)}, failed 0" in again.stdout, again.stdout + again.stderr
    changed = sorted(names)[0]
    (original / changed).write_bytes(names[changed].replace(b"\n", b"\n ", 1))
    third = _llmproxy("sync", str(original), bucket, env=aws)
    assert f"copied 1, unchanged {len(names) - 1}, failed 0" in third.stdout, third.stdout + third.stderr
    assert _objects(bucket)[f"recordings/{changed.as_posix()}"] == (original / changed).read_bytes()


def test_bucket_writes_are_create_only(bucket: str, aws: dict[str, str]) -> None:
    store = open_store(bucket)
    try:
        store.write(Path("openai/x.json"), {"a": 1})
        with pytest.raises(FileExistsError):
            store.write(Path("openai/x.json"), {"a": 2})
        assert store.load(Path("openai/x.json")) == {"a": 1}
    finally:
        store.close()


def test_watch_picks_up_files_added_to_the_directory(loop_thread: LoopThread, tmp_path: Path) -> None:
    wire = OpenAIWire()
    upstream = RunningApp(loop_thread, wire.app()).start()
    elsewhere, watched = tmp_path / "elsewhere", tmp_path / "watched"
    watched.mkdir()
    recorder = start_proxy(loop_thread, "record", elsewhere, upstream=upstream.url)
    replayer = start_proxy(loop_thread, "replay", watched, watch=True, refresh_seconds=0.05)
    try:
        answer = _ask(recorder.url, "added while running")
        recorder.stop()
        with pytest.raises(openai.NotFoundError):
            _ask(replayer.url, "added while running")
        for path in files_under(elsewhere):
            target = watched / path.relative_to(elsewhere)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target)
        index = replayer.server.pipeline.index
        wait_until(lambda: len(index) == 1, "the copied file in the index")
        assert _ask(replayer.url, "added while running") == answer
    finally:
        replayer.stop()
        upstream.stop()
    assert len(wire.requests) == 1


@pytest.mark.parametrize("ui", [False, True], ids=["no-ui", "with-ui"])
def test_health_endpoint_answers_before_routing_and_the_token(
    loop_thread: LoopThread, tmp_path: Path, ui: bool
) -> None:
    import urllib.error
    import urllib.request

    # The recordings page's sub-app lives under the same /_llmproxy/ prefix: health still answers.
    proxy = start_proxy(loop_thread, "replay", tmp_path, token="proxy-token-123", allow_empty=True, ui=ui)
    try:
        with urllib.request.urlopen(proxy.url + "/_llmproxy/health", timeout=10) as response:
            assert response.status == 200
            assert orjson.loads(response.read()) == {"status": "ok", "mode": "replay", "recordings": 0}
        request = urllib.request.Request(proxy.url + "/v1/models")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 401  # everything else still needs the token
    finally:
        proxy.stop()


def test_health_counts_the_files_that_could_not_be_loaded(loop_thread: LoopThread, tmp_path: Path) -> None:
    (tmp_path / "openai").mkdir()
    (tmp_path / "openai" / "torn.json").write_text('{"request": {"method": "POST"')
    proxy = start_proxy(loop_thread, "replay", tmp_path)
    try:
        assert _health(proxy.url) == (200, {"status": "ok", "mode": "replay", "recordings": 0, "skipped": 1})
    finally:
        proxy.stop()


def _ask_in(url: str, prompt: str, scope: str | None) -> str:
    """The upstream's request id of an answer asked in `scope` (x-llmproxy-scope)."""
    headers = {"x-llmproxy-scope": scope} if scope else {}
    raw = _client(url).chat.completions.with_raw_response.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": prompt}],  # type: ignore[list-item]
        extra_headers=headers,
    )
    return raw.headers["x-request-id"]


def test_scoped_recordings_go_under_their_scope_in_the_bucket_and_replay_per_scope(
    loop_thread: LoopThread, bucket: str, aws: dict[str, str]
) -> None:
    wire = OpenAIWire()
    upstream = RunningApp(loop_thread, wire.app()).start()
    scope = "tests/test_app.py::test_one"
    recorder = _proxy("record", bucket, upstream.url, aws)
    try:
        recorded = [_ask_in(recorder.url, "scoped", scope) for _ in range(2)] + [_ask_in(recorder.url, "scoped", None)]
    finally:
        recorder.stop()
    objects = _objects(bucket)
    prefix = bucket.removeprefix("s3://").partition("/")[2] + "/"
    names = sorted(name.removeprefix(prefix) for name in objects)
    assert len(names) == 3
    scoped = [name for name in names if name.startswith("tests/test_app/test_one/openai/")]
    assert len(scoped) == 2 and any(name.endswith("-2.json") for name in scoped)  # repeats within the scope
    shared = [name for name in names if name.startswith("openai/")]
    assert len(shared) == 1 and not shared[0].endswith("-2.json")  # the scope's repeats are its own
    for name, data in objects.items():
        document = orjson.loads(data)
        assert document["request"].get("scope") == (scope if "/tests/" in name else None)

    replayer = _proxy("replay", bucket, "http://127.0.0.1:9", aws)
    try:
        # Requests are served while the bucket loads, and a key's -2 file sorts before its first:
        # asked mid-load, repeat 2 could answer first. Loaded, the order is the recorded one.
        replayer.wait_for_event("recordings loaded")
        replayed = [_ask_in(replayer.url, "scoped", scope) for _ in range(2)] + [_ask_in(replayer.url, "scoped", None)]
    finally:
        replayer.stop()
        upstream.stop()
    assert replayed == recorded
    assert len(wire.requests) == 3  # replay never went upstream


class GatedS3:
    """moto behind two gates: folder listings wait for one, object reads for the other, except
    reads of files whose names carry one of `passes` (a slow bucket whose full load stalls, with
    some keys' files at hand)."""

    def __init__(self, loop_thread: LoopThread, target: str, passes: tuple[str, ...]) -> None:
        from aiohttp import web

        self.loop_thread, self.target, self.passes = loop_thread, target, passes
        self.held = 0
        self.opened: asyncio.Event = loop_thread.run(self._event())
        self.listing_opened: asyncio.Event = loop_thread.run(self._event())
        self.names_opened: asyncio.Event = loop_thread.run(self._event())
        self.names_asked = 0
        self.listings = 0
        self._session: aiohttp.ClientSession | None = None
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.app = RunningApp(loop_thread, app).start()

    @staticmethod
    async def _event() -> asyncio.Event:
        return asyncio.Event()

    async def handle(self, request: Any) -> Any:
        from aiohttp import web

        is_object_read = request.method == "GET" and request.path.count("/") >= 3
        if is_object_read and not any(name in request.path for name in self.passes):
            self.held += 1
            await self.opened.wait()
        elif request.query.get("max-keys") == "1":
            pass  # start-up's check that the bucket can be listed
        elif request.method == "GET" and request.query.get("prefix", "").endswith("/"):
            self.listings += 1
            await self.listing_opened.wait()  # a folder's listing, not one name's
        elif request.method == "GET" and "prefix" in request.query:
            self.names_asked += 1
            await self.names_opened.wait()
        if self._session is None:
            self._session = aiohttp.ClientSession(auto_decompress=False)
        hop = {"content-length", "transfer-encoding", "connection"}
        headers = {name: value for name, value in request.headers.items() if name.lower() not in hop}
        async with self._session.request(
            request.method, self.target + request.path_qs, headers=headers, data=await request.read()
        ) as answer:
            body = await answer.read()
            kept = {name: value for name, value in answer.headers.items() if name.lower() not in hop}
            return web.Response(status=answer.status, body=body, headers=kept)

    def open(self) -> None:
        self.loop_thread.loop.call_soon_threadsafe(self.opened.set)

    def open_listing(self) -> None:
        self.loop_thread.loop.call_soon_threadsafe(self.listing_opened.set)

    def open_names(self) -> None:
        self.loop_thread.loop.call_soon_threadsafe(self.names_opened.set)

    def close_listing(self) -> None:
        async def close() -> None:
            self.listing_opened = asyncio.Event()

        self.loop_thread.run(close())

    def stop(self) -> None:
        self.open()
        self.open_listing()
        self.open_names()

        async def close() -> None:
            if self._session is not None:
                await self._session.close()

        self.loop_thread.run(close())
        self.app.stop()


def _health(url: str) -> tuple[int, dict[str, Any]]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url + "/_llmproxy/health", timeout=10) as response:
            return response.status, orjson.loads(response.read())
    except urllib.error.HTTPError as refused:
        return refused.code, orjson.loads(refused.read())


def test_a_request_is_answered_from_the_files_named_for_it_while_the_bucket_still_loads(
    loop_thread: LoopThread, bucket: str, aws: dict[str, str]
) -> None:
    import boto3

    wire = OpenAIWire()
    upstream = RunningApp(loop_thread, wire.app()).start()
    recorder = _proxy("record", bucket, upstream.url, aws)
    try:
        first, second = _ask(recorder.url, "wanted"), _ask(recorder.url, "wanted")
        third = _ask(recorder.url, "asked once listed")
        other = _ask(recorder.url, "another prompt")
    finally:
        recorder.stop()
    assert first[1] != second[1]  # two upstream answers: repeats 1 and 2
    names = list(_objects(bucket))
    repeat = next(name for name in names if name.endswith("-2.json"))
    wanted_key = repeat.removesuffix("-2.json").rsplit("-", 1)[1]
    others = [name for name in names if wanted_key not in name]
    third_name = next(
        name
        for name in others
        if orjson.loads(_objects(bucket)[name])["request"]["body"]["messages"][0]["content"] == "asked once listed"
    )
    other_name = next(name for name in others if name != third_name)
    third_key = third_name.removesuffix(".json").rsplit("-", 1)[1]
    # A copy of the other recording under a name without a key, sorted first: the full load
    # stalls on it, and only reading it tells what it holds.
    name, _, prefix = bucket.removeprefix("s3://").partition("/")
    s3 = boto3.client("s3")
    s3.copy_object(Bucket=name, Key=f"{prefix}/openai/0000-first.json", CopySource={"Bucket": name, "Key": other_name})
    s3.delete_object(Bucket=name, Key=other_name)

    gate = GatedS3(loop_thread, aws["AWS_ENDPOINT_URL"], passes=(wanted_key, third_key))
    replay = _proxy("replay", bucket, upstream.url, {**aws, "AWS_ENDPOINT_URL": gate.app.url})
    try:
        impatient = openai.OpenAI(base_url=replay.url + "/v1", api_key="sk-test", max_retries=0, timeout=20)

        def ask(prompt: str) -> tuple[str, str]:
            raw = impatient.chat.completions.with_raw_response.create(
                model="gpt-4o",
                messages=[{"role": "user", "content": prompt}],  # type: ignore[list-item]
            )
            return raw.parse().choices[0].message.content or "", raw.headers["x-request-id"]

        gate.open_names()
        # The bucket's listing is held: a load balancer is told to wait, yet a recorded request
        # is answered (its repeats found by their names), in recorded order though `-2.json`
        # sorts before `.json`.
        assert _health(replay.url) == (503, {"status": "starting", "mode": "replay", "recordings": 0, "waiting": 0})
        assert ask("wanted") == first
        assert ask("wanted") == second
        assert _health(replay.url)[1]["status"] == "starting"
        # Listed, with the reads of other files held: names from the listing lead to the files.
        gate.open_listing()
        wait_until(lambda: _health(replay.url)[0] == 200, "the listing")
        assert ask("asked once listed") == third
        assert gate.held >= 1
        assert _health(replay.url) == (200, {"status": "loading", "mode": "replay", "recordings": 3, "waiting": 0})
        gate.open()
        wait_until(lambda: _health(replay.url)[1]["status"] == "ok", "the full load")
        assert ask("another prompt") == other
        assert len(wire.requests) == 4  # only the recording run went upstream
    finally:
        replay.stop()
        gate.stop()
        upstream.stop()


def test_a_name_found_after_the_load_ended_is_not_indexed_twice(
    loop_thread: LoopThread, bucket: str, aws: dict[str, str]
) -> None:
    recorded = _record_bucket(loop_thread, bucket, aws, [("only once", None)])
    # The request's own LIST (by its name) is held until the whole bucket was loaded.
    gate = GatedS3(loop_thread, aws["AWS_ENDPOINT_URL"], passes=())
    gate.open()
    replay = _proxy("replay", bucket, "http://127.0.0.1:9", {**aws, "AWS_ENDPOINT_URL": gate.app.url})
    try:
        with ThreadPoolExecutor(1) as pool:
            asked = pool.submit(_ask_in, replay.url, "only once", None)
            wait_until(lambda: gate.names_asked == 1, "the request to look for its own name")
            gate.open_listing()
            wait_until(lambda: _health(replay.url)[1]["status"] == "ok", "the full load")
            gate.open_names()
            assert [asked.result(timeout=30)] == recorded
        assert _health(replay.url)[1]["recordings"] == 1
    finally:
        replay.stop()
        gate.stop()


def _record_bucket(
    loop_thread: LoopThread, bucket: str, aws: dict[str, str], asks: list[tuple[str, str | None]]
) -> list[str]:
    """Record each (prompt, scope) through a record proxy; the upstream's request ids."""
    wire = OpenAIWire()
    upstream = RunningApp(loop_thread, wire.app()).start()
    recorder = _proxy("record", bucket, upstream.url, aws)
    try:
        return [_ask_in(recorder.url, prompt, scope) for prompt, scope in asks]
    finally:
        recorder.stop()
        upstream.stop()


def test_a_scoped_and_a_shared_request_for_one_body_while_loading_each_get_their_own(
    loop_thread: LoopThread, bucket: str, aws: dict[str, str]
) -> None:
    scope = "tests/test_app.py::test_own"
    shared, scoped = _record_bucket(loop_thread, bucket, aws, [("one body", None), ("one body", scope)])
    gate = GatedS3(loop_thread, aws["AWS_ENDPOINT_URL"], passes=("openai",))
    replay = _proxy("replay", bucket, "http://127.0.0.1:9", {**aws, "AWS_ENDPOINT_URL": gate.app.url})
    try:
        with ThreadPoolExecutor(2) as pool:
            answers = [pool.submit(_ask_in, replay.url, "one body", each) for each in (None, scope)]
            # Both wait on the bucket (its listing is held) while one lists its names: the other
            # must look for its own scope's names, not borrow the first one's.
            wait_until(lambda: _health(replay.url)[1].get("waiting") == 2, "both requests to wait on the bucket")
            gate.open_names()
            assert [answer.result(timeout=30) for answer in answers] == [shared, scoped]
    finally:
        replay.stop()
        gate.stop()


@pytest.mark.parametrize("mode", ["replay", "record-missing"])
def test_a_repeat_in_a_renamed_file_is_waited_for_not_replaced(
    loop_thread: LoopThread, bucket: str, aws: dict[str, str], mode: str
) -> None:
    import boto3

    first, second = _record_bucket(loop_thread, bucket, aws, [("said twice", None), ("said twice", None)])
    name, _, prefix = bucket.removeprefix("s3://").partition("/")
    repeat = next(key for key in _objects(bucket) if key.endswith("-2.json"))
    s3 = boto3.client("s3")
    # Repeat 2 under a name without the key: only reading it tells what it holds.
    s3.copy_object(Bucket=name, Key=f"{prefix}/openai/0000-renamed.json", CopySource={"Bucket": name, "Key": repeat})
    s3.delete_object(Bucket=name, Key=repeat)
    key16 = repeat.removesuffix("-2.json").rsplit("-", 1)[1]
    wire = OpenAIWire()
    upstream = RunningApp(loop_thread, wire.app()).start()
    gate = GatedS3(loop_thread, aws["AWS_ENDPOINT_URL"], passes=(key16,))
    gate.open_names()
    gate.open_listing()
    proxy = _proxy(mode, bucket, upstream.url, {**aws, "AWS_ENDPOINT_URL": gate.app.url}, "--after-last", "error")
    try:
        assert _ask_in(proxy.url, "said twice", None) == first
        with ThreadPoolExecutor(1) as pool:
            again = pool.submit(_ask_in, proxy.url, "said twice", None)
            # Repeat 1 was found by its name; repeat 2 may be anywhere: the whole bucket decides.
            wait_until(lambda: _health(proxy.url)[1].get("waiting") == 1, "the second request to wait for the load")
            gate.open()
            assert again.result(timeout=30) == second
        assert wire.requests == []  # record --missing made no duplicate
    finally:
        proxy.stop()
        gate.stop()
        upstream.stop()


def test_a_request_waiting_on_a_slow_bucket_does_not_stop_the_proxy_from_exiting(
    loop_thread: LoopThread, bucket: str, aws: dict[str, str]
) -> None:
    _record_bucket(loop_thread, bucket, aws, [("never answered", None)])
    gate = GatedS3(loop_thread, aws["AWS_ENDPOINT_URL"], passes=())
    replay = _proxy("replay", bucket, "http://127.0.0.1:9", {**aws, "AWS_ENDPOINT_URL": gate.app.url})
    try:
        with ThreadPoolExecutor(1) as pool:
            pool.submit(_ask_in, replay.url, "never answered", None)
            wait_until(lambda: gate.names_asked == 1, "the request to look for its own name")
            events = replay.stop()  # SIGTERM; fails if the proxy is still running 15 s later
            assert replay.process.returncode == 0
            assert any(event["event"] == "summary" for event in events)
    finally:
        gate.stop()


def test_a_name_found_during_a_refresh_is_not_indexed_twice(
    loop_thread: LoopThread, bucket: str, aws: dict[str, str], tmp_path: Path
) -> None:
    recorded = _record_bucket(loop_thread, bucket, aws, [("refreshed once", None)])
    gate = GatedS3(loop_thread, aws["AWS_ENDPOINT_URL"], passes=())
    gate.open()
    gate.open_listing()
    env = {**aws, "AWS_ENDPOINT_URL": gate.app.url}
    replay = _proxy("replay", bucket, "http://127.0.0.1:9", env, "--refresh-seconds", "0.1")
    try:
        with ThreadPoolExecutor(1) as pool:
            asked = pool.submit(_ask_in, replay.url, "refreshed once", None)
            wait_until(lambda: gate.names_asked == 1, "the request to look for its own name")
            wait_until(lambda: _health(replay.url)[1]["status"] == "ok", "the full load")
            # A refresh is listing the bucket when the request's own listing comes back.
            listings = gate.listings
            gate.close_listing()
            wait_until(lambda: gate.listings > listings, "a refresh")
            gate.open_names()
            assert [asked.result(timeout=30)] == recorded
            gate.open_listing()
        assert _health(replay.url)[1]["recordings"] == 1
    finally:
        replay.stop()
        gate.stop()


def test_a_bucket_that_cannot_be_listed_stops_start_up_in_one_line(aws: dict[str, str]) -> None:
    for mode in ("replay", "record"):
        result = _llmproxy(mode, "--recordings", "s3://no-such-bucket-here/recordings", "--port", "0", env=aws)
        assert result.returncode == 1  # as for a missing directory
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "NoSuchBucket" in lines[0] and "s3://no-such-bucket-here" in lines[0], lines


COMPOSE = REPO / "docs" / "deploy" / "compose.yaml"


def _compose_replica(service: dict[str, Any], services: dict[str, str]) -> tuple[list[str], dict[str, str], str]:
    """The llmproxy command line and environment a compose replica runs, with the compose
    network's host names pointed at the services this test started, and what pip installs."""
    import shlex

    shell = shlex.split(service["command"])
    assert shell[:2] == ["sh", "-c"], shell
    install, _, run = shell[2].partition("&&")
    run_args = shlex.split(run.replace("$${", "${"))
    assert run_args[:2] == ["exec", "llmproxy"], run_args
    environment = {name: str(value) for name, value in service["environment"].items()}
    args = [os.path.expandvars(arg) if arg.startswith("${") else arg for arg in run_args[2:]]
    for name, value in list(environment.items()):
        for host, address in services.items():
            value = value.replace(host, address)
        environment[name] = value
    args = [arg.replace("redis://redis:6379", services["redis:6379"]) for arg in args]
    return args, environment, install


def test_the_compose_deployment_runs_two_replicas_on_one_bucket_and_one_redis(
    loop_thread: LoopThread, s3_server: dict[str, str], redis_server: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/deploy/compose.yaml, run without Docker: each replica's own command and environment,
    with minio and redis replaced by moto and redis-server on 127.0.0.1."""
    import tomllib

    import boto3
    import yaml

    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert {"proxy-a", "proxy-b", "minio", "redis"} <= set(services)
    bucket_setup = services["minio-bucket"]["entrypoint"]
    bucket_name = bucket_setup.split("mc mb --ignore-existing local/")[1].split()[0].strip('"')
    moto = s3_server["AWS_ENDPOINT_URL"]
    boto3.client("s3", endpoint_url=moto, **_aws_keys(s3_server)).create_bucket(Bucket=bucket_name)
    hosts = {"http://minio:9000": moto, "redis:6379": f"redis://127.0.0.1:{redis_server.port}"}

    wire = OpenAIWire()
    upstream = RunningApp(loop_thread, wire.app()).start()
    replicas: list[CliProxy] = []
    try:
        for name in ("proxy-a", "proxy-b"):
            args, environment, install = _compose_replica(services[name], hosts)
            extras = install.split("[")[1].split("]")[0].split(",")
            declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
            assert set(extras) <= set(declared), extras
            monkeypatch.setenv("LLMPROXY_TOKEN", environment["LLMPROXY_TOKEN"])
            args = [*_expanded(args), "--upstream", upstream.url]
            # Tests bind 127.0.0.1 and an ephemeral port (compose maps each replica's 8765).
            args[args.index("--host") + 1] = "127.0.0.1"
            args[args.index("--port") + 1] = "0"
            args.remove("--log-json")  # CliProxy adds it
            replicas.append(CliProxy(*args, env={**environment, "AWS_ENDPOINT_URL": moto}))
        a, b = replicas
        token = {"x-llmproxy-token": services["proxy-a"]["environment"]["LLMPROXY_TOKEN"]}
        for replica in replicas:
            # Each replica's compose healthcheck, pointed at its port.
            check = services["proxy-a"]["healthcheck"]["test"]
            script = check[-1].replace("8765", str(replica.port))

            def healthy(script: str = script) -> bool:
                return subprocess.run([sys.executable, "-c", script], capture_output=True).returncode == 0

            wait_until(healthy, "the compose healthcheck to pass")

        def ask(replica: CliProxy) -> tuple[str, str]:
            client = openai.OpenAI(
                base_url=replica.url + "/v1", api_key="sk-test", max_retries=0, timeout=30, default_headers=token
            )
            raw = client.chat.completions.with_raw_response.create(
                model="gpt-4o",
                messages=[{"role": "user", "content": "through the compose deployment"}],  # type: ignore[list-item]
            )
            return raw.parse().choices[0].message.content or "", raw.headers["x-request-id"]

        recorded = ask(a)
        # B misses, takes the call's lock and finds A's recording in the bucket: no second call.
        assert ask(b) == recorded
        assert len(wire.requests) == 1
    finally:
        for replica in replicas:
            replica.stop()
        upstream.stop()


def _aws_keys(env: dict[str, str]) -> dict[str, str]:
    return {
        "aws_access_key_id": env["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"],
        "region_name": env["AWS_DEFAULT_REGION"],
    }


def _expanded(args: list[str]) -> list[str]:
    return [os.path.expandvars(arg) for arg in args]
