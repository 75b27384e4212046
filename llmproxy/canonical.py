"""Matching: the canonical form of a request, its key, and what differs between two requests.

A key depends on the route, method, path, query (secrets and ignored parameters removed), the
headers a route says take part, and the JSON body parsed with keys sorted. It never depends on
user-agent, x-stainless-*, content-length, auth or any other per-call header.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from email import policy as email_policy
from email.parser import BytesParser
from typing import Any

import orjson

# Query parameters that carry credentials: never in a key, a file or a log line. These are the
# generic names; each provider declares its own (see secret_query_params()).
GENERIC_SECRET_QUERY_PARAMS = frozenset({"api_key", "api-key", "apikey", "access_token", "token", "sig", "signature"})


@functools.cache
def secret_query_params() -> frozenset[str]:
    """Every query parameter that carries a credential: the generic ones and each provider's."""
    # Imported here: the providers import the wire layer, which must stay free to import this module.
    from llmproxy.providers import CREDENTIAL_QUERY

    return GENERIC_SECRET_QUERY_PARAMS | CREDENTIAL_QUERY


METHODS_WITHOUT_BODY = frozenset({"GET", "HEAD", "DELETE", "OPTIONS"})


@dataclass(frozen=True, slots=True)
class RawBody:
    """A request body that is not JSON: it takes part in the key by its digest."""

    digest: str
    size: int

    @classmethod
    def of(cls, data: bytes) -> RawBody:
        return cls(hashlib.sha256(data).hexdigest(), len(data))


MULTIPART_LABEL = "llmproxy.multipart"

# How deep a request body's JSON may nest. A recording holds the body a few levels down, and
# orjson writes at most 254 levels: deeper bodies could be forwarded but never recorded.
MAX_REQUEST_DEPTH = 128


class BadRequest(Exception):
    """A request the proxy refuses before routing it anywhere: answered with `status` and
    `code` in the provider's error shape, logged as one line."""

    def __init__(self, status: int, code: str, message: str, event: str = "request refused") -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.event = event  # the log line's event


def parse_body(data: bytes, content_type: str = "", *, max_depth: int = MAX_REQUEST_DEPTH) -> Any:
    """The request body as it takes part in the key.

    JSON gives its parsed value; a multipart form gives its fields, with files by digest (the
    boundary is random per request, so the bytes themselves would never match twice); any other
    body gives a RawBody (its digest); an empty body gives None. Raises BadRequest for a body
    nested deeper than `max_depth`.
    """
    if not data or data.isspace():  # as `not data.strip()`, without copying the body
        return None
    if content_type.lower().startswith("multipart/form-data"):
        form = parse_multipart(data, content_type)
        if form is not None:
            return {"__type__": MULTIPART_LABEL, "__data__": form}
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        if "depth" in str(exc) or "recursion" in str(exc).lower():
            raise _too_deep(max_depth) from None
        return RawBody.of(data)
    # Nesting cannot exceed the count of opening brackets: most bodies need no walk.
    if data.count(b"[") + data.count(b"{") > max_depth and nesting(value, max_depth) > max_depth:
        raise _too_deep(max_depth)
    return value


def _too_deep(limit: int) -> BadRequest:
    return BadRequest(400, "request_too_deep", f"the request body nests more than {limit} levels deep")


