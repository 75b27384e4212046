"""The secret scanner: no recording that holds a credential is ever written.

Headers are stripped before anything reaches a recording; this is the second line of defence,
for keys that travel in bodies, URLs or upstream answers (a user pasting a key into a prompt,
an upstream echoing a header back in an error message). It looks at every string of the
document about to be written, bodies that are not JSON decoded (base64, then URL-decoded), and
at `llmproxy check` time at every file already in the directory.

Two searches, one walk: the known key shapes (patterns), and the very values this request
carried as credentials (headers, query, cookies), whatever their shape. What is found is
refused (the default) or, with `secrets = "redact"`, replaced by a placeholder; an allow-list
(`secret_allow`) exempts test keys and the like.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import itertools
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any, Literal
from urllib.parse import unquote_plus

import orjson

from llmproxy.canonical import RawBody, secret_query_params
from llmproxy.headers import credential_headers
from llmproxy.wire.framing import BYTES_LABEL, DATA_KEY, TYPE_KEY

SecretsPolicy = Literal["refuse", "redact"]
SECRETS_POLICIES: tuple[SecretsPolicy, ...] = ("refuse", "redact")

BUILTIN_PATTERNS: dict[str, str] = {
    "anthropic key": r"sk-ant-[A-Za-z0-9_-]{20,}",
    # Not inside a word: "task-management-..." is no key.
    "openai key": r"(?<![A-Za-z0-9])sk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_-]{20,}",
    "google api key": r"AIza[0-9A-Za-z_-]{35}",
    "aws access key": r"(?:AKIA|ASIA)[0-9A-Z]{16}",
    "bearer token": r"[Bb]earer\s+[A-Za-z0-9._~+/=-]{16,}",
    "jwt": r"eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}",
}

# Literal text each built-in pattern contains: a substring test is far cheaper than a regex.
_MARKERS = (b"sk-", b"AIza", b"AKIA", b"ASIA", b"earer", b"eyJ")
_OPENAI_MARKER = b"sk-"  # looked for by _key_start_in
# Bytes many big bodies lack (numbers, lowercase ids, plain text in one case), rarest first: a
# needle holding one is first looked for by that byte alone (memchr, some twenty times faster
# than a substring search), and not at all where the byte is absent.
_RARE_BYTES = b"QZXJKVWYUFGBHPqzjxMNDLROCSEIAT"
_BYTES_MARKER = f'"{BYTES_LABEL}"'.encode()
# What pretty and compact JSON spell differently around (see _worth_walking); the markers and
# the bytes label hold none of these.
_STRUCTURAL = frozenset(b"{}[],:")

# Sets of credential values whose quick-pass searches are kept (a bound, not a tuning).
MAX_CACHED_VALUE_SETS = 256
# Credential values shorter than this are not searched for: "1" or "test" would match anywhere.
MIN_VALUE_LENGTH = 8
# Header names that carry credentials besides the known list (x-my-gateway-token, ...).
_CREDENTIAL_NAME = re.compile(r"key|token|secret|auth|session|password|signature", re.IGNORECASE)


# What a field found in a stream's pieces joined (not in any one of them) is named with.
JOINED = "(joined)"


def placeholder(kind: str) -> str:
    """What a redacted credential becomes: plain text, valid inside JSON and form bodies."""
    return f"[redacted {kind}]"


@dataclass(frozen=True, slots=True)
class Finding:
    field: str  # JSON path inside the recording, e.g. request.body.messages[0].content
    kind: str

    def __str__(self) -> str:
        return f"{self.kind} in {self.field}"


def request_credentials(headers: Mapping[str, str], query: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Every credential value this request carried -> where it came from ("header x-api-key").

    Schemes ("Bearer", "Basic") are dropped so the bare token is searched for; each cookie
    counts on its own."""
    found: dict[str, str] = {}

    def add(value: str, where: str) -> None:
        value = value.strip()
        if len(value) >= MIN_VALUE_LENGTH and value not in found:
            found[value] = where

    for name, value in headers.items():
        lowered = name.lower()
        if lowered in ("cookie", "set-cookie"):
            for part in value.split(";"):
                cookie, _, cookie_value = part.partition("=")
                add(cookie_value, f"cookie {cookie.strip()}")
        elif _is_credential_header(lowered):
            add(value, f"header {lowered}")
            parts = value.split(None, 1)  # any whitespace after the scheme
            if len(parts) == 2 and parts[0].isalpha():
                add(parts[1], f"header {lowered}")
    for name, value in query:
        if name.lower() in secret_query_params() or _CREDENTIAL_NAME.search(name):
            add(value, f"query {name}")
    return found


