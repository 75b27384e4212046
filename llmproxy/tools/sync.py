"""`llmproxy sync SRC DST`: copy recordings between a directory and a bucket, either way.

Only what differs is copied: a file missing from DST, or whose bytes differ (sizes first, then
MD5, which S3 reports as the ETag of a single-part upload, so unchanged files are not downloaded).
Nothing is deleted. New names are written create-only; a name that exists with other bytes is
replaced, as `aws s3 sync` would.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from llmproxy.store.base import Store
from llmproxy.store.s3 import S3Store

# Copies in flight at once: the bucket side is I/O bound.
WORKERS = 16


@dataclass(slots=True)
class SyncResult:
    copied: list[str] = field(default_factory=list)
    unchanged: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)


def _listing(store: Store) -> dict[PurePosixPath, Path]:
    return {store.relative(path): path for path in store.paths()}


def _md5(store: Store, path: Path, name: PurePosixPath) -> str | None:
    if isinstance(store, S3Store):
        etag = store.listing[name].etag
        return None if "-" in etag else etag  # a multipart ETag is no MD5
    return hashlib.md5(store.read_bytes(path), usedforsecurity=False).hexdigest()


def _size(store: Store, path: Path, name: PurePosixPath) -> int:
    if isinstance(store, S3Store):
        return store.listing[name].size
    return path.stat().st_size


def same(src: Store, source: Path, dst: Store, target: Path, name: PurePosixPath) -> bool:
    if _size(src, source, name) != _size(dst, target, name):
        return False
    first, second = _md5(src, source, name), _md5(dst, target, name)
    if first is not None and second is not None:
        return first == second
    return src.read_bytes(source) == dst.read_bytes(target)


def plan(src: Store, dst: Store) -> tuple[list[tuple[PurePosixPath, Path, bool]], int]:
    """What to copy: (name, source path, whether DST has the name already), and how many are equal."""
    sources, targets = _listing(src), _listing(dst)
    work: list[tuple[PurePosixPath, Path, bool]] = []
    unchanged = 0
    for name, source in sorted(sources.items()):
        target = targets.get(name)
        if target is None:
            work.append((name, source, False))
        elif same(src, source, dst, target, name):
            unchanged += 1
        else:
            work.append((name, source, True))
    return work, unchanged


def sync(
    src: Store,
    dst: Store,
    *,
    dry_run: bool = False,
    progress: Callable[[Iterator[str], int], Iterator[str]] | None = None,
) -> SyncResult:
    work, unchanged = plan(src, dst)
    result = SyncResult(unchanged=unchanged)
    if dry_run:
        result.copied = [str(name) for name, _, _ in work]
        return result

    def copy(item: tuple[PurePosixPath, Path, bool]) -> str:
        name, source, exists = item
        try:
            dst.write(Path(name), src.read_bytes(source), replace=exists)
        except Exception as exc:  # noqa: BLE001 - one file that fails never stops the others
            result.failed.append((str(name), str(exc) or type(exc).__name__))
        else:
            result.copied.append(str(name))
        return str(name)

    with ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="llmproxy-sync") as pool:
        done: Iterator[str] = pool.map(copy, work)
        if progress is not None:
            done = progress(done, len(work))
        for _ in done:
            pass
    return result
