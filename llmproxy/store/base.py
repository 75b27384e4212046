"""The Store protocol: where recordings live, whatever holds them.

Two backends, chosen by the recordings location: a directory (the default, `directory.py`) and
`s3://bucket/prefix` for any S3-compatible service (`s3.py`). Both hold the same files under the
same names in the same format, so `llmproxy sync` (or `aws s3 sync`) moves recordings between
git and a bucket. Methods are blocking: the loader and the writer call them from worker threads.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any, Protocol, runtime_checkable

S3_SCHEME = "s3://"


@runtime_checkable
class Store(Protocol):
    durable: bool
    max_file_bytes: int
    # The directory on this machine (journal, not-recorded notes), None for a remote store.
    root: Path | None

    @property
    def location(self) -> str:
        """Where the recordings are, for logs and reports (a directory, or s3://bucket/prefix)."""
        ...

    def paths(self) -> Iterator[Path]:
        """Every file that may hold a recording (sorted: a stable load order)."""
        ...

    def load(self, path: Path) -> Any:
        """A recording file's JSON, bounded (StoreError says why not)."""
        ...

    def load_many(self, paths: Iterable[Path], *, urgent: bool = False) -> Iterator[tuple[Path, Any]]:
        """(path, JSON or the StoreError it raised) for each path, in order; a remote store
        reads them concurrently. `urgent`: a request waits for these (a lane of their own,
        not queued behind a bulk load)."""
        ...

    def read_bytes(self, path: Path) -> bytes:
        """A file's exact bytes (sync compares and copies them)."""
        ...

    def relative(self, path: Path) -> PurePosixPath:
        """A file's name inside the store: the same in every backend."""
        ...

    def name_for(
        self, *, route: str, path: str, model: str | None, key: str, sequence: int = 1, scope: str | None = None
    ) -> Path:
        """A recording's name; a scoped one (a test's) lives under its scope's folder."""
        ...

    def serialize(self, document: Any) -> bytes: ...

    def write(self, relative: Path, document: Any, *, replace: bool = False) -> Path:
        """Create-only: FileExistsError when the name is taken (by any writer, on any machine)."""
        ...

    def highest_sequence(self, route: str, key: str, *, name: Path | None = None, scope: str | None = None) -> int:
        """The highest repeat number of `key` in the store (0: none); `name`, the name of its
        first repeat, lets a bucket list only those files."""
        ...

    def newest_recording(
        self, route: str, key: str, *, since: float, name: Path | None = None, scope: str | None = None
    ) -> Path | None:
        """The most recent recording of `key` written at or after `since` (a Unix time)."""
        ...

    def named_for(self, route: str, key: str, *, name: Path | None = None, scope: str | None = None) -> list[Path]:
        """The files whose names llmproxy gives `key`'s repeats in `scope` (as `paths` names
        them), found without listing the whole store: `name`, its first repeat's, lets a
        bucket list only those."""
        ...

    def remove_scope(self, scope: str) -> list[Path]:
        """Delete one scope's own recordings (re-recording a test); returns their names."""
        ...

    def close(self) -> None: ...


def is_remote(location: str | Path) -> bool:
    return normalize_location(location).startswith(S3_SCHEME)


def normalize_location(location: str | Path) -> str:
    """`s3://b/p` survives being made a Path (which collapses it to `s3:/b/p`)."""
    text = str(location)
    if text.startswith("s3:/") and not text.startswith(S3_SCHEME):
        text = S3_SCHEME + text[len("s3:/") :]
    return text


def open_store(location: str | Path, *, durable: bool = False, max_file_bytes: int | None = None) -> Store:
    """The store for a recordings location: `s3://bucket/prefix`, or a directory."""
    from llmproxy.store.directory import DEFAULT_MAX_FILE_BYTES, RecordingStore

    limit = max_file_bytes or DEFAULT_MAX_FILE_BYTES
    text = normalize_location(location)
    if text.startswith(S3_SCHEME):
        from llmproxy.store.s3 import S3Store

        return S3Store(text, max_file_bytes=limit)
    return RecordingStore(Path(location), durable=durable, max_file_bytes=limit)