# Header names seen -> whether they carry credentials (clients send the same few dozen names).
_credential_names: dict[str, bool] = {}
MAX_CACHED_HEADER_NAMES = 4096


def _is_credential_header(lowered: str) -> bool:
    known = _credential_names.get(lowered)
    if known is None:
        known = lowered in credential_headers() or _CREDENTIAL_NAME.search(lowered) is not None
        if len(_credential_names) < MAX_CACHED_HEADER_NAMES:
            _credential_names[lowered] = known
    return known


class SecretScanner:
    def __init__(self, extra_patterns: Iterable[str] = (), *, allow: Iterable[str] = ()) -> None:
        patterns = dict(BUILTIN_PATTERNS)
        self._extra = list(extra_patterns)
        for index, pattern in enumerate(self._extra):
            patterns[f"configured pattern {index + 1}"] = pattern
        self._allow_values = frozenset(allow)
        try:
            self._patterns = [(kind, re.compile(pattern)) for kind, pattern in patterns.items()]
            self._any = re.compile("|".join(f"(?:{pattern})" for pattern in patterns.values()))
            self._allow = [re.compile(pattern) for pattern in self._allow_values]
        except re.error as exc:
            raise ValueError(f"bad secret pattern: {exc}") from None
        # What the quick pass searches for a request's credentials, by the values: clients send
        # the same few keys on every request, so this is worked out once per key, not per file.
        self._searches: dict[tuple[str, ...], list[tuple[bytes, bool, bytes | None, bytes | None]]] = {}
        # The same per set of values: the values to search for, with their other spellings.
        self._spelled: dict[tuple[str, ...], Mapping[str, str]] = {}
        # Per credential value (its bytes): its rarest bytes, for _worth_joining.
        self._rare: dict[bytes, list[bytes]] = {}

    def allowed(self, text: str) -> bool:
        return text in self._allow_values or any(pattern.fullmatch(text) for pattern in self._allow)

    # -- finding -------------------------------------------------------------------------------

    def scan(
        self,
        document: Any,
        serialized: bytes | None = None,
        values: Mapping[str, str] | None = None,
        compact: Sequence[bytes] | None = None,
    ) -> list[Finding]:
        """Credentials in a document, by field: key shapes, and `values` (from
        `request_credentials`) wherever they appear. `serialized` (the document's JSON, when
        the caller has it already) spares serialising it again for the quick first pass, and
        `compact` (the document's compact JSON in pieces, each cut next to a bracket, comma or
        colon, e.g. the document without its body and the body's own; only with `serialized`)
        spares serialising it compactly."""
        values = self._spellings(values or {})
        # One pass over the serialised document finds out whether there is anything at all;
        # only then is the document walked to name the fields.
        if compact is None or serialized is None:
            compact = [orjson.dumps(document)]
        data = serialized if serialized is not None else compact[0]
        # Whether a marker is in the document: both passes may ask, it is looked for once.
        marked: list[bool] = []

        def has_marker() -> bool:
            if not marked:
                marked.append(_holds_marker(compact))
            return marked[0]

        walk = self._worth_walking(data, values, compact, has_marker)
        findings = list(self._iter(document, "", values)) if walk else []
        chunks = _stream_chunks(document)
        if chunks is not None and self._worth_joining(compact, values, has_marker):
            findings += self._joined_findings(chunks, values)
        return findings

    def _spellings(self, values: Mapping[str, str]) -> Mapping[str, str]:
        """The credential values to search for: those not allowed, each also as other texts
        that stand for it (see _other_spellings)."""
        if not values:
            return values
        names = tuple(values)
        spelled = self._spelled.get(names)
        if spelled is None:
            spelled = {}
            for value, where in values.items():
                if self.allowed(value):
                    continue
                spelled.setdefault(value, where)
                for other in _other_spellings(value):
                    if len(other) >= MIN_VALUE_LENGTH:
                        spelled.setdefault(other, where)
            if len(self._spelled) >= MAX_CACHED_VALUE_SETS:
                self._spelled.clear()
            self._spelled[names] = spelled
        return spelled

    def _worth_joining(
        self, compact: Sequence[bytes], values: Mapping[str, str], has_marker: Callable[[], bool]
    ) -> bool:
        """Whether a stream's pieces joined (see _joined_findings) could hold what no piece does.

        Only byte tests, some twenty times cheaper than one substring search, so a stream with
        no key anywhere pays next to nothing. A request's own value split across pieces still has
        every one of its bytes in the document: its rarest ones are looked for. A key shape is
        searched in joined text only when some piece holds one of the literal markers every
        built-in shape contains ("sk-", "AIza", ...): a marker split across pieces itself
        ("s" then "k-proj...") is not looked for, as no byte test can rule that out in plain text
        and the walk costs more than the whole recording's preparation otherwise."""
        for encoded, _, _, _ in self._value_searches(values) if values else ():
            needles = self._rare.get(encoded)
            if needles is None:
                if len(self._rare) >= MAX_CACHED_VALUE_SETS:
                    self._rare.clear()
                needles = self._rare[encoded] = _rare_bytes(encoded)
            if not needles:
                return True
            for byte in needles:
                if not any(byte in piece for piece in compact):
                    break
            else:
                return True
        # A configured pattern has no known marker.
        return bool(self._extra) or has_marker()

    def _joined_findings(self, chunks: list[Any], values: Mapping[str, str]) -> list[Finding]:
        """Credentials in the text a stream's pieces make when joined: each field's strings
        across the chunks, in chunk order, with list indices ignored (every
        choices[0].delta.content, every candidates[0].content.parts[0].text, ...), as a client
        joins them back. A model repeating a key token by token puts it there and in no piece.

        Only matches that cross from one piece into another are findings (a key within one
        piece is the walk's). The request's own values are looked for in every field. Key
        shapes only in fields whose strings are not all the same: a field repeated unchanged in
        every chunk (an id, a model name, a fingerprint) is no text being streamed, and its
        copies joined end to start could make a shape no one sent ("...-sk" + "-abc...")."""
        values_of = [chunk.get(DATA_KEY) for chunk in chunks if _is_text_chunk(chunk)]
        fields = _stream_fields(values_of)
        findings: list[Finding] = []
        for key, pieces in fields.items():
            if len(pieces) < 2:
                continue
            kind = self._joined_finding(pieces, values)
            if kind is not None:
                shown = f"response.body[*].{DATA_KEY}{_first_path(values_of, key)}"
                # A field name holding a credential is shown as a placeholder: fields are logged.
                findings.append(Finding(self.redact_text(shown, values) + JOINED, kind))
        return findings

    def _joined_finding(self, pieces: list[str], values: Mapping[str, str]) -> str | None:
        return next((kind for _, _, kind in self._crossing(pieces, values)), None)

    def _crossing(self, pieces: list[str], values: Mapping[str, str]) -> Iterator[tuple[int, int, str]]:
        """(start, end, kind) of each credential in the pieces joined that crosses from one piece
        into another (see _joined_findings for which are looked for where)."""
        joined = "".join(pieces)
        ends = list(itertools.accumulate(map(len, pieces)))

        def crosses(start: int, end: int) -> bool:
            return bisect.bisect_right(ends, start) != bisect.bisect_right(ends, end - 1)

        for value, where in values.items():
            start = joined.find(value)
            while start >= 0:
                if crosses(start, start + len(value)):
                    yield start, start + len(value), f"credential from request {where}"
                start = joined.find(value, start + 1)
        if len(set(pieces)) < 2:
            return
        for kind, pattern in self._patterns:
            for match in pattern.finditer(joined):
                if crosses(*match.span()) and not self.allowed(match.group()):
                    yield match.start(), match.end(), kind

    def redact_joined(self, document: Any, values: Mapping[str, str]) -> bool:
        """Redact, in place, the credentials split across a stream's pieces (see
        _joined_findings) in a document the caller owns (`redact`'s copy): the part of a key in
        the piece where it starts becomes the placeholder, its parts in the next pieces are
        removed, so the text a client joins reads the placeholder where the key was, as a key
        within one piece is redacted. False: some chunk it touches is also kept as its exact
        text or bytes (framing `verbatim` or `raw`), which cannot be redacted piece by piece."""
        chunks = _stream_chunks(document)
        if chunks is None:
            return True
        values = self._spellings(values)
        slots: dict[tuple[str, ...], list[tuple[Any, Any, int]]] = {}
        for index, chunk in enumerate(chunks):
            if isinstance(chunk, dict) and TYPE_KEY in chunk and _decoded_bytes(chunk) is None:
                _collect_slots(chunk, DATA_KEY, (), index, slots)
            elif not isinstance(chunk, dict) or TYPE_KEY not in chunk:
                _collect_slots(chunks, index, (), index, slots)
        touched: set[int] = set()
        for field in slots.values():
            if len(field) < 2:
                continue
            pieces = [container[slot] for container, slot, _ in field]
            # By start only: the sort is stable, and a request's own value (found first) names a
            # key its shape matches too, as in redact_text.
            spans = sorted(self._crossing(pieces, values), key=itemgetter(0))
            if not spans:
                continue
            merged: list[list[Any]] = []
            for start, end, kind in spans:  # overlapping matches (a value and its shape) as one
                if merged and start < merged[-1][1]:
                    merged[-1][1] = max(merged[-1][1], end)
                else:
                    merged.append([start, end, kind])
            offset = 0
            for (container, slot, chunk_index), piece in zip(field, pieces, strict=True):
                low, high = offset, offset + len(piece)
                offset = high
                text = piece
                for start, end, kind in reversed(merged):  # from the right: earlier offsets hold
                    if end <= low or start >= high:
                        continue
                    cut_from, cut_to = max(start, low) - low, min(end, high) - low
                    put = placeholder(kind) if start >= low else ""
                    text = text[:cut_from] + put + text[cut_to:]
                if text != piece:
                    container[slot] = text
                    touched.add(chunk_index)
        framing = document["response"].get("framing")
        kept = set()
        if isinstance(framing, dict):
            for name in ("verbatim", "raw"):
                if isinstance(framing.get(name), dict):
                    kept.update(framing[name])
        return not any(str(index) in kept for index in touched)

    def _worth_walking(
        self,
        data: bytes,
        values: Mapping[str, str],
        compact: bytes | Sequence[bytes] | None = None,
        has_marker: Callable[[], bool] | None = None,
    ) -> bool:
        """Whether the walk could find anything in the document serialised as `data`.

        `compact` is the same document without indentation (often half the bytes of a pretty
        file), whole or in pieces cut next to brackets, commas and colons. Every string is
        spelled alike in both, and the two differ only by whitespace next to the brackets,
        commas and colons between values: text holding none of those and no whitespace at its
        ends occurs in one exactly when it occurs in the other, and then within one piece."""
        if compact is None:
            quick: Sequence[bytes] = [data]
        elif isinstance(compact, bytes):
            quick = [compact]
        else:
            quick = compact
        if any(_BYTES_MARKER in piece for piece in quick):
            return True  # base64 hides what is inside: decode it
        if values:
            for encoded, same, escaped, rare in self._value_searches(values):
                if any(_holds(piece, encoded, rare) for piece in (quick if same else (data,))):
                    return True
                if escaped is not None and escaped in data:
                    return True
        if not self._extra:
            if has_marker is None:
                marked = _holds_marker(quick)
            else:
                marked = has_marker()
            if not marked:
                return False  # every built-in pattern contains one of these literals
        text = data.decode("utf-8", errors="replace")
        if self._any.search(text) is not None:
            return True
        # The walk reads strings unescaped ("Bearer\tkey" holds a tab, which `\s` matches).
        return "\\" in text and self._any.search(_unescaped(text)) is not None

    def _value_searches(self, values: Mapping[str, str]) -> list[tuple[bytes, bool, bytes | None, bytes | None]]:
        """Per credential value, shortest first: its UTF-8 bytes, whether they are spelled alike in
        pretty and compact JSON, its JSON-escaped spelling where that differs, and its rarest
        byte (see _RARE_BYTES). A value that holds a shorter one is left out: "Bearer sk-x"
        cannot be there when "sk-x" is not."""
        names = tuple(values)
        searches = self._searches.get(names)
        if searches is None:
            searches = []
            for value in sorted(names, key=len):
                encoded = value.encode("utf-8", "surrogateescape")
                if any(shorter in encoded for shorter, _, _, _ in searches):
                    continue
                same = _STRUCTURAL.isdisjoint(encoded) and not encoded[:1].isspace() and not encoded[-1:].isspace()
                # A value with a quote, a backslash or a control character is escaped in JSON.
                escaped = _json_escaped(value)
                searches.append((encoded, same, escaped if escaped != encoded else None, _rare_byte(encoded)))
            if len(self._searches) >= MAX_CACHED_VALUE_SETS:
                self._searches.clear()
            self._searches[names] = searches
        return searches

    def _text_findings(self, text: str, values: Mapping[str, str]) -> Iterator[str]:
        for kind, pattern in self._patterns:
            for match in pattern.finditer(text):
                if not self.allowed(match.group()):
                    yield kind
                    break
        for value, where in values.items():
            if value in text:
                yield f"credential from request {where}"

    def _iter(self, value: Any, path: str, values: Mapping[str, str]) -> Iterator[Finding]:
        if isinstance(value, str):
            for kind in self._text_findings(value, values):
                yield Finding(path or "(document)", kind)
                return
        elif isinstance(value, dict):
            decoded = _decoded_bytes(value)
            if decoded is not None:
                for text in _readings(decoded):
                    for kind in self._text_findings(text, values):
                        yield Finding(f"{path}(decoded)" if path else "(decoded)", kind)
                        return
                return
            for key, item in value.items():
                name = str(key)
                kind = next(self._text_findings(name, values), None)
                # A name holding a credential is shown as a placeholder: field paths are logged.
                shown = name if kind is None else placeholder(kind)
                if kind is not None:
                    yield Finding(f"{path}.{shown}(name)" if path else f"{shown}(name)", kind)
                yield from self._iter(item, f"{path}.{shown}" if path else shown, values)
        elif isinstance(value, list):
            for index, item in enumerate(value):
                yield from self._iter(item, f"{path}[{index}]", values)
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and values:
            # A credential of digits echoed as a JSON number is written as those digits (no key
            # shape is all digits: only the request's own values are looked for).
            text = _number_text(value)
            for candidate, where in values.items():
                if candidate in text:
                    yield Finding(path or "(document)", f"credential from request {where}")
                    return

    # -- redacting -----------------------------------------------------------------------------

    def redact_text(self, text: str, values: Mapping[str, str]) -> str:
        # Values first: a request's own key is named by where it came from, not its shape.
        for value, where in values.items():
            if value in text and not self.allowed(value):
                text = text.replace(value, placeholder(f"credential from request {where}"))
        for kind, pattern in self._patterns:
            text = pattern.sub(lambda m, kind=kind: m.group() if self.allowed(m.group()) else placeholder(kind), text)
        return text

    def redact_bytes(self, data: bytes, values: Mapping[str, str]) -> bytes:
        """Bytes with every credential replaced; latin-1 maps bytes to text one for one, so
        whatever is not a credential comes back byte for byte."""
        latin = {value.encode("utf-8", "surrogateescape").decode("latin-1"): where for value, where in values.items()}
        return self.redact_text(data.decode("latin-1"), latin).encode("latin-1")

    def redact(self, value: Any, values: Mapping[str, str] | None = None) -> Any:
        """A copy of a document (or a parsed body) with every credential replaced by a
        placeholder; base64 bodies are decoded, redacted and encoded again."""
        return self._redact(value, self._spellings(values or {}))

    def _redact(self, value: Any, values: Mapping[str, str]) -> Any:
        if isinstance(value, str):
            return self.redact_text(value, values)
        if isinstance(value, RawBody):
            return value  # by digest: see redact_body
        if isinstance(value, dict):
            decoded = _decoded_bytes(value)
            if decoded is not None:
                cleaned = self.redact_bytes(decoded, values)
                return {**value, DATA_KEY: base64.b64encode(cleaned).decode("ascii")}
            return {self.redact_text(str(k), values): self._redact(v, values) for k, v in value.items()}
        if isinstance(value, list):
            return [self._redact(item, values) for item in value]
        if isinstance(value, (int, float)) and not isinstance(value, bool) and values:
            text = _number_text(value)
            cleaned = self.redact_text(text, values)
            return value if cleaned == text else cleaned
        return value

    def redact_body(self, body_value: Any, raw: bytes, values: Mapping[str, str]) -> Any:
        """A request body as it takes part in the key under `secrets = "redact"`: the same
        redaction the recorder applies to the file, so a replayed request finds its recording."""
        values = self._spellings(values)
        if isinstance(body_value, RawBody):
            return RawBody.of(self.redact_bytes(raw, values))
        return self._redact(body_value, values)


