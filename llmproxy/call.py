"""A call: one incoming request after routing, what can come of it, and llmproxy's own errors.

Routing, body parsing and the key are done once, in the server, before any mode sees a call.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from aiohttp import web

from llmproxy.canonical import CanonicalRequest
from llmproxy.providers import get_provider
from llmproxy.routing import Route
from llmproxy.store.secrets import request_credentials


@dataclass(slots=True)
class Call:
    """One incoming request after routing."""

    route: Route
    method: str
    path: str  # as the upstream sees it
    query_string: str
    query: list[tuple[str, str]]
    headers: dict[str, str]  # lower-cased names
    body: bytes
    body_value: Any  # parsed JSON, RawBody, or None
    canonical: CanonicalRequest
    # The client's headers as received (names as sent, repeats kept): what goes upstream.
    raw_headers: list[tuple[str, str]] = field(default_factory=list)
    # Whose recordings answer it: a pytest node id, an x-llmproxy-scope header, None for shared.
    scope: str | None = None
    _credentials: dict[str, str] | None = field(default=None, repr=False)

    def credentials(self) -> dict[str, str]:
        """Every credential value the request carried -> where (listed once per call: the
        placeholder check and the secret scan both need them)."""
        if self._credentials is None:
            self._credentials = request_credentials(self.headers, self.query)
        return self._credentials

    @property
    def model(self) -> str | None:
        return self.route.provider.model_of(self.path, self.body_value)

    @property
    def scoped_key(self) -> str:
        """The request key within its scope: what repeats are counted and flights shared by."""
        return key_in_scope(self.scope, self.canonical.key)


def key_in_scope(scope: str | None, key: str) -> str:
    if scope is None:
        return key
    return hashlib.sha256(f"{scope}\0{key}".encode()).hexdigest()


class Result(StrEnum):
    """How one call was answered (each call counts once, in `Outcome.count`)."""

    HIT = "hit"  # replayed from a recording
    MISS = "miss"  # no recording: answered with llmproxy's 404
    FORWARDED = "forwarded"  # went upstream and was passed through
    SHARED = "shared"  # an identical call was in flight: fed from it instead of going upstream
    ERROR = "error"  # the upstream failed or broke off, or a recording could not be served


class NotRecorded(StrEnum):
    """Why an exchange that should have been recorded was not written."""

    CLIENT_LEFT = "client_left"  # client_disconnect = "discard"
    UPSTREAM_FAILED = "upstream_failed"  # no response, or a response cut short
    UPSTREAM_STATUS = "upstream_status"  # 429/5xx without record_errors
    TRUNCATED = "truncated"  # a stream without its end marker
    SECRET = "secret"  # the scanner found a credential
    OVER_LIMIT = "over_limit"  # the response outgrew max_recording_mb
    WRITE_FAILED = "write_failed"


# A missed request's body is kept in the report (for the browser's diff) up to this size.
MISS_BODY_LIMIT = 256 * 1024


@dataclass(slots=True)
class Outcome:
    """The counts for the exit summary and the usage report, kept in this one place."""

    hits: int = 0
    misses: int = 0  # every miss, recorded afterwards (record --missing) or not
    forwarded: int = 0
    errors: int = 0
    refused: int = 0  # recordings the secret scanner stopped
    truncated: int = 0  # answers cut short, so not recorded
    shared: int = 0  # identical calls fed from one in flight instead of going upstream
    not_recorded: int = 0  # exchanges meant for the recordings that were not written
    not_recorded_by: dict[str, int] = field(default_factory=dict)
    # Every miss; a miss that record --missing then recorded carries "recorded": its file.
    missed: list[dict[str, Any]] = field(default_factory=list)
    # The writer thread counts too.
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, result: Result) -> None:
        with self._lock:
            if result is Result.HIT:
                self.hits += 1
            elif result is Result.FORWARDED:
                self.forwarded += 1
            elif result is Result.SHARED:
                self.shared += 1
            elif result is Result.ERROR:
                self.errors += 1

    def note_miss(self, call: Call) -> dict[str, Any]:
        """Count a miss; the entry returned is marked "recorded" if the call gets recorded."""
        entry = {
            "method": call.method,
            "path": call.path,
            "route": call.route.name,
            "model": call.model,
            "key": call.canonical.key,
            "scope": call.scope,
            # What the browser compares with the nearest recording (the report drops secrets).
            "query": [list(pair) for pair in call.canonical.query],
            "headers": dict(call.canonical.headers),
            "body": call.canonical.body if len(call.canonical.body_json) <= MISS_BODY_LIMIT else None,
        }
        with self._lock:
            self.misses += 1
            self.missed.append(entry)
        return entry

    def note_not_recorded(self, reason: NotRecorded) -> None:
        with self._lock:
            self.not_recorded += 1
            self.not_recorded_by[reason.value] = self.not_recorded_by.get(reason.value, 0) + 1
            if reason is NotRecorded.SECRET:
                self.refused += 1
            elif reason is NotRecorded.TRUNCATED:
                self.truncated += 1
            elif reason is NotRecorded.WRITE_FAILED:
                self.errors += 1

    @property
    def unrecorded_misses(self) -> list[dict[str, Any]]:
        return [miss for miss in self.missed if "recorded" not in miss]

    @property
    def recorded_misses(self) -> list[dict[str, Any]]:
        return [miss for miss in self.missed if "recorded" in miss]


def error_response(
    route: Route | None, status: int, message: str, code: str, headers: dict[str, str] | None = None
) -> web.Response:
    """An error from llmproxy itself, in the provider's own error shape so SDKs surface it."""
    provider = route.provider if route else get_provider("openai")
    all_headers = {"x-llmproxy-error": code, "x-should-retry": "false"}
    all_headers.update(headers or {})
    return web.Response(
        status=status,
        body=provider.error_body(status, message, code),
        content_type="application/json",
        headers=all_headers,
    )
