"""The store owns the recordings directory: which files are recordings, names, atomic writes.

Files are one exchange each, pretty-printed, named `<route>/<endpoint>-<model>-<key16>.json`.
There is no index file: the directory is the database, so teammates' recordings merge in git
without conflicts. Writes go to a temp file in the same directory and are renamed into place,
so a reader (or a crash) never sees a torn file.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from llmproxy.errors import LlmproxyError

TEMP_SUFFIX = ".tmp"
# Files that live beside recordings but are not recordings.
NOT_RECORDINGS = (TEMP_SUFFIX, ".md", ".gitignore", ".gitattributes")
_UNSAFE = re.compile(r"[^a-z0-9._]+")
_VERSION_SEGMENT = re.compile(r"^v\d+[a-z0-9]*$")


_temp_numbers = itertools.count()


class StoreError(LlmproxyError):
    """A file in the store that cannot be read as JSON; the message says why."""


def slug(text: str, limit: int = 48) -> str:
    """A file-name-safe form of request data: no separators, no dots at the ends, no '..'."""
    cleaned = _UNSAFE.sub("-", text.lower()).strip("-.")
    cleaned = cleaned.replace("..", ".")
    return cleaned[:limit].strip("-.") or "x"


class RecordingStore:
    def __init__(self, root: Path, *, durable: bool = False) -> None:
        self.root = Path(root)
        self.durable = durable
        self._made_dirs: set[Path] = set()

    def paths(self) -> Iterator[Path]:
        """Every file that may hold a recording, whatever its name (sorted: stable load order)."""
        if not self.root.is_dir():
            return
        found: list[str] = []  # strings sort much faster than Paths: this runs per file at start
        for directory, subdirs, files in os.walk(self.root):
            subdirs[:] = [d for d in subdirs if not d.startswith(".")]
            found.extend(
                os.path.join(directory, name)
                for name in files
                if not name.startswith(".") and not name.endswith(NOT_RECORDINGS)
            )
        found.sort()
        for name in found:
            yield Path(name)

    @staticmethod
    def read(path: Path) -> Any:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise StoreError(f"cannot read: {exc.strerror}") from None
        if not data.strip():
            raise StoreError("empty file")
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise StoreError(f"not valid JSON: {exc}") from None

    def name_for(self, *, route: str, path: str, model: str | None, key: str, sequence: int = 1) -> Path:
        segments = [s for s in path.split("/") if s and not _VERSION_SEGMENT.match(s)]
        parts = [slug("-".join(segments) or "root")]
        if model:
            parts.append(slug(model, 40))
        parts.append(key[:16])
        if sequence > 1:
            parts.append(str(sequence))
        return Path(slug(route, 40)) / ("-".join(parts) + ".json")

    def newest_recording(self, route: str, key: str, *, since: float) -> Path | None:
        """The most recent recording of `key` written by any proxy at or after `since`."""
        directory = self.root / slug(route, 40)
        try:
            candidates = [
                entry
                for entry in os.scandir(directory)
                if entry.name.endswith(".json") and f"-{key[:16]}" in entry.name and entry.stat().st_mtime >= since
            ]
        except FileNotFoundError:
            return None
        if not candidates:
            return None
        return Path(max(candidates, key=lambda entry: entry.stat().st_mtime).path)

    @staticmethod
    def serialize(document: Any) -> bytes:
        """A recording file's bytes: pretty (2-space), key order kept, newline-terminated."""
        return orjson.dumps(document, option=orjson.OPT_INDENT_2) + b"\n"

    def write(self, relative: Path, document: Any) -> Path:
        """Write a document (or its serialized bytes) atomically: a temp file in the target
        directory, renamed over the target.

        The rename is atomic, so no reader and no crash of this process (kill -9 included)
        ever sees a torn file. `durable` adds an fsync before the rename, which also survives
        a power cut, at the cost of a disk flush per recording.
        """
        if relative.is_absolute() or ".." in relative.parts:
            raise StoreError(f"refusing to write outside the recordings directory: {relative}")
        target = self.root / relative
        directory = target.parent
        if directory not in self._made_dirs:
            directory.mkdir(parents=True, exist_ok=True)
            self._made_dirs.add(directory)
        data = document if isinstance(document, bytes) else self.serialize(document)
        # Unique across processes (pid) and threads (the counter), with no syscall to make it.
        temp = directory / f".{target.name}.{os.getpid()}-{next(_temp_numbers)}{TEMP_SUFFIX}"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                if self.durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temp, target)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        return target