def _rare_byte(needle: bytes) -> bytes | None:
    """The needle's rarest byte by _RARE_BYTES (None: it holds only common ones, which nearly
    every document holds too: looking for one first would only cost)."""
    for byte in _RARE_BYTES:
        if byte in needle:
            return bytes([byte])
    return None


def _rare_bytes(needle: bytes, most: int = 3) -> list[bytes]:
    """Up to `most` of the needle's rarest bytes by _RARE_BYTES."""
    return [bytes([byte]) for byte in _RARE_BYTES if byte in needle][:most]


# A byte that is not UTF-8, as a header value decoded with surrogateescape holds it.
_NOT_UTF8 = re.compile("[\udc80-\udcff]")


def _other_spellings(value: str) -> list[str]:
    """Other texts a credential value may be echoed as: its JSON-escaped spelling (a key holding
    a quote or a backslash, in a body kept as raw text: a verbatim JSON body, an event's text),
    and for a value with bytes that are not UTF-8 (a latin-1 header), the text an upstream
    that decodes it makes: each such byte replaced by U+FFFD (one per byte, or one per invalid
    sequence as Python and browsers decode), or dropped."""
    others: list[str] = []
    escaped = _json_escaped(value)
    if escaped is not None and escaped != value.encode("utf-8"):
        others.append(escaped.decode("utf-8"))
    if _NOT_UTF8.search(value):
        others.append(_NOT_UTF8.sub("\ufffd", value))
        others.append(value.encode("utf-8", "surrogateescape").decode("utf-8", "replace"))
        others.append(_NOT_UTF8.sub("", value))
    return others


