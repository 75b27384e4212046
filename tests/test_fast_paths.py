"""The per-request fast paths (issue #12) answer exactly as the general code they stand in for:
the router's memo of resolutions, the keying shortcuts, the recorder's cheaper checks."""

from __future__ import annotations

import bisect
import itertools
import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from llmproxy.canonical import parse_body, public_query, secret_query_params
from llmproxy.providers import CREDENTIAL_HEADERS, IDENTITY_HEADERS, PROVIDERS, get_provider
from llmproxy.providers.base import Provider
from llmproxy.routing import MAX_RESOLVED, Route, RouteMatch, Router, credential_mismatch, default_routes
from llmproxy.store.secrets import SecretScanner
from llmproxy.store.writer import _chunk_values, capture_response, chunk_times
from llmproxy.wire import json as json_wire
from llmproxy.wire.framing import DATA_KEY, TYPE_KEY, CapturedBody, data_of, typed
from llmproxy.wire.opaque import OPAQUE
from llmproxy.wire.sse import SSE
from llmproxy.wire.textstream import TextStreamCodec

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


def _chunk_times_before(reads: list[tuple[int, float]], chunk_ends: list[int]) -> list[float]:
    read_ends = [end for end, _ in reads]
    last = len(reads) - 1
    return [round(reads[min(bisect.bisect_left(read_ends, end), last)][1], 1) for end in chunk_ends]


@FUZZ
@given(
    st.lists(st.tuples(st.integers(0, 50), st.floats(0, 1e6, allow_nan=False)), min_size=1, max_size=30),
    st.lists(st.integers(0, 60), max_size=40),
    st.booleans(),
)
def test_chunk_times_in_one_walk_are_the_bisected_ones(
    steps: list[tuple[int, float]], ends: list[int], ordered: bool
) -> None:
    total = 0
    reads = []
    for step, ms in steps:  # reads count bytes received so far
        total += step
        reads.append((total, ms))
    chunk_ends = sorted(ends) if ordered else ends
    assert chunk_times(reads, chunk_ends) == _chunk_times_before(reads, chunk_ends)


SCALARS = st.integers(-(2**63), 2**63 - 1) | st.text(max_size=6) | st.floats(allow_nan=False)
sse_payloads = st.one_of(
    st.dictionaries(st.text(max_size=4), SCALARS, max_size=3).map(orjson.dumps),
    st.lists(st.integers(-5, 5), max_size=3).map(lambda value: json.dumps(value).encode()),  # python's spacing
    st.dictionaries(st.sampled_from(["a", "é"]), st.integers(), max_size=2).map(lambda v: json.dumps(v).encode()),
    st.sampled_from([b"[DONE]", b"", b"1", b'"text"', b"{bad", b'{"a": 1}', b'{"big":123456789012345678901234}']),
    st.sampled_from([b'{"a":"\xff"}', b"\xc3\xa9", b'{"k":"\xe2\x82\xac"}']),
)


@FUZZ
@given(st.lists(sse_payloads, max_size=8), st.sampled_from([b"", b"data: [DONE]\n\n", b'data: {"a":1}', b"\n"]))
def test_the_plain_sse_capture_is_the_general_one(payloads: list[bytes], tail: bytes) -> None:
    """OpenAI's shape of stream goes through the shortcut; it must capture what the general
    event loop captures (body, framing, chunk ends), and refuse what the general loop refuses."""
    raw = b"".join(b"data: " + payload + b"\n\n" for payload in payloads) + tail
    labeler = lambda value: "chunk"  # noqa: E731

    def general() -> Any:
        return TextStreamCodec._capture(SSE, raw, labeler)

    def plain() -> Any:
        return SSE._capture_plain(raw, labeler)

    try:
        expected = general()
    except UnicodeDecodeError:
        try:
            plain()
        except UnicodeDecodeError:
            return
        raise AssertionError("the shortcut took bytes the general loop refused") from None
    captured = plain()
    assert captured is not None
    assert (captured.body, captured.framing, captured.chunk_ends) == (
        expected.body,
        expected.framing,
        expected.chunk_ends,
    )
    if captured.exact:
        assert b"".join(SSE.render(captured.body, captured.framing)) == raw


def _worth_walking_before(scanner: SecretScanner, data: bytes, values: Mapping[str, str]) -> bool:
    if b'"llmproxy.bytes"' in data:
        return True
    if any(value.encode("utf-8", "surrogateescape") in data for value in values):
        return True
    if not scanner._extra and not any(
        marker in data for marker in (b"sk-", b"AIza", b"AKIA", b"ASIA", b"earer", b"eyJ")
    ):
        return False
    return scanner._any.search(data.decode("utf-8", errors="replace")) is not None


CREDENTIAL_VALUES = [
    "abcdefgh12345678",
    "Bearer abcdefgh12345678",
    "token with, comma",
    "key: colon",
    "[bracketed]",
    "{braced}",
    'x":"y',
    "é-accented-value",
    "AKIA0123456789ABCDEF",
]
texts = st.one_of(
    st.sampled_from(CREDENTIAL_VALUES),
    st.sampled_from(["sk-", "task-list", "hello", "Bearer", "eyJhbGciOi", "AIza", ",", ":", " ", "\n"]),
    st.text(alphabet='ab ,:[]{}"\n-', max_size=8),
)
documents = st.recursive(
    st.none() | st.integers(-(2**63), 2**63 - 1) | texts,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(texts, children, max_size=4),
    max_leaves=12,
)


