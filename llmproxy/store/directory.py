"""The store owns the recordings directory: which files are recordings, names, atomic writes.

Files are one exchange each, pretty-printed, named `<route>/<endpoint>-<model>-<key16>.json`;
a scoped recording (one test's, see `scope_path`) lives under its scope's directory:
`tests/test_app/test_one/<route>/...`. The scope itself is read from the file, never the path.
There is no index file: the directory is the database, so teammates' recordings merge in git
without conflicts. Writes go to a temp file in the same directory and are linked into place
(create-only: an existing file is never replaced), so a reader (or a crash) never sees a torn
file and two processes writing the same name never overwrite each other.

Reading is bounded: only regular files inside the directory, at most `max_file_bytes` each,
nested at most MAX_DOCUMENT_DEPTH levels (a FIFO, a device or a huge file never blocks or
floods the loader).
"""

from __future__ import annotations

import errno
import itertools
import os
import re
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import orjson

from llmproxy.canonical import nesting
from llmproxy.errors import LlmproxyError

TEMP_SUFFIX = ".tmp"
# Files that live beside recordings but are not recordings.
NOT_RECORDINGS = (TEMP_SUFFIX, ".md", ".gitignore", ".gitattributes")
_UNSAFE = re.compile(r"[^a-z0-9._]+")
_VERSION_SEGMENT = re.compile(r"^v\d+[a-z0-9]*$")


_temp_numbers = itertools.count()

DEFAULT_MAX_FILE_BYTES = 256 * 1024 * 1024
# JSON nesting a recording may have: orjson serialises at most 254 levels, and a request body
# (MAX_REQUEST_DEPTH in canonical.py) sits a few levels down in its document.
MAX_DOCUMENT_DEPTH = 200


class StoreError(LlmproxyError):
    """A file in the store that cannot be read as JSON; the message says why."""


def slug(text: str, limit: int = 48) -> str:
    """A file-name-safe form of request data: no separators, no dots at the ends, no '..'."""
    cleaned = _UNSAFE.sub("-", text.lower()).strip("-.")
    cleaned = cleaned.replace("..", ".")
    return cleaned[:limit].strip("-.") or "x"


# Distinct (route, endpoint, model, scope) whose name parts a store keeps (a bound, not a tuning).
MAX_PLACES = 4096
# A scope's directory has at most this many levels (a deeper node id is cut there).
MAX_SCOPE_DEPTH = 12


# `name_for` ends a recording's name with its key's first 16 hex digits, then `-N` for repeat N.
KEY_IN_NAME = re.compile(r"-([0-9a-f]{16})(?:-(\d+))?\.json$")


def repeat_names(key: str) -> re.Pattern[str]:
    """The names `name_for` gives `key`'s repeats (group 1: the repeat number, absent for 1)."""
    return re.compile(rf"-{re.escape(key[:16])}(?:-(\d+))?\.json$")


def scope_path(scope: str | None) -> Path:
    """Where a scope's recordings live, readable: `tests/test_app.py::TestX::test_one[a]` is
    `tests/test_app/testx/test_one-a`. Shared recordings (None) are at the top."""
    if scope is None:
        return Path()
    parts = []
    for segment in scope.replace("::", "/").split("/"):
        if segment.endswith(".py"):
            segment = segment[:-3]
        if segment.strip(" ."):
            parts.append(slug(segment, 64))
    return Path(*parts[:MAX_SCOPE_DEPTH]) if parts else Path("x")


