"""Exchanges a record run meant to write and did not: one JSON line each, in the recordings
directory, so that a later replay miss of the very same request can say so instead of pointing
at the nearest recording as if the request had never been made.

Lines hold what a miss message shows (key, route, method, path, reason, time), never a body or
a credential. The file is a dotfile, which the loader and `check` pass over; it is bounded
(started afresh past MAX_BYTES) and written with O_APPEND, one write per line, so proxies
sharing a directory do not tear each other's lines.
"""

from __future__ import annotations

import os
import stat
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

NOTES_NAME = ".llmproxy-not-recorded.jsonl"
MAX_BYTES = 1024 * 1024

REASONS = {
    "client_left": 'the client left before the end and client_disconnect = "discard"',
    "upstream_failed": "the upstream gave no whole answer",
    "upstream_status": "the upstream answered 429/5xx (record_errors keeps those)",
    "truncated": "the answer was cut short (record_errors keeps it, marked truncated)",
    "secret": 'it held a credential (secrets = "redact" or secret_allow would record it)',
    "over_limit": "the answer outgrew max_recording_mb",
    "write_failed": "writing the file failed",
}


def note(root: Path, key: str, route: str, method: str, path: str, reason: str | None) -> None:
    """Append one note (best effort: a hint must never fail a request)."""
    line = orjson.dumps(
        {
            "key": key,
            "route": route,
            "method": method,
            "path": path,
            "reason": reason,
            "at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
    )
    target = root / NOTES_NAME
    try:
        root.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
        descriptor = os.open(target, flags, 0o644)
        try:
            if os.fstat(descriptor).st_size > MAX_BYTES:
                os.ftruncate(descriptor, 0)
            os.write(descriptor, line + b"\n")
        finally:
            os.close(descriptor)
    except OSError:
        pass


def read_notes(root: Path) -> dict[str, dict[str, Any]]:
    """The latest note per request key (empty when there are none or they cannot be read)."""
    target = root / NOTES_NAME
    notes: dict[str, dict[str, Any]] = {}
    try:
        descriptor = os.open(target, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return notes
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            return notes  # a FIFO or device put there is never read
        data = os.read(descriptor, MAX_BYTES * 2)
    except OSError:
        return notes
    finally:
        os.close(descriptor)
    for line in data.splitlines():
        try:
            entry = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("key"), str):
            notes[entry["key"]] = entry
    return notes


def describe(entry: dict[str, Any]) -> str:
    """What a miss message says about a note."""
    reason = REASONS.get(str(entry.get("reason")), "that run's log says why")
    return (
        f"This very request reached llmproxy record at {entry.get('at', '?')} but was not recorded: {reason} "
        "(that run's summary counts it in not_recorded)."
    )
