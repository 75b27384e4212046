"""The store owns the recordings directory: which files are recordings, names, atomic writes.

Files are one exchange each, pretty-printed, named `<route>/<endpoint>-<model>-<key16>.json`.
There is no index file: the directory is the database, so teammates' recordings merge in git
without conflicts. Writes go to a temp file in the same directory and are renamed into place,
so a reader (or a crash) never sees a torn file.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

TEMP_SUFFIX = ".tmp"
# Files that live beside recordings but are not recordings.
NOT_RECORDINGS = (TEMP_SUFFIX, ".md", ".gitignore", ".gitattributes")
_UNSAFE = re.compile(r"[^a-z0-9._]+")
_VERSION_SEGMENT = re.compile(r"^v\d+[a-z0-9]*$")


class StoreError(Exception):
    """A file in the store that cannot be read as JSON; the message says why."""


def slug(text: str, limit: int = 48) -> str:
    """A file-name-safe form of request data: no separators, no dots at the ends, no '..'."""
    cleaned = _UNSAFE.sub("-", text.lower()).strip("-.")
    cleaned = cleaned.replace("..", ".")
    return cleaned[:limit].strip("-.") or "x"


class RecordingStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def paths(self) -> Iterator[Path]:
        """Every file that may hold a recording, whatever its name (sorted: stable load order)."""
        if not self.root.is_dir():
            return
        found: list[Path] = []
        for directory, subdirs, files in os.walk(self.root):
            subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
            for name in files:
                if name.startswith(".") or name.endswith(NOT_RECORDINGS):
                    continue
                found.append(Path(directory) / name)
        yield from sorted(found)

    def read(self, path: Path) -> Any:
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

    def write(self, relative: Path, document: Any) -> Path:
        """Write atomically: temp file in the target directory, fsync, rename over the target."""
        target = (self.root / relative).resolve()
        root = self.root.resolve()
        if root not in target.parents:
            raise StoreError(f"refusing to write outside the recordings directory: {relative}")
        target.parent.mkdir(parents=True, exist_ok=True)
        data = orjson.dumps(document, option=orjson.OPT_INDENT_2) + b"\n"
        fd, temp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=TEMP_SUFFIX)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp_name, target)
        except BaseException:
            Path(temp_name).unlink(missing_ok=True)
            raise
        return target
