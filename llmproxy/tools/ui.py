"""The recordings browser: `llmproxy ui`, or `/_llmproxy/` on a running proxy with `ui = true`.

One self-contained page (package data, no CDN) and a read-only JSON API:

    GET  api/recordings   list: filters, full-text search, sort, pages; totals and facets
    GET  api/recording    one recording: conversation, answer, timeline, params, headers, raw
    GET  api/diff         two recordings: request fields by JSON path, answer text
    GET  api/miss         a report's missed request against its nearest recording
    GET  api/costs        tokens and cost summed per model, route or test
    GET  api/coverage     with a usage report: used, unused and missed recordings

Recordings are addressed by id (their path relative to the directory) looked up in the
catalog built by walking the directory: no request ever names a file, symlinks are skipped
when walking and refused when reading, so nothing outside the directory can be read.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import orjson
import structlog
from aiohttp import web

from llmproxy.canonical import CanonicalRequest, canonical_json, request_differences
from llmproxy.intake import token_matches
from llmproxy.routing import Router
from llmproxy.store.directory import NOT_RECORDINGS, StoreError
from llmproxy.store.document import RecordingError, from_document
from llmproxy.store.index import Comparable, RecordingIndex, canonical_for_route
from llmproxy.tools.conversation import answer_bubbles, answer_text, bubble, request_bubbles
from llmproxy.tools.explain import parse_age, recorded_at
from llmproxy.tools.report import ReportError, read_report
from llmproxy.usage import Cost, TokenUsage, price, warm_prices
from llmproxy.wire.framing import data_of

log = structlog.get_logger("llmproxy.ui")

TOKEN_HEADER = "x-llmproxy-token"
DEFAULT_UI_PORT = 8766
MAX_PAGE = 500
FIRST_PAGE = 100
MAX_RAW_BYTES = 4 * 1024 * 1024
MAX_SEARCH_CHARS = 64 * 1024
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})
# Request fields shown as the conversation, not as parameters.
CONVERSATION_FIELDS = frozenset(
    {"messages", "contents", "input", "prompt", "system", "instructions", "systemInstruction", "system_instruction"}
)
SORTABLE = frozenset(
    {
        "path",
        "route",
        "endpoint",
        "model",
        "scope",
        "status",
        "streamed",
        "chunks",
        "tokens_in",
        "tokens_out",
        "ttfc_ms",
        "total_ms",
        "recorded_at",
        "size",
        "cost_usd",
        "used",
    }
)
Group = Literal["model", "route", "scope"]
Use = Literal["used", "unused", "unknown"]
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class NotFound(LookupError):
    """An id that is not in the catalog (whatever it looks like: it never reaches the disk)."""


@dataclass(slots=True)
class Row:
    """One recording's facts for the list; `search` and `canonical` stay on the server."""

    id: str
    path: str
    route: str = "-"
    provider: str = "-"
    method: str = ""
    endpoint: str = ""
    model: str = ""
    scope: str = ""
    status: int = 0
    streamed: bool = False
    chunks: int = 0
    tokens_in: int | None = None
    tokens_out: int | None = None
    ttfc_ms: float | None = None
    total_ms: float | None = None
    recorded_at: str | None = None
    recorded_ts: float | None = None
    size: int = 0
    cost_usd: float | None = None
    cost_note: str = ""
    error: bool = False
    problem: str = ""
    used: Use = "unknown"
    key: str = ""
    search: str = field(default="", repr=False)
    canonical: CanonicalRequest | None = field(default=None, repr=False)
    usage: TokenUsage | None = field(default=None, repr=False)

    def public(self, now: float) -> dict[str, Any]:
        return {
            "id": self.id,
            "path": self.path,
            "route": self.route,
            "provider": self.provider,
            "method": self.method,
            "endpoint": self.endpoint,
            "model": self.model,
            "scope": self.scope,
            "status": self.status,
            "streamed": self.streamed,
            "chunks": self.chunks,
            "tokens_in": self.tokens_in,
            "tokens_out": self.tokens_out,
            "ttfc_ms": self.ttfc_ms,
            "total_ms": self.total_ms,
            "recorded_at": self.recorded_at,
            "age_s": None if self.recorded_ts is None else max(now - self.recorded_ts, 0),
            "size": self.size,
            "cost_usd": self.cost_usd,
            "cost_note": self.cost_note,
            "error": self.error,
            "problem": self.problem,
            "used": self.used,
        }