def nesting(value: Any, limit: int) -> int:
    """How deep containers nest in a JSON value (a scalar: 0), counting no further than limit + 1.
    Iterative, so any depth is safe to measure."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Iterable[Any] = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        depth += 1
        if depth > deepest:
            deepest = depth
            if deepest > limit:
                return deepest
        stack.extend((child, depth) for child in children if isinstance(child, (dict, list)))
    return deepest


def header_bytes(value: str) -> bytes:
    """A header value as the client sent it: aiohttp decodes UTF-8 with surrogateescape."""
    return value.encode("utf-8", "surrogateescape")


_NESTED_MULTIPART = re.compile(rb"(?i)content-type:[ \t]*multipart/")
MAX_NESTED_PARTS = 32
MAX_NESTED_PARTS_SCAN = 64 * 1024 * 1024


def parse_multipart(data: bytes, content_type: str) -> list[dict[str, Any]] | None:
    """A form's fields; None when the body is not a form the email parser can read (it is then
    keyed by digest). A form nested so deep that the parser recurses out is refused."""
    # RFC 7578 forbids nested forms; the email parser would recurse (slowly) into each one.
    if len(_NESTED_MULTIPART.findall(data, 0, MAX_NESTED_PARTS_SCAN)) > MAX_NESTED_PARTS:
        raise BadRequest(400, "request_too_deep", "the multipart request body nests too many multipart parts")
    try:
        return _parse_multipart(data, content_type)
    except RecursionError:
        raise BadRequest(400, "request_too_deep", "the multipart request body nests too deep") from None
    except Exception:  # noqa: BLE001 - hostile input to a lenient parser: any failure means "not a form"
        return None


def _parse_multipart(data: bytes, content_type: str) -> list[dict[str, Any]] | None:
    message = BytesParser(policy=email_policy.HTTP).parsebytes(
        b"Content-Type: " + header_bytes(content_type) + b"\r\n\r\n" + data
    )
    if not message.is_multipart():
        return None
    fields: list[dict[str, Any]] = []
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True) or b""
        filename = part.get_filename()
        if filename is None:
            try:
                fields.append({"name": name, "value": payload.decode("utf-8")})
                continue
            except UnicodeDecodeError:
                pass
        fields.append(
            {
                "name": name,
                "filename": filename,
                "content_type": part.get_content_type(),
                "size": len(payload),
                "sha256": hashlib.sha256(payload).hexdigest(),
            }
        )
    return fields


class KeyMemo:
    """Parsed bodies and keys of requests seen before, by their exact bytes: test suites send
    the same requests again and again. Bounded by the bytes it holds (oldest out first), so
    distinct large requests never grow it past `max_bytes`."""

    # What an entry really holds (tracemalloc, chat bodies of 160 B to 4 KB): its body bytes, the
    # parsed body (about twice its JSON size in Python objects) and the canonical request, about
    # 1.6 KB whatever the size. Counted lower, a flood of distinct small requests held several
    # times the bound (RSS +100 MB in 60 s of `bench.overload`).
    OVERHEAD = 3
    ENTRY_BYTES = 2048

    def __init__(self, max_bytes: int = 8 * 1024 * 1024, max_entry_bytes: int = 64 * 1024) -> None:
        self.max_bytes = max_bytes
        self.max_entry_bytes = max_entry_bytes
        self.bytes = 0
        self._items: dict[Any, tuple[Any, int]] = {}

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Any) -> Any:
        found = self._items.get(key)
        return None if found is None else found[0]

    def put(self, key: Any, value: Any, size: int) -> None:
        cost = size * self.OVERHEAD + self.ENTRY_BYTES
        if size > self.max_entry_bytes or cost > self.max_bytes or key in self._items:
            return
        self._items[key] = (value, cost)
        self.bytes += cost
        while self.bytes > self.max_bytes:
            oldest = next(iter(self._items))
            self.bytes -= self._items.pop(oldest)[1]


def public_query(pairs: Iterable[tuple[str, str]], ignore: Iterable[str] = ()) -> list[tuple[str, str]]:
    if not pairs:  # most requests have no query: no set to build
        return []
    dropped = secret_query_params().union(name.lower() for name in ignore) if ignore else secret_query_params()
    return [(name, value) for name, value in pairs if name.lower() not in dropped]


_KEY_JSON = orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS


def canonical_json(body: Any) -> bytes:
    """A body's canonical text: parsed JSON re-serialised compactly with sorted keys."""
    if isinstance(body, RawBody):
        body = {"__raw_sha256__": body.digest, "size": body.size}
    # orjson hands back bytes inside a 4 KiB allocation; the index keeps one per recording,
    # so keep an exact-size copy instead.
    return memoryview(orjson.dumps(body, option=_KEY_JSON)).tobytes()


@dataclass(frozen=True, slots=True)
class CanonicalRequest:
    """What identifies a request. The body is kept as canonical JSON bytes: compact in the index
    (one bytes object per recording) and parsed again only to explain a miss."""

    route: str
    method: str
    path: str
    query: tuple[tuple[str, str], ...] = ()
    headers: tuple[tuple[str, str], ...] = ()
    body_json: bytes = b"null"
    key: str = field(init=False, default="")

    def __post_init__(self) -> None:
        head = orjson.dumps([self.route, self.method, self.path, self.query, self.headers])
        object.__setattr__(self, "key", hashlib.sha256(head + b"\n" + self.body_json).hexdigest())

    @property
    def body(self) -> Any:
        return orjson.loads(self.body_json)

    def describe(self) -> str:
        query = "&".join(f"{name}={value}" for name, value in self.query)
        return f"{self.method} {self.path}{'?' + query if query else ''}"