class RecordingStore:
    def __init__(self, root: Path, *, durable: bool = False, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> None:
        self.root = Path(root)
        self.durable = durable
        # Off once O_TMPFILE or linking through /proc failed here (see _write_unnamed).
        self._unnamed_files = bool(_O_TMPFILE)
        self.max_file_bytes = max_file_bytes
        self._made_dirs: set[str] = set()
        # (route, endpoint, model, scope) -> (its directory, its names' start): see `create`.
        self._places: dict[tuple[str, str, str | None, str | None], tuple[str, str]] = {}

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
    def read(path: Path, *, max_bytes: int = DEFAULT_MAX_FILE_BYTES, root: Path | None = None) -> Any:
        """A recording file's JSON. Raises StoreError for anything that is not a regular file
        (inside `root`, when given) of at most `max_bytes`, valid JSON nested at most
        MAX_DOCUMENT_DEPTH levels."""
        return parse_document(read_bounded(path, max_bytes=max_bytes, root=root))

    def load(self, path: Path) -> Any:
        """`read` with this store's limits: the file must be inside the recordings directory."""
        return self.read(path, max_bytes=self.max_file_bytes, root=self.root)

    # -- the rest of the Store protocol (store/base.py) --------------------------------------

    @property
    def location(self) -> str:
        return str(self.root)

    def load_many(self, paths: Iterable[Path], *, urgent: bool = False) -> Iterator[tuple[Path, Any]]:
        for path in paths:
            try:
                yield path, self.load(path)
            except StoreError as exc:
                yield path, exc

    def read_bytes(self, path: Path) -> bytes:
        return read_bounded(self.root / path, max_bytes=self.max_file_bytes, root=self.root)

    def relative(self, path: Path) -> PurePosixPath:
        return PurePosixPath(Path(path).relative_to(self.root).as_posix())

    def close(self) -> None:
        pass

    def name_for(
        self, *, route: str, path: str, model: str | None, key: str, sequence: int = 1, scope: str | None = None
    ) -> Path:
        segments = [s for s in path.split("/") if s and not _VERSION_SEGMENT.match(s)]
        parts = [slug("-".join(segments) or "root")]
        if model:
            parts.append(slug(model, 40))
        parts.append(key[:16])
        if sequence > 1:
            parts.append(str(sequence))
        return scope_path(scope) / slug(route, 40) / ("-".join(parts) + ".json")

    def highest_sequence(self, route: str, key: str, *, name: Path | None = None, scope: str | None = None) -> int:
        """The highest repeat number any file of `key` has under the route's directory (0: none).
        `name` (its first repeat's name) lets a remote store list less; a directory scans anyway."""
        pattern = repeat_names(key)
        highest = 0
        try:
            with os.scandir(self.root / scope_path(scope) / slug(route, 40)) as entries:
                for entry in entries:
                    found = pattern.search(entry.name)
                    if found:
                        highest = max(highest, int(found.group(1) or 1))
        except FileNotFoundError:
            pass
        return highest

    def named_for(self, route: str, key: str, *, name: Path | None = None, scope: str | None = None) -> list[Path]:
        pattern = repeat_names(key)
        directory = self.root / scope_path(scope) / slug(route, 40)
        try:
            with os.scandir(directory) as entries:
                return [Path(entry.path) for entry in entries if pattern.search(entry.name)]
        except (FileNotFoundError, NotADirectoryError):
            return []

    def newest_recording(
        self, route: str, key: str, *, since: float, name: Path | None = None, scope: str | None = None
    ) -> Path | None:
        """The most recent recording of `key` written by any proxy at or after `since`."""
        directory = self.root / scope_path(scope) / slug(route, 40)
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

    def remove_scope(self, scope: str) -> list[Path]:
        """Delete the recordings of one scope (re-recording a test replaces them): only files
        under its directory whose `request.scope` is exactly `scope`; another test's files (a
        nested or same-named directory), shared and unreadable files are never touched."""
        removed = []
        directory = self.root / scope_path(scope)
        if not directory.is_dir():
            return removed
        for path in RecordingStore(directory).paths():
            try:
                document = self.load(path)
            except StoreError:
                continue
            request = document.get("request") if isinstance(document, dict) else None
            if isinstance(request, dict) and request.get("scope") == scope:
                path.unlink(missing_ok=True)
                removed.append(path)
        return removed

    @staticmethod
    def serialize(document: Any) -> bytes:
        """A recording file's bytes: pretty (2-space), key order kept, newline-terminated."""
        return orjson.dumps(document, option=orjson.OPT_INDENT_2) + b"\n"

    def write(self, relative: Path, document: Any, *, replace: bool = False) -> Path:
        """Write a document (or its serialized bytes) atomically: a temp file in the target
        directory, then linked to the target name.

        The link is atomic and create-only: FileExistsError if the name is taken (by this or
        any other process, on this machine or over NFS), so a recording is never overwritten;
        `replace=True` renames over it instead (tools that rewrite a file on purpose). No reader
        and no crash (kill -9 included) ever sees a torn file. `durable` adds an fsync, which
        also survives a power cut, at the cost of a disk flush per recording.
        """
        if relative.is_absolute() or ".." in relative.parts:
            raise StoreError(f"refusing to write outside the recordings directory: {relative}")
        target = self.root / relative
        data = document if isinstance(document, bytes) else self.serialize(document)
        self._write_at(str(target.parent), str(target), target.name, data, replace)
        return target

    def create(
        self, *, route: str, path: str, model: str | None, scope: str | None, key: str, sequence: int, data: bytes
    ) -> str | None:
        """`write(name_for(...), data)` in fewer steps, for the writer's hot path: the same name and
        the same create-only write, with str paths, the name's parts worked out once per (route,
        endpoint, model, scope). Returns the file written; None for a key that is not plain
        letters and digits (never from llmproxy: `write` then checks the name)."""
        key16 = key[:16]
        if not key16.isalnum():
            return None
        place = self._places.get((route, path, model, scope))
        if place is None:
            place = self._place(route, path, model, scope)
        directory, start = place
        name = f"{start}{key16}.json" if sequence <= 1 else f"{start}{key16}-{sequence}.json"
        target = f"{directory}{os.sep}{name}"
        self._write_at(directory, target, name, data, False)
        return target

    def _place(self, route: str, path: str, model: str | None, scope: str | None) -> tuple[str, str]:
        """Where `name_for` puts a call's recordings, and how their names start (before the key)."""
        probe = "0" * 16
        relative = self.name_for(route=route, path=path, model=model, key=probe, scope=scope)
        start = relative.name.removesuffix(f"{probe}.json")
        place = (str(self.root / relative.parent), start)
        if len(self._places) >= MAX_PLACES:
            self._places.clear()
        self._places[(route, path, model, scope)] = place
        return place

    def _write_at(self, directory: str, target: str, name: str, data: bytes, replace: bool) -> None:
        if directory not in self._made_dirs:
            os.makedirs(directory, exist_ok=True)
            self._made_dirs.add(directory)
        if not replace and self._unnamed_files:
            try:
                self._write_unnamed(directory, target, data)
                return
            except _NoUnnamedFiles:
                self._unnamed_files = False
        # Unique across processes (pid) and threads (the counter), with no syscall to make it.
        temp = os.path.join(directory, f".{name}.{os.getpid()}-{next(_temp_numbers)}{TEMP_SUFFIX}")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            try:
                _write_all(fd, data)
                if self.durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
            if replace:
                os.replace(temp, target)
            else:
                _link_new(temp, target)
        finally:
            try:
                os.unlink(temp)
            except FileNotFoundError:
                pass

    def _write_unnamed(self, directory: str, target: str, data: bytes) -> None:
        """Linux: the file is made without a name (O_TMPFILE), filled, then given its name in one
        create-only link. Half the directory updates of a named temp file (no temp entry to add
        and remove), and a kill leaves nothing behind: the unnamed inode is freed."""
        try:
            fd = os.open(directory, _O_TMPFILE | os.O_WRONLY, 0o644)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT):
                raise _NoUnnamedFiles from None  # the kernel or the filesystem has none
            raise
        try:
            _write_all(fd, data)
            if self.durable:
                os.fsync(fd)
            try:
                # The descriptor's /proc link names the unnamed inode (linkat with AT_EMPTY_PATH
                # would need CAP_DAC_READ_SEARCH); given a directory descriptor, os.link calls
                # linkat with AT_SYMLINK_FOLLOW, which follows that link (plain link() does not).
                os.link(f"self/fd/{fd}", target, src_dir_fd=_proc(), follow_symlinks=True)
            except FileExistsError:
                raise
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                    raise _NoUnnamedFiles from None  # no /proc, or no links here
                raise
        finally:
            os.close(fd)