def scope_of(document: dict[str, Any]) -> str:
    """The test a recording belongs to, where the recorder kept one (several layouts exist)."""
    request = document.get("request") if isinstance(document.get("request"), dict) else {}
    provenance = document.get("provenance") if isinstance(document.get("provenance"), dict) else {}
    for value in (
        request.get("scope"),
        provenance.get("scope"),
        provenance.get("test"),
        provenance.get("test_id"),
        document.get("test_id"),
    ):
        if isinstance(value, str) and value:
            return value
    return ""


def response_values(body: Any, streamed: bool) -> list[Any]:
    """The answer's JSON values: a stream's chunks, or the one body."""
    if streamed and isinstance(body, list):
        return [data_of(item) for item in body]
    if isinstance(body, list):  # a list stored as its items (OpenAI's model list)
        return [{"object": "list", "data": [data_of(item) for item in body]}]
    return [data_of(body)]


def _is_error(status: int, values: list[Any], truncated: bool) -> bool:
    if status >= 400 or truncated:
        return True
    last = values[-1] if values else None
    return isinstance(last, dict) and (last.get("type") == "error" or isinstance(last.get("error"), dict | str))


@lru_cache(maxsize=4096)
def _cached_price(usage: TokenUsage, model: str, provider: str, when: datetime | None) -> Cost:
    # Test suites repeat the same calls: one lookup per distinct (usage, model, minute).
    return price(usage, model, provider, when)


def cost_of(usage: TokenUsage | None, model: str, provider: str, when: datetime | None) -> Cost:
    if usage is None:
        return Cost(None, "no usage in the answer")
    # Prices change by date and, for some providers, by time of day: to the minute is exact enough.
    return _cached_price(usage, model, provider, when.replace(second=0, microsecond=0) if when else None)


def read_inside(root: Path, path: Path) -> bytes:
    """A file's bytes, only if it is a regular file inside root reached without a symlink."""
    base = root.resolve()
    if path.is_symlink() or not path.resolve().is_relative_to(base):
        raise StoreError("outside the recordings directory")
    relative = path.resolve().relative_to(base)
    current = base
    for part in relative.parts[:-1]:  # no symlinked directory on the way either
        current = current / part
        if current.is_symlink():
            raise StoreError("outside the recordings directory")
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    try:
        with os.fdopen(fd, "rb") as handle:
            fd = -1
            return handle.read(MAX_RAW_BYTES + 1)
    finally:
        if fd != -1:
            os.close(fd)


def walk(base: Path) -> list[str]:
    """Recording files under base (relative, sorted), as the store lists them, reached without
    following any symlink: symlinked files and directories are skipped and logged."""
    found: list[str] = []
    pending = [""]
    while pending:
        prefix = pending.pop()
        try:
            entries = list(os.scandir(base / prefix if prefix else base))
        except OSError:
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            relative = f"{prefix}/{entry.name}" if prefix else entry.name
            if entry.is_symlink():
                log.warning("symlink skipped: the browser reads only files inside the directory", path=relative)
            elif entry.is_dir(follow_symlinks=False):
                pending.append(relative)
            elif entry.is_file(follow_symlinks=False) and not entry.name.endswith(NOT_RECORDINGS):
                found.append(relative)
    found.sort()
    return found


def _read_no_follow(path: Path) -> bytes | OSError:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        return exc
    with os.fdopen(fd, "rb") as handle:
        return handle.read()


