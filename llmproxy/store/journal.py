"""The write-ahead journal: what was answered to a client survives a kill -9 before its file exists.

Each recording, once scanned for secrets and serialised in its final form (the very bytes its
file gets), is appended to one file per proxy process, `<recordings>/.journal-<pid>-<token>.llmproxy`,
before the client gets the end of its response; a line marks it done once its file is written.
A clean exit deletes the journal. After a kill, the next start (record or replay) or
`llmproxy check --fix` writes every entry not marked done (create-only, as the recorder would)
and deletes the journal. The file holds only what a recording would hold: never a credential.

Entries: a JSON header line (id, size, where the file goes) then `size` bytes of the recording;
done marks: `{"done": id}` lines. A torn tail (killed mid-append) is an entry that was never
acknowledged, and is dropped. The owner holds an flock on its journal: a live proxy's journal is
never recovered by another process.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import orjson
import structlog

from llmproxy.store.base import Store
from llmproxy.store.directory import RecordingStore, StoreError

log = structlog.get_logger("llmproxy.journal")

JOURNAL_PREFIX = ".journal-"
JOURNAL_SUFFIX = ".llmproxy"
JournalFsync = Literal["off", "always"]
# Once every entry is done, a journal over this size starts again from empty.
RESET_BYTES = 16 * 1024 * 1024
MAX_NAME_ATTEMPTS = 1000


@dataclass(slots=True, frozen=True)
class Target:
    """Where a recording goes: what `RecordingStore.name_for` needs, and its first sequence."""

    route: str
    path: str
    model: str | None
    key: str
    sequence: int
    scope: str | None = None  # a test's (or a client's) own recordings: their own folder and repeats

    def relative(self, store: Store, sequence: int | None = None) -> Path:
        return store.name_for(
            route=self.route,
            path=self.path,
            model=self.model,
            key=self.key,
            sequence=sequence or self.sequence,
            scope=self.scope,
        )


class Journal:
    """One process's append-only journal. `append` and `done` are thread-safe."""

    def __init__(self, root: Path, *, fsync: JournalFsync = "off") -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.path = root / f"{JOURNAL_PREFIX}{os.getpid()}-{secrets.token_hex(4)}{JOURNAL_SUFFIX}"
        self.fsync = fsync
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._lock = threading.Lock()
        self._next = 0
        self._open: set[int] = set()
        self._size = 0
        self.closed = False

    def append(self, target: Target, data: bytes) -> int:
        """Journal a recording's final bytes; returns its id."""
        return self.append_many([(target, data)])[0]

    def append_many(self, recordings: list[tuple[Target, bytes]]) -> list[int]:
        """Journal recordings' final bytes in one write; returns their ids."""
        entries = self.next_ids(len(recordings))
        self.append_framed(b"".join(frame_entries(zip(entries, recordings, strict=True))), entries)
        return entries

    def next_ids(self, count: int) -> list[int]:
        with self._lock:
            first = self._next + 1
            self._next += count
        return list(range(first, first + count))

    def append_framed(self, data: bytes, entries: list[int]) -> None:
        """Journal entries framed by `frame_entries` (ids from `next_ids`) in one write. On return
        they survive a kill of this process (and a power cut too with fsync = "always")."""
        with self._lock:
            _write_all(self._fd, data)
            self._size += len(data)
            self._open.update(entries)
        if self.fsync == "always":
            os.fsync(self._fd)

    def done(self, entries: list[int]) -> None:
        """These entries' files are written: they need no recovery (one write for all)."""
        with self._lock:
            if self.closed or not entries:
                return
            self._open.difference_update(entries)
            if not self._open and self._size > RESET_BYTES:
                os.ftruncate(self._fd, 0)  # O_APPEND: the next entry goes at the new end
                self._size = 0
                return
            marks = b"".join(b'{"done":%d}\n' % entry for entry in entries)
            _write_all(self._fd, marks)
            self._size += len(marks)

    @property
    def outstanding(self) -> int:
        return len(self._open)

    def close(self) -> int:
        """At exit: delete the journal if every entry was written, else keep it for recovery.
        Returns how many entries are left for the next start."""
        with self._lock:
            if self.closed:
                return len(self._open)
            self.closed = True
            left = len(self._open)
            if not left:
                self.path.unlink(missing_ok=True)
            os.close(self._fd)  # releases the flock
        return left


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def journals(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith(JOURNAL_PREFIX) and p.name.endswith(JOURNAL_SUFFIX))