def _stream_chunks(document: Any) -> list[Any] | None:
    """A recording's response chunks, when it has more than one."""
    response = document.get("response") if isinstance(document, dict) else None
    body = response.get("body") if isinstance(response, dict) else None
    return body if isinstance(body, list) and len(body) > 1 else None


def _is_text_chunk(chunk: Any) -> bool:
    """A stored chunk whose value is JSON (not base64 bytes, which are no text to join)."""
    return isinstance(chunk, dict) and TYPE_KEY in chunk and _decoded_bytes(chunk) is None


_ABSENT = object()


def _stream_fields(chunks: list[Any]) -> dict[tuple[str, ...], list[str]]:
    """Every string of the chunks' values by field (its path without list indices), in order.

    A top-level field equal in every chunk (an id, a model name) is left out: it is no streamed
    text, only copies of itself (shapes are not looked for in such fields anyway), and leaving
    it out before the walk halves the walk of a typical stream."""
    fields: dict[tuple[str, ...], list[str]] = {}
    first = chunks[0] if chunks else None
    constant: set[str] = set()
    if isinstance(first, dict) and all(isinstance(chunk, dict) for chunk in chunks):
        constant = set(first)
        for chunk in chunks:
            constant = {name for name in constant if chunk.get(name, _ABSENT) == first[name]}
            if not constant:
                break
    for chunk in chunks:
        if constant:
            for name, item in chunk.items():
                if name not in constant:
                    _collect_strings(item, (name,), fields)
        else:
            _collect_strings(chunk, (), fields)
    return fields