class Catalog:
    """Every recording under a directory, with the facts the list shows; built in a thread."""

    def __init__(self, root: Path, router: Router, report_path: Path | None = None) -> None:
        self.root = Path(root)
        self.router = router
        self.index = RecordingIndex(router)
        self.report_path = report_path
        self.report: dict[str, Any] | None = None
        self.report_problem = ""
        self.rows: dict[str, Row] = {}
        self.loaded = threading.Event()
        self.load_seconds = 0.0
        self._lock = threading.Lock()

    def load(self) -> None:
        started = time.perf_counter()
        self.loaded.clear()
        rows: dict[str, Row] = {}
        with self._lock:
            self.rows = rows
        if self.report_path is not None:
            try:
                self.report = read_report(self.report_path)
            except ReportError as exc:
                self.report_problem = str(exc)
        unused = self._unused_paths()
        base = self.root.resolve()
        for relative in walk(base):
            row = self._row(relative, _read_no_follow(base / relative))
            if unused is not None and not row.problem:
                row.used = "unused" if relative in unused else "used"
            rows[row.id] = row  # a dict insert is atomic: readers see a consistent prefix
        self.load_seconds = time.perf_counter() - started
        self.loaded.set()
        log.info("recordings browsed", directory=str(self.root), recordings=len(rows), seconds=self.load_seconds)

    def _unused_paths(self) -> set[str] | None:
        """Ids of the files the report says were unused: paths are taken relative to the
        directory the run used, so a browser started elsewhere (or on a checkout) agrees."""
        if self.report is None or self.report.get("unused") is None:
            return None
        run_root = Path(str(self.report.get("recordings") or self.root))
        base = self.root.resolve()
        found = set()
        for name in self.report["unused"]:
            path = Path(name)
            for root in (run_root, run_root.resolve(), base):
                try:
                    found.add(path.relative_to(root).as_posix())
                    break
                except ValueError:
                    continue
            else:
                with contextlib.suppress(ValueError):
                    found.add(path.resolve().relative_to(base).as_posix())
        return found

    def _row(self, relative: str, data: bytes | OSError) -> Row:
        row = Row(id=relative, path=relative)
        try:
            return self._facts(row, data)
        except Exception as exc:  # one odd file must not break the whole list
            log.warning("recording cannot be shown", path=relative, error=repr(exc))
            row.problem, row.error = f"cannot be shown: {exc!r}"[:500], True
            return row

    def _facts(self, row: Row, data: bytes | OSError) -> Row:
        relative = row.id
        try:
            if isinstance(data, OSError):
                raise StoreError(f"cannot read: {data.strerror}")
            row.size = len(data)
            try:
                document = orjson.loads(data)
            except orjson.JSONDecodeError as exc:
                raise StoreError(f"not valid JSON: {exc}") from None
            recording = from_document(document, self.index.provider_for)
            route = self.index.route_of(recording)
        except (StoreError, RecordingError, orjson.JSONDecodeError, ValueError, TypeError, OSError) as exc:
            row.problem, row.error = str(exc) or type(exc).__name__, True
            return row
        request, response = recording.request, recording.response
        row.route, row.provider = route.name, route.provider.name
        row.method, row.endpoint = request.method, request.path
        provenance = recording.provenance or {}
        answered = provenance.get("response_model")
        row.model = request.model or (answered if isinstance(answered, str) else "") or ""
        row.scope = scope_of(document)
        row.status = response.status
        row.streamed = response.is_streaming
        values = response_values(response.body, response.is_streaming)
        row.chunks = len(values) if response.is_streaming else 0
        timing = response.timing or {}
        chunk_ms = [x for x in timing.get("chunk_ms") or [] if isinstance(x, int | float)]
        if chunk_ms:
            row.ttfc_ms, row.total_ms = float(chunk_ms[0]), float(chunk_ms[-1])
        elif isinstance(timing.get("headers_ms"), int | float):
            row.ttfc_ms = row.total_ms = float(timing["headers_ms"])
        when = recorded_at(recording)
        if when is not None:
            when = when if when.tzinfo else when.replace(tzinfo=UTC)
            row.recorded_at, row.recorded_ts = when.isoformat(), when.timestamp()
        row.error = _is_error(response.status, values, response.truncated)
        try:
            row.usage = route.provider.usage(request.path, values)
        except (AttributeError, TypeError, ValueError):
            row.usage = None  # a malformed usage block is "no usage", not a broken list
        if row.usage is not None:
            row.tokens_in, row.tokens_out = row.usage.input_tokens, row.usage.output_tokens
        priced_model = answered if isinstance(answered, str) and answered else row.model
        cost = cost_of(row.usage, priced_model, row.provider, when)
        row.cost_usd = float(cost.usd) if cost.usd is not None else None
        row.cost_note = cost.reason
        row.canonical = canonical_for_route(
            route, request.method, request.path, request.query, request.headers, request.body
        )
        row.key = row.canonical.key
        prompt = " ".join(b["text"] for b in request_bubbles(request.body))
        answer = answer_text(values)
        row.search = f"{relative} {row.model} {row.endpoint} {row.scope} {prompt} {answer}"[:MAX_SEARCH_CHARS].lower()
        return row

    # -- queries -----------------------------------------------------------------------------

    def snapshot(self) -> list[Row]:
        with self._lock:
            return list(self.rows.values())

    def get(self, recording_id: str) -> Row:
        row = self.rows.get(recording_id)
        if row is None:
            raise NotFound(recording_id)
        return row

    def query(self, params: dict[str, str]) -> dict[str, Any]:
        rows = self.snapshot()
        now = time.time()
        routes = sorted({r.route for r in rows})
        models = sorted({r.model for r in rows if r.model})
        endpoints = sorted({r.endpoint for r in rows if r.endpoint})
        scopes = sorted({r.scope for r in rows if r.scope})
        chosen = [r for r in rows if _matches(r, params, now)]
        sort = params.get("sort") or "path"
        if sort not in SORTABLE:
            raise ValueError(f"cannot sort by {sort!r} (one of {', '.join(sorted(SORTABLE))})")
        descending = params.get("order") == "desc"
        present = [r for r in chosen if getattr(r, sort) is not None]
        absent = [r for r in chosen if getattr(r, sort) is None]
        present.sort(key=lambda r: (getattr(r, sort), r.path), reverse=descending)
        ordered = present + absent  # rows without the value (no usage, no timing) last either way
        offset = _int(params.get("offset"), 0, 0, 10**9)
        limit = _int(params.get("limit"), 100, 1, MAX_PAGE)
        return {
            "loading": not self.loaded.is_set(),
            "loaded": len(rows),
            "total": len(ordered),
            "offset": offset,
            "items": [r.public(now) for r in ordered[offset : offset + limit]],
            "facets": {"routes": routes, "models": models, "endpoints": endpoints, "scopes": scopes},
            "totals": _totals(ordered),
            "report": self._report_summary(),
        }

    def _report_summary(self) -> dict[str, Any] | None:
        if self.report is None:
            return {"problem": self.report_problem} if self.report_problem else None
        return {
            "mode": self.report.get("mode"),
            "finished_at": self.report.get("finished_at"),
            "hits": self.report.get("hits"),
            "misses": len(self.report.get("misses") or []),
            "saved": self.report.get("saved"),
        }

    def detail(self, recording_id: str) -> dict[str, Any]:
        row = self.get(recording_id)
        data = read_inside(self.root, self.root / row.path)
        raw_text = data[:MAX_RAW_BYTES].decode("utf-8", errors="replace")
        result: dict[str, Any] = {
            "row": row.public(time.time()),
            "raw": raw_text,
            "raw_truncated": len(data) > MAX_RAW_BYTES,
        }
        if row.problem:
            return result
        document = orjson.loads(data)
        recording = from_document(document, self.index.provider_for)
        request, response = recording.request, recording.response
        values = response_values(response.body, response.is_streaming)
        body = request.body if isinstance(request.body, dict) else {}
        timing = response.timing or {}
        result.update(
            {
                "request": {
                    "method": request.method,
                    "url": request.url,
                    "endpoint": request.path,
                    "headers": request.headers,
                    "sequence": request.sequence,
                },
                "conversation": _shown(request_bubbles, request.body),
                "answer": _shown(answer_bubbles, values),
                "params": {k: v for k, v in body.items() if k not in CONVERSATION_FIELDS},
                "response_headers": response.headers,
                "framing": response.framing,
                "timing": {
                    "headers_ms": timing.get("headers_ms"),
                    "chunk_ms": [x for x in timing.get("chunk_ms") or [] if isinstance(x, int | float)],
                },
                "provenance": recording.provenance or {"tool": "another recorder"},
                "usage": row.usage.as_dict() if row.usage else None,
                "cost": {"usd": row.cost_usd, "note": row.cost_note},
            }
        )
        return result

    def _answer(self, row: Row) -> str:
        if row.problem:
            return ""
        document = orjson.loads(read_inside(self.root, self.root / row.path))
        response = from_document(document, self.index.provider_for).response
        return answer_text(response_values(response.body, response.is_streaming))

    def diff(self, first: str, second: str) -> dict[str, Any]:
        a, b = self.get(first), self.get(second)
        if a.canonical is None or b.canonical is None:
            raise ValueError("an unreadable recording cannot be compared")
        answer_a, answer_b = self._answer(a), self._answer(b)
        return {
            "a": a.public(time.time()),
            "b": b.public(time.time()),
            # Phrased as the miss error phrases it: b is "this request", a is "recorded".
            "request": request_differences(a.canonical, b.canonical),
            # The requests as keyed (ignored fields left out), for reading side by side.
            "request_a": {"method": a.method, "path": a.endpoint, "body": a.canonical.body},
            "request_b": {"method": b.method, "path": b.endpoint, "body": b.canonical.body},
            "answer_a": answer_a,
            "answer_b": answer_b,
            "answer_diff": _line_diff(answer_a, answer_b),
        }

    def misses(self) -> list[dict[str, Any]]:
        return list((self.report or {}).get("misses") or [])

    def miss(self, number: int) -> dict[str, Any]:
        misses = self.misses()
        if not 0 <= number < len(misses):
            raise NotFound(str(number))
        missed = misses[number]
        if "body" not in missed:
            raise ValueError("this report does not keep missed requests' bodies (written by an older llmproxy)")
        wanted = CanonicalRequest(
            route=str(missed.get("route")),
            method=str(missed.get("method")),
            path=str(missed.get("path")),
            query=tuple(tuple(pair) for pair in missed.get("query") or ()),
            headers=tuple((missed.get("headers") or {}).items()),  # in the route's key_headers order
            body_json=canonical_json(missed.get("body")),
        )
        candidates = [r for r in self.snapshot() if r.canonical is not None]
        if not candidates:
            return {"miss": missed, "nearest": None, "differences": []}
        # The replay miss message's own measure, body tokens split once for all candidates.
        comparable = Comparable(wanted)
        nearest = max(candidates, key=lambda r: comparable.similarity(r.canonical))  # type: ignore[arg-type]
        assert nearest.canonical is not None
        return {
            "miss": missed,
            "nearest": nearest.public(time.time()),
            "differences": request_differences(nearest.canonical, wanted),
        }

    def costs(self, group: Group) -> dict[str, Any]:
        groups: dict[str, list[Row]] = {}
        for row in self.snapshot():
            if not row.problem:
                groups.setdefault(getattr(row, group) or "-", []).append(row)
        items = [{"group": name, **_totals(rows)} for name, rows in groups.items()]
        items.sort(key=lambda item: (-(item["cost_usd"] or 0), item["group"]))
        return {"by": group, "items": items, "total": _totals([r for r in self.snapshot() if not r.problem])}

    def coverage(self) -> dict[str, Any]:
        rows = self.snapshot()
        return {
            "report": self._report_summary(),
            "used": [r.id for r in rows if r.used == "used"],
            "unused": [r.id for r in rows if r.used == "unused"],
            "missed": [
                {"n": n, **{k: miss.get(k) for k in ("method", "path", "route", "model", "key")}}
                for n, miss in enumerate(self.misses())
            ],
        }