def abandoned(path: Path) -> bool:
    """A journal whose proxy is gone (no one holds its lock)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def frame_entries(entries: Iterable[tuple[int, tuple[Target, bytes]]]) -> list[bytes]:
    """Entries as the journal (and the file writer process's feed) frames them: per entry a JSON
    header line (its id, size and target), then the recording's bytes. Join the parts to write."""
    parts: list[bytes] = []
    for entry, (target, data) in entries:
        header = {
            "id": entry,
            "size": len(data),
            "route": target.route,
            "path": target.path,
            "model": target.model,
            "key": target.key,
            "sequence": target.sequence,
            "scope": target.scope,
        }
        parts.append(orjson.dumps(header) + b"\n")
        parts.append(data)
    return parts


def read_frames(data: bytes | bytearray, position: int = 0) -> tuple[list[tuple[int, Target | None, bytes]], int]:
    """The complete frames of `data` from `position`, and where the first incomplete one starts.
    A done mark is (id, None, b""); the end of a feed (id -1, None, b"")."""
    frames: list[tuple[int, Target | None, bytes]] = []
    while position < len(data):
        end = data.find(b"\n", position)
        if end < 0:
            break  # torn header
        try:
            header: dict[str, Any] = orjson.loads(data[position:end])
        except orjson.JSONDecodeError:
            break
        if "done" in header:
            frames.append((int(header["done"]), None, b""))
            position = end + 1
            continue
        if "end" in header:  # the file writer's feed is over (never in a journal)
            frames.append((-1, None, b""))
            position = end + 1
            continue
        size = int(header["size"])
        if end + 1 + size > len(data):
            break  # torn body
        target = Target(
            header["route"],
            header["path"],
            header.get("model"),
            header["key"],
            int(header["sequence"]),
            header.get("scope"),
        )
        frames.append((int(header["id"]), target, data[end + 1 : end + 1 + size]))
        position = end + 1 + size
    return frames, position


def pending_entries(data: bytes) -> list[tuple[Target, bytes]]:
    """The complete entries of a journal's bytes that are not marked done, in order (a torn tail,
    killed mid-append, was never acknowledged)."""
    entries: dict[int, tuple[Target, bytes]] = {}
    for entry, target, body in read_frames(data)[0]:
        if target is None:
            entries.pop(entry, None)
        else:
            entries[entry] = (target, body)
    return list(entries.values())


def write_new(store: Store, target: Target, data: bytes) -> str:
    """`write_create_only`, the file's path as a str; the usual case (a directory, the target's
    name free) without Path objects (`RecordingStore.create`)."""
    if isinstance(store, RecordingStore):
        try:
            written = store.create(
                route=target.route,
                path=target.path,
                model=target.model,
                scope=target.scope,
                key=target.key,
                sequence=target.sequence,
                data=data,
            )
        except FileExistsError:
            written = None  # taken: the next free repeat, or this very recording written before a kill
        if written is not None:
            return written
    return str(write_create_only(store, target, bytes(data)))


def write_create_only(store: Store, target: Target, data: bytes) -> Path:
    """Write under the first free sequence from the target's: a recording already on disk (or in
    the bucket) under that name (another process, an earlier run) is never replaced. Taking a
    name is one atomic link (or one conditional PUT); losing the race moves on to the next number."""
    sequence = target.sequence
    document: dict[str, Any] | None = None
    for attempt in range(MAX_NAME_ATTEMPTS):
        try:
            return store.write(target.relative(store, sequence), data)
        except FileExistsError:
            if document is None:
                document = orjson.loads(data)
            if attempt == 0:
                # Jump past every repeat already stored once, then step (races are rare).
                taken = store.highest_sequence(
                    target.route, target.key, name=target.relative(store, 1), scope=target.scope
                )
                # Written before a kill, under this name or (it was taken then too) a later
                # repeat's: the same recording but for its sequence. Writing it again duplicates it.
                wanted = _without_sequence(document)
                for candidate in range(sequence, max(sequence, taken) + 1):
                    written = _stored_as(store, target.relative(store, candidate), wanted)
                    if written is not None:
                        return written
            else:
                taken = sequence
            sequence = max(sequence, taken) + 1
            document["request"]["sequence"] = sequence
            data = store.serialize(document)
    raise RuntimeError(f"no free sequence for key {target.key[:16]} after {MAX_NAME_ATTEMPTS} attempts")


def _stored_as(store: Store, relative: Path, wanted: dict[str, Any]) -> Path | None:
    """The file at `relative` if it holds the recording `wanted` (given without its sequence)."""
    try:
        raw = (store.root / relative).read_bytes() if store.root is not None else store.read_bytes(relative)
        other = orjson.loads(raw)
    except (OSError, StoreError, orjson.JSONDecodeError):
        return None
    if not isinstance(other, dict) or not isinstance(other.get("request"), dict):
        return None
    if _without_sequence(other) != wanted:
        return None
    return store.root / relative if store.root is not None else relative


def _without_sequence(document: dict[str, Any]) -> dict[str, Any]:
    # The first repeat has no "sequence" in its request; later ones do.
    request = {key: value for key, value in document["request"].items() if key != "sequence"}
    return {**document, "request": request}


@dataclass(slots=True)
class Recovered:
    journals: int = 0
    written: int = 0
    failed: int = 0
    busy: int = 0  # journals of proxies still running: left alone


def recover(store: RecordingStore) -> Recovered:
    """Turn the journals of proxies that died into recordings, then delete them."""
    result = Recovered()
    for path in journals(store.root):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            continue  # recovered by another process meanwhile
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                result.busy += 1
                continue
            if not path.exists():
                continue  # another process recovered it before we got the lock
            data = path.read_bytes()
            result.journals += 1
            failed = 0
            for target, recording in pending_entries(data):
                try:
                    write_create_only(store, target, recording)
                    result.written += 1
                except Exception:  # noqa: BLE001 - counted and reported, the journal is kept
                    failed += 1
                    log.exception("journal entry could not be written", route=target.route, path=target.path)
            result.failed += failed
            if not failed:
                path.unlink(missing_ok=True)
        finally:
            os.close(fd)
    if result.journals:
        log_method = log.error if result.failed else log.warning
        log_method(
            "recovered recordings from the journal of a proxy that was killed",
            journals=result.journals,
            written=result.written,
            failed=result.failed,
        )
    return result
