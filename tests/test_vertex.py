"""Vertex AI's Gemini paths through the proxy with google-genai (`vertexai=True`): record against a
local upstream speaking Vertex's format, stop it, replay; the OAuth token and the express-mode API
key reach the upstream and never the disk."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from google import genai
from google.genai import types as genai_types
from google.oauth2.credentials import Credentials

from llmproxy.providers import get_provider
from llmproxy.routing import Route, Router, default_routes
from llmproxy.tools.explain import show
from tests.support import LoopThread, assert_no_secret, files_under
from tests.test_providers import dump, record_and_replay
from tests.upstreams.vertex_wire import VertexWire

OAUTH_TOKEN = "ya29.a0FAKE-vertex-oauth-token-0123456789abcdef"
EXPRESS_KEY = "AIzaSyFAKE-vertex-express-key-0123456789"
MODEL = "gemini-2.5-flash"


def _strip_http(values: dict[str, Any]) -> dict[str, Any]:
    for value in values.values():  # the SDK keeps the raw HTTP headers; they are not content
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, dict):
                item.pop("sdk_http_response", None)
    return values


def _calls(base_url: str) -> dict[str, Any]:
    options = genai_types.HttpOptions(base_url=base_url)
    project = genai.Client(
        vertexai=True,
        project="my-project",
        location="us-central1",
        credentials=Credentials(token=OAUTH_TOKEN),
        http_options=options,
    )
    express = genai.Client(vertexai=True, api_key=EXPRESS_KEY, http_options=options)
    # Through the provider's own prefix (as `llmproxy run` sets GOOGLE_VERTEX_BASE_URL), on v1.
    v1 = genai.Client(
        vertexai=True,
        project="my-project",
        location="global",
        credentials=Credentials(token=OAUTH_TOKEN),
        http_options=genai_types.HttpOptions(base_url=base_url + "/vertex", api_version="v1"),
    )
    out: dict[str, Any] = {}
    out["generate"] = dump(project.models.generate_content(model=MODEL, contents="Why is the sky blue?"))
    out["stream"] = dump(list(project.models.generate_content_stream(model=MODEL, contents="Tell me a story")))
    out["count"] = dump(project.models.count_tokens(model=MODEL, contents="count me"))
    out["express"] = dump(express.models.generate_content(model=MODEL, contents="express mode"))
    out["v1_stream"] = dump(list(v1.models.generate_content_stream(model=MODEL, contents="on v1")))
    return _strip_http(out)


def test_vertex_generate_stream_count_and_express_mode_record_then_replay(
    loop_thread: LoopThread, tmp_path: Path
) -> None:
    upstream = VertexWire()
    recorded, replayed, recordings = record_and_replay(
        loop_thread, tmp_path, upstream, [{"name": "vertex", "provider": "vertex"}], _calls
    )
    assert replayed == recorded
    assert recorded["generate"]["candidates"][0]["content"]["parts"][0]["text"].startswith("Vertex gemini-2.5-flash")
    assert recorded["stream"][-1]["usage_metadata"]["traffic_type"] == "ON_DEMAND"
    assert recorded["count"]["total_tokens"] == 6
    prefix = "/v1beta1/projects/my-project/locations/us-central1/publishers/google/models/gemini-2.5-flash"
    assert [r["path_qs"] for r in upstream.requests] == [
        prefix + ":generateContent",
        prefix + ":streamGenerateContent?alt=sse",
        prefix + ":countTokens",
        "/v1beta1/publishers/google/models/gemini-2.5-flash:generateContent",
        "/v1/projects/my-project/locations/global/publishers/google/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
    ]
    bearer = [r["headers"].get("Authorization") for r in upstream.requests]
    assert bearer == [f"Bearer {OAUTH_TOKEN}"] * 3 + [None, f"Bearer {OAUTH_TOKEN}"]
    assert upstream.requests[3]["headers"]["x-goog-api-key"] == EXPRESS_KEY
    assert_no_secret(recordings, OAUTH_TOKEN, EXPRESS_KEY)
    documents = [json.loads(p.read_text()) for p in files_under(recordings)]
    assert len(documents) == 5 and {p.parent.name for p in files_under(recordings)} == {"vertex"}
    assert {d["request"]["model"] for d in documents} == {MODEL}
    streams = [d for d in documents if d["response"]["is_streaming"]]
    assert len(streams) == 2
    for document in streams:
        assert document["response"]["framing"]["line_ending"] == "\r\n"
        assert document["response"]["framing"]["end"] == ""
        assert {i["__type__"] for i in document["response"]["body"]} == {"google.genai.types.GenerateContentResponse"}
    # `llmproxy show` reads the conversation through the vertex provider.
    router = Router(default_routes())

    def resolve(method: str, path: str) -> Any:
        match = router.resolve(method, path, {})
        return match.route.provider if match else None

    story = next(d for d in streams if "Tell me a story" in json.dumps(d["request"]["body"]))
    shown = show(Path("x.json"), story, resolve)
    assert "[user] Tell me a story" in shown
    assert "[assistant] Vertex gemini-2.5-flash says: Tell me a story" in shown, shown


def test_vertex_paths_route_to_vertex_and_gemini_paths_stay_gemini() -> None:
    router = Router(Route(name=name, provider=get_provider(name)) for name in ("openai", "gemini", "vertex", "cohere"))
    scoped = "/v1beta1/projects/p/locations/europe-west4/publishers/google/models/gemini-2.5-pro:generateContent"
    for path in (
        scoped,
        "/v1/projects/p/locations/global/publishers/google/models/m:streamGenerateContent",
        "/v1beta1/projects/p/locations/us-central1/endpoints/1234567890:generateContent",
        "/v1beta1/publishers/google/models/gemini-2.5-flash:countTokens",
    ):
        match = router.resolve("POST", path, {})
        assert match is not None and match.route.name == "vertex", path
    assert get_provider("vertex").model_of(scoped, None) == "gemini-2.5-pro"
    for path in ("/v1beta/models/gemini-2.0-flash:generateContent", "/v1beta1/models/m:generateContent"):
        match = router.resolve("POST", path, {})
        assert match is not None and match.route.name == "gemini", path
    match = router.resolve("POST", "/v2/chat", {})
    assert match is not None and match.route.name == "cohere"


def test_requests_for_the_default_upstream_go_to_their_locations_host() -> None:
    vertex = get_provider("vertex")
    path = "/v1beta1/projects/p/locations/{}/publishers/google/models/m:streamGenerateContent?alt=sse"
    headers = [("Authorization", "Bearer t")]
    for location, host in (
        ("us-central1", "us-central1-aiplatform.googleapis.com"),
        ("europe-west4", "europe-west4-aiplatform.googleapis.com"),
        ("global", "aiplatform.googleapis.com"),
        ("eu", "aiplatform.eu.rep.googleapis.com"),
    ):
        url, sent = vertex.prepare_upstream("POST", vertex.default_upstream + path.format(location), headers, b"{}")
        assert url == f"https://{host}" + path.format(location)
        assert sent == headers
    # A configured upstream (a test server, a private endpoint) is used as it is.
    local = "http://127.0.0.1:8080" + path.format("us-central1")
    assert vertex.prepare_upstream("POST", local, headers, b"{}") == (local, headers)
    express = vertex.default_upstream + "/v1beta1/publishers/google/models/m:generateContent"
    assert vertex.prepare_upstream("POST", express, headers, b"{}") == (express, headers)