def canonical_request(
    *,
    route: str,
    method: str,
    path: str,
    query: Iterable[tuple[str, str]],
    headers: Mapping[str, str],
    body: Any,
    key_headers: Iterable[str] = (),
    ignore_body: Iterable[str] = (),
    ignore_query: Iterable[str] = (),
    round_floats: int | None = None,
) -> CanonicalRequest:
    method = method.upper()
    if method in METHODS_WITHOUT_BODY or body == {}:
        # Other recorders store {} for a GET's body; an empty object and no body are one thing.
        body = None
    for json_path in ignore_body:
        body = drop_path(body, json_path)
    if round_floats is not None:
        body = _round_floats(body, round_floats)
    chosen: tuple[tuple[str, str], ...] = ()
    if key_headers:  # most routes key on no header: no copy of them all
        lowered = {name.lower(): value for name, value in headers.items()}
        chosen = tuple((name, lowered[name]) for name in key_headers if name in lowered)
    return CanonicalRequest(
        route=route,
        method=method,
        path=path,
        query=tuple(sorted(public_query(query, ignore_query))),
        headers=chosen,
        body_json=canonical_json(body),
    )


def _round_floats(value: Any, digits: int) -> Any:
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {key: _round_floats(item, digits) for key, item in value.items()}
    if isinstance(value, list):
        return [_round_floats(item, digits) for item in value]
    return value


def drop_path(value: Any, json_path: str) -> Any:
    """A copy of value without the field at json_path ("metadata", "messages[*].name")."""
    steps = _parse_path(json_path)
    return _drop(value, steps) if steps else value


def _parse_path(json_path: str) -> list[str | int]:
    steps: list[str | int] = []
    for part in json_path.replace("[", ".[").split("."):
        if not part:
            continue
        if part.startswith("[") and part.endswith("]"):
            inner = part[1:-1]
            steps.append(-1 if inner == "*" else int(inner))
        else:
            steps.append(part)
    return steps


def _drop(value: Any, steps: list[str | int]) -> Any:
    head, rest = steps[0], steps[1:]
    if isinstance(head, str) and isinstance(value, dict):
        if head not in value:
            return value
        copy = dict(value)
        if rest:
            copy[head] = _drop(value[head], rest)
        else:
            del copy[head]
        return copy
    if isinstance(head, int) and isinstance(value, list):
        chosen = set(range(len(value))) if head == -1 else {head} if 0 <= head < len(value) else set()
        if not rest:
            return [item for index, item in enumerate(value) if index not in chosen]
        return [_drop(item, rest) if index in chosen else item for index, item in enumerate(value)]
    return value


def json_diff(expected: Any, actual: Any, path: str = "", limit: int = 20) -> list[str]:
    """Field-by-field differences with JSON paths, e.g. "temperature: 0.2 != 0.7"."""
    out: list[str] = []
    _diff(expected, actual, path, out, limit)
    return out


def _show(value: Any) -> str:
    text = orjson.dumps(value).decode()
    return text if len(text) <= 80 else text[:77] + "..."


def _diff(a: Any, b: Any, path: str, out: list[str], limit: int) -> None:
    if len(out) >= limit:
        return
    where = path or "body"
    if isinstance(a, dict) and isinstance(b, dict):
        for name in sorted(set(a) | set(b)):
            child = f"{path}.{name}" if path else name
            if name not in b:
                out.append(f"{child}: missing in this request (recorded {_show(a[name])})")
            elif name not in a:
                out.append(f"{child}: not in the recording (this request has {_show(b[name])})")
            else:
                _diff(a[name], b[name], child, out, limit)
            if len(out) >= limit:
                return
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            out.append(f"{where}: {len(b)} items != {len(a)} recorded")
        for index, (left, right) in enumerate(zip(a, b)):
            _diff(left, right, f"{path}[{index}]", out, limit)
    elif a != b or type(a) is not type(b):
        out.append(f"{where}: {_show(b)} != {_show(a)} recorded")


def request_differences(recorded: CanonicalRequest, wanted: CanonicalRequest) -> list[str]:
    """What keeps `wanted` from matching `recorded`, field by field."""
    differences = []
    if recorded.route != wanted.route:
        differences.append(f"route: {wanted.route} != {recorded.route} recorded")
    if (recorded.method, recorded.path) != (wanted.method, wanted.path):
        differences.append(f"request: {wanted.method} {wanted.path} != {recorded.method} {recorded.path} recorded")
    if recorded.query != wanted.query:
        differences.append(f"query: {dict(wanted.query)} != {dict(recorded.query)} recorded")
    if recorded.headers != wanted.headers:
        differences.append(f"headers: {dict(wanted.headers)} != {dict(recorded.headers)} recorded")
    differences += json_diff(recorded.body, wanted.body)
    return differences or ["nothing (same key)"]