@FUZZ
@given(documents, st.lists(st.sampled_from(CREDENTIAL_VALUES), max_size=3), st.booleans())
def test_the_secret_prefilter_on_the_compact_document_decides_as_on_the_file(
    document: Any, carried: list[str], extra: bool
) -> None:
    scanner = SecretScanner([r"colon"] if extra else [])
    values = {value: "header x-test" for value in carried}
    pretty = orjson.dumps(document, option=orjson.OPT_INDENT_2) + b"\n"
    compact = orjson.dumps(document)
    before = _worth_walking_before(scanner, pretty, values)
    worth = scanner._worth_walking(pretty, values, compact)
    assert worth == scanner._worth_walking(pretty, values)
    assert worth or not before  # it walks whenever it walked before
    if not worth:  # and what it lets through, the walk itself finds nothing in
        assert list(scanner._iter(document, "", values)) == []


def test_escaped_credentials_are_walked_and_found() -> None:
    """JSON escapes hid these from the quick pass (the walk reads strings unescaped)."""
    scanner = SecretScanner()
    cases = [
        ({"content": "Bearer\tabcdefghijklmnopqrstuv"}, {}),
        ({"content": "Bearer\nabcdefghijklmnopqrstuv"}, {}),
        ({"content": 'key=ab"cdefgh123'}, {'ab"cdefgh123': "header x-api-key"}),
        ({"content": "key=ab\\cdefgh123"}, {"ab\\cdefgh123": "header x-api-key"}),
    ]
    for document, values in cases:
        pretty = orjson.dumps(document, option=orjson.OPT_INDENT_2) + b"\n"
        assert _worth_walking_before(scanner, pretty, values) is False  # what was missed
        findings = scanner.scan(document, pretty, values)
        assert [finding.field for finding in findings] == ["content"], document


def _json_capture_before(raw: bytes, labeler: Any) -> Any:
    """JsonCodec.capture as it was: the style detector on the decoded text, for every body."""
    value = json_wire.loads(raw) if raw.strip() else json_wire.NOT_JSON
    if value is json_wire.NOT_JSON:
        return OPAQUE.capture(raw, labeler)
    framing: dict[str, Any] = {"format": "json"}
    text = raw.decode("utf-8")
    body_text = text.rstrip(" \t\r\n")
    detector = json_wire.StyleDetector()
    if detector.accepts(value, body_text):
        json_wire.set_style(framing, detector.style)
        if body_text != text:
            framing["end"] = text[len(body_text) :]
    else:
        framing["verbatim"] = {"0": text}
    return CapturedBody(typed(labeler(value), value), framing)


json_texts = st.one_of(
    st.recursive(
        st.none() | st.booleans() | SCALARS,
        lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=3), children, max_size=3),
        max_leaves=8,
    ).flatmap(
        lambda value: st.sampled_from(
            [
                orjson.dumps(value),
                json.dumps(value).encode(),
                json.dumps(value, ensure_ascii=False).encode(),
                json.dumps(value, indent=2).encode(),
                json.dumps(value, separators=(",", ":")).encode(),
            ]
        )
    ),
    st.sampled_from([b"", b"  ", b"not json", b"\xff\xfe", b" {}", b'{"a":1e400}', b"123456789012345678901234"]),
)


@FUZZ
@given(json_texts, st.sampled_from([b"", b"\n", b" \r\n", b"\t"]))
def test_the_json_capture_shortcut_is_the_style_detectors_answer(text: bytes, tail: bytes) -> None:
    raw = text + tail
    labeler = lambda value: "body"  # noqa: E731
    expected = _json_capture_before(raw, labeler)
    captured = json_wire.JSON.capture(raw, labeler)
    assert (captured.body, captured.framing) == (expected.body, expected.framing)
    # The recorder trusts the capture's proof instead of rendering again: it must hold.
    provider = get_provider("openai")
    recorded = capture_response(provider, "/v1/chat/completions", json_wire.JSON, raw)
    if recorded.framing.get("format") == "json":
        assert b"".join(json_wire.JSON.render(recorded.body, recorded.framing, provider.json_value)) == raw


@FUZZ
@given(
    st.lists(
        st.sampled_from([typed("chunk", {"a": 1}), {TYPE_KEY: "x"}, {DATA_KEY: 2}, [1], None, "text", 3]),
        max_size=6,
    )
)
def test_chunk_values_inline_are_data_of_each(chunks: list[Any]) -> None:
    assert _chunk_values(chunks) == [data_of(item) for item in chunks]


def _credential_mismatch_before(provider: Provider, headers: Mapping[str, str]) -> list[str]:
    telling = CREDENTIAL_HEADERS | IDENTITY_HEADERS
    return [name for name in headers if name in telling and not provider.accepts_header(name, headers)]


def test_credential_mismatch_names_what_the_walk_over_every_header_named() -> None:
    """The set intersection decides whether any header is foreign; the message is unchanged."""
    extra = (
        {},
        {"x-api-key": "sk-ant-0123456789abcdefghij", "authorization": "Bearer abcdefgh12345678"},
        {"api-key": "azurekey0123456789", "anthropic-beta": "tools"},
    )
    for provider in PROVIDERS.values():
        for base, more in itertools.product(HEADER_SETS, extra):
            headers = {**base, **more}
            foreign = _credential_mismatch_before(provider, headers)
            message = credential_mismatch(provider, headers)
            if not foreign:
                assert message is None
            else:
                assert message is not None and message.startswith(f"the request carries {foreign[0]} (used by ")
                assert all(f"{name} (used by " in message for name in foreign)
