"""The secret scanner: no recording that holds a credential is ever written.

Headers are stripped before anything reaches a recording; this is the second line of defence,
for keys that travel in bodies, URLs or upstream answers (a user pasting a key into a prompt,
an upstream echoing a header back). It looks at every string of the document about to be
written, and at `llmproxy check` time at every file already in the directory.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson

BUILTIN_PATTERNS: dict[str, str] = {
    "anthropic key": r"sk-ant-[A-Za-z0-9_-]{20,}",
    "openai key": r"sk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_-]{20,}",
    "google api key": r"AIza[0-9A-Za-z_-]{35}",
    "aws access key": r"(?:AKIA|ASIA)[0-9A-Z]{16}",
    "bearer token": r"[Bb]earer\s+[A-Za-z0-9._~+/=-]{16,}",
    "jwt": r"eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}",
}


# Literal text each built-in pattern contains: a substring test is far cheaper than a regex.
_MARKERS = (b"sk-", b"AIza", b"AKIA", b"ASIA", b"earer", b"eyJ")


@dataclass(frozen=True, slots=True)
class Finding:
    field: str  # JSON path inside the recording, e.g. request.body.messages[0].content
    kind: str

    def __str__(self) -> str:
        return f"{self.kind} in {self.field}"


class SecretScanner:
    def __init__(self, extra_patterns: Iterable[str] = ()) -> None:
        patterns = dict(BUILTIN_PATTERNS)
        self._extra = list(extra_patterns)
        for index, pattern in enumerate(self._extra):
            patterns[f"configured pattern {index + 1}"] = pattern
        try:
            self._patterns = [(kind, re.compile(pattern)) for kind, pattern in patterns.items()]
            self._any = re.compile("|".join(f"(?:{pattern})" for pattern in patterns.values()))
        except re.error as exc:
            raise ValueError(f"bad secret pattern: {exc}") from None

    def scan(self, document: Any, serialized: bytes | None = None) -> list[Finding]:
        """Credentials in a document, by field. `serialized` (the document's JSON, when the
        caller has it already) spares serialising it again for the quick first pass."""
        # One pass of one combined pattern over the serialised document finds out whether
        # there is anything at all; only then is the document walked to name the fields.
        data = serialized if serialized is not None else orjson.dumps(document)
        if not self._extra and not any(marker in data for marker in _MARKERS):
            return []  # every built-in pattern contains one of these literals
        if not self._any.search(data.decode("utf-8", errors="replace")):
            return []
        return list(self._iter(document, ""))

    def _iter(self, value: Any, path: str) -> Iterator[Finding]:
        if isinstance(value, str):
            for kind, pattern in self._patterns:
                if pattern.search(value):
                    yield Finding(path or "(document)", kind)
                    return
        elif isinstance(value, dict):
            for key, item in value.items():
                yield from self._iter(str(key), f"{path}.{key}(name)" if path else f"{key}(name)")
                yield from self._iter(item, f"{path}.{key}" if path else str(key))
        elif isinstance(value, list):
            for index, item in enumerate(value):
                yield from self._iter(item, f"{path}[{index}]")