def _collect_strings(value: Any, key: tuple[str, ...], fields: dict[tuple[str, ...], list[str]]) -> None:
    if isinstance(value, str):
        pieces = fields.get(key)
        if pieces is None:
            fields[key] = [value]
        else:
            pieces.append(value)
    elif isinstance(value, dict):
        for name, item in value.items():
            _collect_strings(item, (*key, name), fields)
    elif isinstance(value, list):
        for item in value:
            _collect_strings(item, key, fields)


def _first_path(chunks: list[Any], key: tuple[str, ...]) -> str:
    """Where the field `key` (a path without list indices) first holds a string, e.g.
    ".choices[0].delta.content"."""

    def find(value: Any, depth: int) -> str | None:
        if depth == len(key):
            return "" if isinstance(value, str) else None
        if isinstance(value, dict) and key[depth] in value:
            rest = find(value[key[depth]], depth + 1)
            return None if rest is None else f".{key[depth]}{rest}"
        if isinstance(value, list):
            for index, item in enumerate(value):
                rest = find(item, depth)
                if rest is not None:
                    return f"[{index}]{rest}"
        return None

    for chunk in chunks:
        path = find(chunk, 0)
        if path is not None:
            return path
    return ""


def _collect_slots(
    container: Any,
    slot: Any,
    key: tuple[str, ...],
    chunk: int,
    fields: dict[tuple[str, ...], list[tuple[Any, Any, int]]],
) -> None:
    """As _collect_strings, each string as where it is held (its container and slot) and its chunk."""
    value = container[slot]
    if isinstance(value, str):
        fields.setdefault(key, []).append((container, slot, chunk))
    elif isinstance(value, dict):
        for name in value:
            _collect_slots(value, name, (*key, name), chunk, fields)
    elif isinstance(value, list):
        for index in range(len(value)):
            _collect_slots(value, index, key, chunk, fields)


