"""The per-request fast paths (issue #12) answer exactly as the general code they stand in for:
the router's memo of resolutions, the keying shortcuts, the recorder's cheaper checks."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Mapping

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from llmproxy.canonical import parse_body, public_query, secret_query_params
from llmproxy.providers import PROVIDERS, get_provider
from llmproxy.providers.base import Provider
from llmproxy.routing import MAX_RESOLVED, Route, RouteMatch, Router, default_routes

FUZZ = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "200")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

METHODS = ("GET", "POST", "DELETE")
PATHS = (
    "/",
    "/v1/chat/completions",
    "/v1/messages",
    "/v1/models",
    "/v1/models/gpt-4o",
    "/v1/files",
    "/v1/fim/completions",
    "/v1/embeddings",
    "/v1/unknown-resource",
    "/v2/chat",
    "/api/chat",
    "/api/generate",
    "/v1beta/models/gemini-2.0-flash:generateContent",
    "/v1/projects/p/locations/us-central1/publishers/google/models/gemini-2.0-flash:generateContent",
    "/model/anthropic.claude-3-haiku/converse",
    "/openai/deployments/gpt-4o/chat/completions",
    "/openai/v1/chat/completions",
    "/anthropic/messages",
    "/anthropic/v1/messages",
    "/mistral/chat/completions",
    "/local/chat/completions",
    "/local/health",
    "/health",
    "/chat/completions",
)
HEADER_SETS: tuple[dict[str, str], ...] = (
    {},
    {"user-agent": "python-httpx/0.27"},
    {"user-agent": "mistral-client-python/1.2.3", "authorization": "Bearer abcdefgh12345678"},
    {"anthropic-version": "2023-06-01", "x-api-key": "sk-ant-0123456789abcdefghij"},
    {"anthropic-version": "2023-06-01", "authorization": "Bearer abcdefgh12345678"},
    {"authorization": "Bearer abcdefgh12345678", "content-type": "application/json"},
    {"authorization": "AWS4-HMAC-SHA256 Credential=x", "x-amz-date": "20240101T000000Z"},
    {"x-goog-api-key": "AIzaSyA-0123456789abcdefghijklmnopqrstu"},
)


def _routers() -> list[Router]:
    configured = Route("local", get_provider("openai"), "http://127.0.0.1:9/v1", prefix="/local")
    return [Router(default_routes()), Router([configured, *default_routes()])]


def test_a_memoised_resolution_is_what_every_providers_rules_say_with_all_headers() -> None:
    """The memo keys on the method, the path and the headers providers declare they read; it
    must give what asking every provider with every header gives, in any order of requests."""
    for router in _routers():
        reference = router  # `_resolve` is the rule walk the memo stands in for
        cases = list(itertools.product(METHODS, PATHS, HEADER_SETS))
        for order in (cases, list(reversed(cases))):
            for method, path, headers in order:
                expected = reference._resolve(method, path, headers)
                assert router.resolve(method, path, headers) == expected, (method, path, headers)
                # Case-insensitive headers (aiohttp's) resolve alike.
                proxy = CIMultiDictProxy(CIMultiDict({name.title(): value for name, value in headers.items()}))
                assert router.resolve(method, path, proxy) == expected, (method, path, headers)


def test_the_router_memo_stays_bounded_and_a_refilled_memo_answers_alike() -> None:
    router = Router(default_routes())
    first = router.resolve("POST", "/v1/chat/completions", {})
    for number in range(MAX_RESOLVED + 10):
        router.resolve("GET", f"/v1/files/file-{number}", {})
    assert len(router._resolved) <= MAX_RESOLVED
    again = router.resolve("POST", "/v1/chat/completions", {})
    assert isinstance(again, RouteMatch) and again == first and again.route.provider.name == "openai"


class _Watching(Provider):
    """A provider whose path rules read one declared header, and note every header they see."""

    name = "watching"
    claim_priority = 100
    claim_headers = frozenset({"x-watch"})

    def __init__(self) -> None:
        self.seen: list[set[str]] = []

    def claims(self, method: str, path: str, headers: Mapping[str, str]) -> bool:
        self.seen.append(set(headers))
        return path == "/watched" and headers.get("x-watch") == "yes"


def test_only_declared_claim_headers_reach_a_providers_path_rules() -> None:
    """A provider whose `claims` read an undeclared header would be resolved wrongly from the
    memo: the router shows `claims` only what providers declare, so the suite catches it."""
    watching = _Watching()
    router = Router([Route("watching", watching, "http://127.0.0.1:9"), *default_routes()])
    headers = {**HEADER_SETS[3], "user-agent": "mistral-client-x", "x-other": "1", "x-watch": "yes"}
    match = router.resolve("POST", "/watched", headers)
    assert match is not None and match.route.name == "watching"
    assert router.resolve("POST", "/watched", {**headers, "x-watch": "no"}) is None
    shown = {"anthropic-version", "user-agent", "x-watch"}
    assert watching.seen == [shown, shown]
    assert {name for provider in PROVIDERS.values() for name in provider.claim_headers} == {
        "anthropic-version",
        "user-agent",
    }


def test_route_with_lowered_headers_answers_as_route_with_the_clients_headers() -> None:
    for router in _routers():
        for method, path, headers in itertools.product(METHODS, PATHS, HEADER_SETS):
            for query in ("", "key=AIzaSyA-0123456789abcdefghijklmnopqrstu", "api-version=1"):
                mixed = CIMultiDictProxy(CIMultiDict({name.title(): value for name, value in headers.items()}))
                expected = router.route(method, path, mixed, query, "127.0.0.1:1")
                assert router.route(method, path, dict(headers), query, "127.0.0.1:1", lowered=True) == expected


def _public_query_before(pairs: Iterable[tuple[str, str]], ignore: Iterable[str] = ()) -> list[tuple[str, str]]:
    dropped = secret_query_params().union(name.lower() for name in ignore)
    return [(name, value) for name, value in pairs if name.lower() not in dropped]


query_pairs = st.lists(
    st.tuples(st.sampled_from(["a", "Key", "api_key", "X", "token", "alt", "sig"]), st.text(max_size=5)), max_size=5
)


@FUZZ
@given(query_pairs, st.lists(st.sampled_from(["alt", "X", "a", "b"]), max_size=3))
def test_public_query_fast_path_drops_what_it_always_dropped(pairs: list[tuple[str, str]], ignore: list[str]) -> None:
    assert public_query(pairs, ignore) == _public_query_before(pairs, ignore)
    assert public_query(tuple(pairs), tuple(ignore)) == _public_query_before(pairs, ignore)
    assert public_query(iter(pairs), iter(ignore)) == _public_query_before(pairs, ignore)


BLANKISH = [b" ", b"\t", b"\n", b"\r", b"\x0b", b"\x0c", b"\x00", b"1", b"\xa0"]


@FUZZ
@given(st.binary(max_size=12) | st.lists(st.sampled_from(BLANKISH)).map(b"".join))
def test_an_empty_body_is_what_strip_leaves_empty(data: bytes) -> None:
    value = parse_body(data, "application/json")
    if not data.strip():
        assert value is None
    else:  # a body that is not blank is parsed (JSON `null` alone parses to None)
        assert value is not None or data.strip() == b"null"