class _NoUnnamedFiles(Exception):
    """O_TMPFILE and linking through /proc do not work here: named temp files are used."""


_proc_fd: int | None = None


def _proc() -> int:
    global _proc_fd
    if _proc_fd is None:
        try:
            _proc_fd = os.open("/proc", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            raise _NoUnnamedFiles from None
    return _proc_fd


# os.O_TMPFILE exists only where the platform has it (Linux 3.11+).
_O_TMPFILE = getattr(os, "O_TMPFILE", 0)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _link_new(temp: str, target: str) -> None:
    """Give `temp` the name `target` only if nobody has it (FileExistsError otherwise)."""
    try:
        os.link(temp, target)
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        # No hard links on this filesystem: claim the name create-only, then fill it (a reader
        # may see it empty for a moment, and reports it as such; nothing is ever replaced).
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        os.replace(temp, target)


def read_bounded(path: Path, *, max_bytes: int = DEFAULT_MAX_FILE_BYTES, root: Path | None = None) -> bytes:
    """A file's bytes, refusing what is not a regular file of at most `max_bytes` (inside `root`).

    O_NONBLOCK: opening a FIFO never waits for a writer; fstat on the open descriptor decides
    (no race with a file swapped between a check and the open); reads stop at the limit, so a
    symlink to /dev/zero or a sparse 2 GB file costs nothing.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        # The walk never enters symlinked directories, so only the file itself can be a link:
        # O_NOFOLLOW opens plain files at once and refuses links, which are then resolved.
        fd = os.open(path, flags | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise StoreError(f"cannot read: {exc.strerror}") from None
        fd = _open_link(Path(path), flags, root)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise StoreError("not a regular file (a FIFO, device or directory is never read)")
        if info.st_size > max_bytes:
            raise StoreError(f"file is {info.st_size} bytes, over the {max_bytes} byte limit (max_file_mb)")
        chunks: list[bytes] = []
        size = 0
        while True:
            chunk = os.read(fd, min(1024 * 1024, max_bytes + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > max_bytes:
                raise StoreError(f"file grew past the {max_bytes} byte limit (max_file_mb) while read")
        return b"".join(chunks)
    except OSError as exc:
        raise StoreError(f"cannot read: {exc.strerror}") from None
    finally:
        os.close(fd)


def _open_link(path: Path, flags: int, root: Path | None) -> int:
    """Open what a symlink points to, if it stays inside `root` (when given)."""
    target = Path(os.path.realpath(path))
    if root is not None:
        base = Path(os.path.realpath(root))
        if target != base and base not in target.parents:
            raise StoreError("a symlink to a file outside the recordings directory (not read)")
    try:
        return os.open(target, flags)
    except OSError as exc:
        raise StoreError(f"cannot read: {exc.strerror}") from None


def parse_document(data: bytes) -> Any:
    if not data.strip():
        raise StoreError("empty file")
    try:
        document = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise StoreError(f"not valid JSON: {exc}") from None
    # Nesting cannot exceed the number of opening brackets: most files need no walk at all.
    brackets = data.count(b"[") + data.count(b"{")
    if brackets > MAX_DOCUMENT_DEPTH and nesting(document, MAX_DOCUMENT_DEPTH) > MAX_DOCUMENT_DEPTH:
        raise StoreError(f"JSON nested more than {MAX_DOCUMENT_DEPTH} levels deep (the limit)")
    return document