def _shown(extract: Any, value: Any) -> list[Any]:
    """Bubbles, or one saying why a shape nobody foresaw cannot be shown (the raw file still is)."""
    try:
        return extract(value)
    except Exception as exc:  # an unforeseen shape must not hide the rest of the view
        return [bubble("error", "other", f"cannot show this part: {exc!r}")]


def _int(text: str | None, default: int, low: int, high: int) -> int:
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"not a whole number: {text!r}") from None
    return min(max(value, low), high)


def _matches(row: Row, params: dict[str, str], now: float) -> bool:
    if params.get("route") and row.route != params["route"]:
        return False
    for name in ("model", "endpoint", "scope"):
        wanted = params.get(name)
        if wanted and wanted.lower() not in getattr(row, name).lower():
            return False
    status = params.get("status")
    if status == "error" and not row.error:
        return False
    if status == "ok" and row.error:
        return False
    streamed = params.get("streamed")
    if streamed in ("yes", "no") and row.streamed != (streamed == "yes"):
        return False
    if params.get("used") in ("used", "unused") and row.used != params["used"]:
        return False
    for name, older in (("older_than", True), ("newer_than", False)):
        if params.get(name):
            seconds = parse_age(params[name]).total_seconds()
            if row.recorded_ts is None:
                if not older:
                    return False  # unknown age cannot be shown to be fresh
                continue
            age = now - row.recorded_ts
            if (older and age < seconds) or (not older and age > seconds):
                return False
    terms = (params.get("q") or "").lower().split()
    return all(term in row.search for term in terms)


