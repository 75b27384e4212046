"""Looking at recordings: `explain` a request, `ls` the directory, `show` one as a conversation."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from llmproxy.canonical import request_differences
from llmproxy.providers import Provider
from llmproxy.routing import Router, credential_mismatch
from llmproxy.store.document import ProviderResolver, Recording, from_document
from llmproxy.store.index import RecordingIndex, canonical_for_route
from llmproxy.wire.framing import data_of

_AGE = re.compile(r"^(\d+)([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_age(text: str) -> timedelta:
    """'30d', '12h', '2w' -> timedelta."""
    match = _AGE.match(text.strip())
    if not match:
        raise ValueError(f"age must look like 30d, 12h or 2w, not {text!r}")
    return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})


REQUEST_SHAPE = '{"method": "POST", "path": "/v1/chat/completions", "headers": {...}, "body": {...}}'


def explain(request_doc: Any, router: Router, index: RecordingIndex) -> str:
    """What llmproxy would do with a request: its route, rules, key, hit and nearest neighbours."""
    return explanation(request_doc, router, index)[0]


def _request_parts(request_doc: dict[str, Any]) -> tuple[str, str, list[tuple[str, str]], dict[str, str], Any]:
    """method, path, query, headers, body of a request file; ValueError (one line) if it is not one."""
    method, url = request_doc.get("method"), request_doc.get("path") or request_doc.get("url")
    if not isinstance(method, str) or not method or not isinstance(url, str) or not url:
        raise ValueError(f'a request file needs "method" and "path" (or "url") as text, like {REQUEST_SHAPE}')
    headers = request_doc.get("headers") or {}
    if not isinstance(headers, dict):
        raise ValueError('"headers" must be an object of header names to values')
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    return (
        method.upper(),
        parts.path,
        query,
        {str(k).lower(): str(v) for k, v in headers.items()},
        request_doc.get("body"),
    )


def explanation(request_doc: Any, router: Router, index: RecordingIndex) -> tuple[str, bool]:
    """`explain`'s text, and whether replay would answer the request from a recording."""
    if not isinstance(request_doc, dict):
        raise ValueError(f"the request file must hold a JSON object: a recording, or {REQUEST_SHAPE}")
    if "request" in request_doc:
        recording = from_document(request_doc, index.provider_for)
        method, path, query = recording.request.method, recording.request.path, recording.request.query
        headers, body = recording.request.headers, recording.request.body
    else:
        method, path, query, headers, body = _request_parts(request_doc)
    match = router.resolve(method, path, headers)
    if match is None:
        return (
            f"request     {method} {path}\nroute       none: no route serves this path (llmproxy answers 404 "
            f"no_route); the prefixed base URLs are {router.describe_base_urls()}"
        ), False
    route = match.route
    mismatch = credential_mismatch(route.provider, headers, urlencode(query))
    if mismatch is not None:
        return (
            f"request     {method} {path}\nroute       {route.name}, refused (400 credential_mismatch): {mismatch}",
            False,
        )
    canonical = canonical_for_route(route, method, match.path, query, headers, body)
    rules = [
        f"key headers: {', '.join(route.key_headers) or '-'}",
        f"ignored body fields: {', '.join(route.ignore_body) or '-'}",
        f"ignored query: {', '.join(route.ignore_query) or '-'} (credentials always)",
        f"float rounding: {route.round_floats if route.round_floats is not None else '-'}",
    ]
    lines = [
        f"request     {canonical.describe()}",
        f"route       {route.name} (provider {route.provider.name}, upstream {route.upstream or '-'})",
        f"rules       {'; '.join(rules)}",
        f"key         {canonical.key}",
    ]
    entries = index.in_any_scope(canonical.key)
    if entries:
        numbers: dict[str | None, int] = {}
        for entry in entries:
            number = numbers[entry.scope] = numbers.get(entry.scope, 0) + 1
            where = f" in scope {entry.scope}" if entry.scope is not None else ""
            lines.append(
                f"hit         {entry.source} (replayed {'first' if number == 1 else f'as repeat {number}'}{where})"
            )
    else:
        lines.append("hit         none: replay would answer 404 recording_not_found")
        for number, entry in enumerate(index.nearest(canonical, 3), 1):
            differences = "; ".join(request_differences(entry.canonical, canonical))
            lines.append(f"nearest {number}   {entry.source}\n            differs in: {differences}")
    return "\n".join(lines), bool(entries)


@dataclass(slots=True)
class Listing:
    path: Path
    route: str
    endpoint: str
    model: str
    recorded_at: datetime | None
    size: int

    def age(self, now: datetime) -> str:
        if self.recorded_at is None:
            return "unknown"
        seconds = (now - self.recorded_at).total_seconds()
        for unit, span in (("d", 86400), ("h", 3600), ("m", 60)):
            if seconds >= span:
                return f"{int(seconds // span)}{unit}"
        return f"{int(seconds)}s"


def recorded_at(recording: Recording) -> datetime | None:
    stamp = (recording.provenance or {}).get("recorded_at")
    try:
        return datetime.fromisoformat(stamp) if isinstance(stamp, str) else None
    except ValueError:
        return None


def listings(
    index: RecordingIndex,
    *,
    route: str | None = None,
    model: str | None = None,
    endpoint: str | None = None,
    older_than: timedelta | None = None,
    now: datetime | None = None,
) -> list[Listing]:
    """Recordings with their facts; `older_than` keeps files recorded before now - age (and
    files of unknown age, which cannot be shown to be fresh)."""
    now = now or datetime.now(UTC)
    found = []
    for entry in index.entries():
        recording = entry.recording(index.provider_for)
        request = recording.request
        item = Listing(
            path=entry.source or Path("-"),
            route=entry.route.name,
            endpoint=request.path,
            model=request.model or "-",
            recorded_at=recorded_at(recording),
            size=entry.source.stat().st_size if entry.source else 0,
        )
        if route and item.route != route:
            continue
        if model and model not in item.model:
            continue
        if endpoint and endpoint not in item.endpoint:
            continue
        if older_than is not None and item.recorded_at is not None and now - item.recorded_at < older_than:
            continue
        found.append(item)
    return sorted(found, key=lambda item: str(item.path))


def show(path: Path, document: Any, resolve_provider: ProviderResolver) -> str:
    recording = from_document(document, resolve_provider)
    request, response = recording.request, recording.response
    provenance = recording.provenance or {}
    streamed = f"  (streamed, {len(response.body)} chunks)" if response.is_streaming else ""
    lines = [
        f"file       {path}",
        f"request    {request.method} {request.url or request.path}",
        f"model      {request.model or '-'} (answered by {provenance.get('response_model') or '-'})",
        f"recorded   {provenance.get('recorded_at', 'unknown')} by {provenance.get('tool', 'another recorder')} "
        f"{provenance.get('version', '')}".rstrip(),
        f"status     {response.status}{streamed}",
        "",
    ]
    # A file no route serves still shows, read as the common (OpenAI-like) shapes.
    provider = resolve_provider(request.method, request.path) or Provider()
    for role, text in provider.request_turns(request.body):
        lines.append(f"[{role}] {text}")
    values = [data_of(item) for item in response.body] if isinstance(response.body, list) else [data_of(response.body)]
    answer = provider.response_text(values)
    lines.append(f"[assistant] {answer}" if answer else "[response] " + str(values[0] if values else "")[:500])
    return "\n".join(lines)