def _holds(data: bytes, needle: bytes, rare: bytes | None) -> bool:
    """`needle in data`, answered by a one-byte search (memchr) where `rare` is absent."""
    return (rare is None or rare in data) and needle in data


_MARKER_SEARCHES = tuple((marker, _rare_byte(marker)) for marker in _MARKERS if marker != _OPENAI_MARKER)


def _holds_marker(pieces: Sequence[bytes]) -> bool:
    """Whether JSON text (in pieces) holds one of the literal markers every built-in key shape
    contains, where a key could start."""
    return any(_key_start_in(piece) for piece in pieces) or any(
        _holds(piece, marker, rare) for marker, rare in _MARKER_SEARCHES for piece in pieces
    )


def _key_start_in(piece: bytes) -> bool:
    """An "sk-" that may start a key. OpenAI's shape is never inside a word, and "task-",
    "risk-" or "disk-" in a long answer would otherwise send every stream to the walk and the
    join: an "sk-" after a letter or digit counts only as Anthropic's "sk-ant-" (whose shape has
    no such rule) or after an escape (`\\n` in JSON is a newline in the text the walk reads)."""
    start = piece.find(_OPENAI_MARKER)
    while start >= 0:
        if (
            not piece[start - 1 : start].isalnum()
            or piece.startswith(b"sk-ant-", start)
            or b"\\" in piece[max(0, start - 6) : start]
        ):
            return True
        start = piece.find(_OPENAI_MARKER, start + 1)
    return False