def _totals(rows: list[Row]) -> dict[str, Any]:
    cost = Decimal(0)
    priced = unknown = 0
    tokens_in = tokens_out = 0
    for row in rows:
        tokens_in += row.tokens_in or 0
        tokens_out += row.tokens_out or 0
        if row.cost_usd is None:
            unknown += 1
        else:
            priced += 1
            cost += Decimal(str(row.cost_usd))
    return {
        "recordings": len(rows),
        "tokens_in": tokens_in,
        "tokens_out": tokens_out,
        "cost_usd": float(cost) if priced else None,
        "priced": priced,
        "unknown_cost": unknown,
    }


def _line_diff(a: str, b: str) -> list[list[str]]:
    """[op, text] pairs: ' ' same, '-' only in a, '+' only in b."""
    out: list[list[str]] = []
    for line in difflib.ndiff(a.splitlines(), b.splitlines()):
        if line[:1] in (" ", "-", "+"):
            out.append([line[:1], line[2:]])
    return out[:2000]


# -- the aiohttp app ---------------------------------------------------------------------------


CATALOG = web.AppKey("catalog", Catalog)


def host_name(host: str) -> str:
    """The name part of a Host header: "127.0.0.1:80" -> "127.0.0.1", "[::1]:80" -> "::1"."""
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def page_html() -> bytes:
    return resources.files("llmproxy.tools").joinpath("ui_static/index.html").read_bytes()


def ui_subapp(
    recordings: Path,
    router: Router,
    *,
    report: Path | None = None,
    token: str | None = None,
    loopback: bool = True,
) -> web.Application:
    """The browser as an aiohttp app: served alone by `llmproxy ui`, or mounted on a proxy under
    /_llmproxy/. `loopback`: the server listens on loopback only, so requests naming another
    Host are refused (a web page elsewhere cannot reach it by DNS rebinding)."""
    catalog = Catalog(recordings, router, report)
    page = page_html()
    loads: list[asyncio.Future[None]] = []  # the load in progress or done; a reload replaces it

    def current_load() -> asyncio.Future[None] | None:
        return loads[-1] if loads else None

    @web.middleware
    async def guard(request: web.Request, handler: Any) -> web.StreamResponse:
        if loopback and host_name(request.host or "") not in LOOPBACK_HOSTS:
            log.warning("browser request refused: Host is not loopback", host=request.host)
            return _error(403, "this llmproxy ui answers only to 127.0.0.1 / localhost")
        is_api = "/api/" in request.path
        if is_api and token is not None and not token_matches(request.headers.get(TOKEN_HEADER), token):
            return _error(401, f"this llmproxy ui needs the {TOKEN_HEADER} header")
        try:
            response = await handler(request)
        except NotFound as exc:
            response = _error(404, f"no recording {str(exc)[:200]!r} in the catalog")
        except OSError as exc:  # deleted or replaced since the catalog was read
            response = _error(404, f"cannot read the recording: {exc.strerror or exc}")
        except (ValueError, StoreError, RecordingError) as exc:
            response = _error(400, str(exc))
        response.headers.update(SECURITY_HEADERS)
        return response

    async def index(_: web.Request) -> web.Response:
        return web.Response(body=page, content_type="text/html", charset="utf-8")

    async def ready() -> None:
        loading = current_load()
        # Up to half a second for a first page of rows; then the page shows what is loaded and
        # asks again until the catalog is whole.
        for _ in range(50):
            if loading is None or loading.done() or len(catalog.rows) >= FIRST_PAGE:
                return
            await asyncio.wait([loading], timeout=0.01)

    async def recordings_list(request: web.Request) -> web.Response:
        await ready()
        return _json(catalog.query(dict(request.query)))

    async def recording(request: web.Request) -> web.Response:
        await catalog_loaded(request.query.get("id", ""))
        return _json(await asyncio.to_thread(catalog.detail, request.query.get("id", "")))

    async def diff(request: web.Request) -> web.Response:
        await catalog_loaded(request.query.get("a", ""), request.query.get("b", ""))
        return _json(await asyncio.to_thread(catalog.diff, request.query.get("a", ""), request.query.get("b", "")))

    async def miss(request: web.Request) -> web.Response:
        await catalog_loaded()
        return _json(await asyncio.to_thread(catalog.miss, _int(request.query.get("n"), 0, 0, 10**9)))

    async def costs(request: web.Request) -> web.Response:
        await catalog_loaded()
        group = request.query.get("by", "model")
        if group not in ("model", "route", "scope"):
            raise ValueError("costs are grouped by model, route or scope")
        return _json(catalog.costs(group))  # type: ignore[arg-type]

    async def coverage(_: web.Request) -> web.Response:
        await catalog_loaded()
        return _json(catalog.coverage())

    async def catalog_loaded(*ids: str) -> None:
        """Wait for the catalog, unless every recording asked for is already in it."""
        loading = current_load()
        if loading is not None and not (ids and all(i in catalog.rows for i in ids)):
            await asyncio.shield(loading)

    async def start_loading(app: web.Application) -> None:
        catalog.loaded.clear()  # here, not in the thread: a reader never sees the old load's "done"
        loads[:] = [asyncio.ensure_future(asyncio.to_thread(catalog.load))]

    async def reload(_: web.Request) -> web.Response:
        # Reads the directory again (recordings added or removed since); never writes.
        load = current_load()
        if load is None or load.done():
            await start_loading(app)
        return _json({"loading": True})

    app = web.Application(middlewares=[guard])
    app[CATALOG] = catalog
    app.router.add_get("/", index)
    app.router.add_get("/api/recordings", recordings_list)
    app.router.add_get("/api/recording", recording)
    app.router.add_get("/api/diff", diff)
    app.router.add_get("/api/miss", miss)
    app.router.add_get("/api/costs", costs)
    app.router.add_get("/api/coverage", coverage)
    app.router.add_get("/api/reload", reload)
    app.on_startup.append(start_loading)
    return app