def _number_text(value: float) -> str:
    """A number as the recording's JSON spells it."""
    try:
        return orjson.dumps(value).decode("ascii")
    except orjson.JSONEncodeError:  # an integer past 64 bits: Python's spelling is JSON's
        return str(value)


def _json_escaped(value: str) -> bytes | None:
    """The value as it appears inside a JSON string (None: not writable as JSON)."""
    try:
        return orjson.dumps(value)[1:-1]
    except orjson.JSONEncodeError:
        return None


_ESCAPE = re.compile(r"\\(?:u([0-9a-fA-F]{4})|(.))")
_SIMPLE_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "f": "\f", "b": "\b"}


def _unescaped(text: str) -> str:
    """JSON text with the escapes inside its strings replaced by what they stand for."""
    return _ESCAPE.sub(lambda m: chr(int(m[1], 16)) if m[1] else _SIMPLE_ESCAPES.get(m[2], m[2]), text)


def _decoded_bytes(value: dict[str, Any]) -> bytes | None:
    if value.get(TYPE_KEY) != BYTES_LABEL or not isinstance(value.get(DATA_KEY), str):
        return None
    try:
        return base64.b64decode(value[DATA_KEY], validate=True)
    except (binascii.Error, ValueError):
        return None


def _readings(data: bytes) -> list[str]:
    """The ways a body may hold a key as text: as is, and URL-decoded (form bodies)."""
    text = data.decode("utf-8", errors="replace")
    decoded = unquote_plus(text)
    return [text] if decoded == text else [text, decoded]