def _json(value: Any) -> web.Response:
    body = orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS, default=str)
    return web.Response(body=body, content_type="application/json")


def _error(status: int, message: str) -> web.Response:
    response = web.Response(
        status=status, body=orjson.dumps({"error": {"message": message}}), content_type="application/json"
    )
    response.headers.update(SECURITY_HEADERS)
    return response


def _is_loopback(host: str) -> bool:
    from llmproxy.server import _is_loopback as loopback

    return loopback(host)


class UIServer:
    """`llmproxy ui` bound to a socket; port 0 picks a free one (see `.port` after start)."""

    def __init__(
        self,
        recordings: Path,
        router: Router,
        *,
        host: str = "127.0.0.1",
        port: int = DEFAULT_UI_PORT,
        token: str | None = None,
        report: Path | None = None,
    ) -> None:
        self.host, self.port, self.token = host, port, token
        self.app = ui_subapp(recordings, router, report=report, token=token, loopback=_is_loopback(host))
        self._runner: web.AppRunner | None = None

    @property
    def catalog(self) -> Catalog:
        return self.app[CATALOG]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/" + (f"#token={self.token}" if self.token else "")

    async def start(self) -> int:
        if not _is_loopback(self.host):
            log.warning(
                "listening on a non-loopback address: anyone who can reach it can read the recordings",
                host=self.host,
                token_required=self.token is not None,
            )
        # Before listening, so the first page is not kept waiting by the price table's loading.
        await asyncio.to_thread(warm_prices)
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()
        self.port = self._runner.addresses[0][1]
        # The token is in the fragment: browsers never send it, so it stays out of logs.
        log.info("listening", mode="ui", host=self.host, port=self.port, url=self.url.split("#")[0])
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


async def serve_ui(server: UIServer) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Before listening: a signal right after the `listening` line must still stop cleanly.
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    try:
        await stop.wait()
    finally:
        await server.stop()
        # Every serving command ends with one summary line, as the proxy does.
        log.info("summary", mode="ui", url=server.url.split("#")[0])
