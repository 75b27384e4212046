"""Recordings in an S3-compatible bucket: `s3://bucket/prefix` (AWS S3, R2, GCS's S3 API, MinIO...).

The same files under the same names as in a directory (`<prefix>/<route>/<name>.json`), so
`llmproxy sync` or `aws s3 sync` moves them between git and the bucket unchanged.

The client is aiobotocore: asyncio-native (it runs on aiohttp, like the proxy), maintained with
botocore, and it reads endpoint, region and credentials the standard AWS way (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, AWS_PROFILE, ~/.aws/config, instance roles...). Nothing of that is ever put
into a recording or a log line. The store's methods are blocking, like the directory's, because
the loader and the writer call them from worker threads; they run their requests on one event
loop of the store's own, so many reads go out concurrently over one connection pool and the
proxy's loop never waits on the bucket.

Writes are create-only: `If-None-Match: *` makes the service refuse (412) a name that exists,
so a repeat recorded by another machine is never overwritten: the writer claims the next
sequence instead (see writer.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import threading
from collections.abc import AsyncIterator, Coroutine, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import orjson

from llmproxy.errors import ConfigError
from llmproxy.store.directory import (
    DEFAULT_MAX_FILE_BYTES,
    NOT_RECORDINGS,
    StoreError,
    parse_document,
    repeat_names,
    scope_path,
    slug,
)

T = TypeVar("T")
# Which limit a read waits for: a request waiting on it, the loader, anything else (sync).
Lane = Literal["urgent", "load", "plain"]

# Reads in flight at once (loading, sync): a local server answers 10,000 files in seconds.
DEFAULT_CONCURRENCY = 64
# Loading holds at most this many read-ahead documents (memory stays bounded).
READ_AHEAD = 256
# Reads a waiting request needs (its own recordings, while the bucket loads): a lane of their
# own, and the bulk load holds back while any is in flight, so they never queue behind it at
# the service. The bulk load itself is bound by the client's CPU (botocore signs and parses
# each request, ~4.6 ms here), not by round trips: a few reads at once keep it busy.
URGENT_CONCURRENCY = 16
LOAD_CONCURRENCY = 16
URGENT_HOLDS_LOAD = 0.25  # seconds a bulk read waits for urgent ones at most
LISTING_PAGE = 250  # keys per page of the listing at start (S3's largest is 1,000)


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    size: int
    etag: str
    modified: float  # Unix time


def parse_location(location: str) -> tuple[str, str]:
    parts = urlsplit(location)
    if parts.scheme != "s3" or not parts.netloc:
        raise ConfigError(f"a bucket location looks like s3://bucket/prefix, not {location!r}")
    return parts.netloc, parts.path.strip("/")


class S3Store:
    """The Store protocol (store/base.py) over one bucket and prefix."""

    def __init__(
        self, location: str, *, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES, concurrency: int = DEFAULT_CONCURRENCY
    ) -> None:
        try:
            import aiobotocore.session  # noqa: F401
        except ImportError:
            raise ConfigError("an s3:// recordings location needs the s3 extra: pip install 'llmproxy[s3]'") from None
        self.bucket, self.prefix = parse_location(location)
        self.max_file_bytes = max_file_bytes
        self.durable = True  # an acknowledged PUT is durable
        self.root = None  # nothing on this machine: no journal, no not-recorded notes
        self.concurrency = concurrency
        # What the last listing saw, by name (sync compares with it; refresh finds what is new).
        self.listing: dict[PurePosixPath, ObjectInfo] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._client: Any = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._semaphore: asyncio.Semaphore | None = None
        self._urgent: asyncio.Semaphore | None = None
        self._loading: asyncio.Semaphore | None = None
        self._urgent_in_flight = 0
        self._no_urgent: asyncio.Event | None = None
        self._start_lock = threading.Lock()
        self._closed = False
        self._pending: set[concurrent.futures.Future[Any]] = set()

    @property
    def location(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    # -- the store's own loop ---------------------------------------------------------------

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self._result(self._submit(coroutine))

    def _submit(self, coroutine: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        if self._closed:
            coroutine.close()
            raise StoreError(f"{self.location} is closed (the proxy is stopping)")
        loop = self._started()
        if threading.current_thread() is self._thread:
            coroutine.close()
            raise RuntimeError("S3Store's blocking methods cannot be called from its own loop")
        future = asyncio.run_coroutine_threadsafe(coroutine, loop)
        # Closing cancels what is still waited for, so no thread waits on a stopped loop.
        self._pending.add(future)
        future.add_done_callback(self._pending.discard)
        return future

    def _result(self, future: concurrent.futures.Future[T]) -> T:
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            raise StoreError(f"{self.location} was closed (the proxy is stopping)") from None

    def _started(self) -> asyncio.AbstractEventLoop:
        with self._start_lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name="llmproxy-s3", daemon=True)
                thread.start()
                self._loop, self._thread = loop, thread
                asyncio.run_coroutine_threadsafe(self._connect(), loop).result()
            return self._loop

    async def _connect(self) -> None:
        from aiobotocore.config import AioConfig
        from aiobotocore.session import get_session

        custom_endpoint = bool(os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"))
        config = AioConfig(
            max_pool_connections=self.concurrency + URGENT_CONCURRENCY,
            retries={"max_attempts": 3, "mode": "standard"},
            # Self-hosted services (MinIO, SeaweedFS, moto) seldom have wildcard DNS for buckets.
            s3={"addressing_style": "path" if custom_endpoint else "auto"},
        )
        self._stack = contextlib.AsyncExitStack()
        self._client = await self._stack.enter_async_context(get_session().create_client("s3", config=config))
        self._semaphore = asyncio.Semaphore(self.concurrency)
        self._urgent = asyncio.Semaphore(URGENT_CONCURRENCY)
        self._loading = asyncio.Semaphore(LOAD_CONCURRENCY)
        self._no_urgent = asyncio.Event()
        self._no_urgent.set()

    def close(self) -> None:
        self._closed = True
        for future in list(self._pending):
            future.cancel()
        if self._loop is None:
            return
        loop, stack = self._loop, self._stack
        if stack is not None:
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(stack.aclose(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._loop = self._thread = self._client = self._stack = None

    # -- names ------------------------------------------------------------------------------

    def _key(self, relative: Path | PurePosixPath) -> str:
        name = PurePosixPath(Path(relative).as_posix()).as_posix()
        return f"{self.prefix}/{name}" if self.prefix else name

    def _relative(self, key: str) -> PurePosixPath:
        return PurePosixPath(key[len(self.prefix) + 1 :] if self.prefix else key)

    def relative(self, path: Path) -> PurePosixPath:
        return PurePosixPath(Path(path).as_posix())

    def name_for(
        self, *, route: str, path: str, model: str | None, key: str, sequence: int = 1, scope: str | None = None
    ) -> Path:
        from llmproxy.store.directory import RecordingStore

        return RecordingStore.name_for(
            self,  # type: ignore[arg-type]
            route=route,
            path=path,
            model=model,
            key=key,
            sequence=sequence,
            scope=scope,
        )

    @staticmethod
    def serialize(document: Any) -> bytes:
        return orjson.dumps(document, option=orjson.OPT_INDENT_2) + b"\n"

    # -- listing ----------------------------------------------------------------------------

    async def _list(
        self, under: str = "", *, stem: str | None = None, yielding: bool = False
    ) -> dict[PurePosixPath, ObjectInfo]:
        """Objects under a folder (`under`), or whose name starts with `stem` (a relative name).
        `yielding` (the whole store's listing at start): each next page waits while requests
        wait on urgent reads, in smaller pages."""
        if stem is not None:
            prefix = self._key(PurePosixPath(stem))
        else:
            prefix = self._key(PurePosixPath(under)) + "/" if under else (f"{self.prefix}/" if self.prefix else "")
        found: dict[PurePosixPath, ObjectInfo] = {}
        paginator = self._client.get_paginator("list_objects_v2")
        pages = {"PageSize": LISTING_PAGE} if yielding else {}
        # One name's repeats (a request waiting, or the writer numbering a repeat): urgent.
        urgent = self._urgent_work() if stem is not None else contextlib.nullcontext()
        try:
            async with urgent:
                async for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix, PaginationConfig=pages):
                    if yielding:
                        await self._yield_to_urgent()
                    for item in page.get("Contents", []):
                        relative = self._relative(item["Key"])
                        if _is_recording_name(relative):
                            modified = item["LastModified"].timestamp()
                            etag = str(item.get("ETag", "")).strip('"')
                            found[relative] = ObjectInfo(int(item["Size"]), etag, modified)
        except Exception as exc:  # noqa: BLE001 - botocore raises many kinds; the message says which
            raise StoreError(f"cannot list {self.location}: {_describe(exc)}") from None
        return found

    def check(self) -> None:
        """One small listing: StoreError when the bucket cannot be listed (missing, refused,
        unreachable), said before the proxy listens rather than by a loader that finds nothing."""

        async def probe() -> None:
            prefix = f"{self.prefix}/" if self.prefix else ""
            try:
                await self._client.list_objects_v2(Bucket=self.bucket, Prefix=prefix, MaxKeys=1)
            except Exception as exc:  # noqa: BLE001 - botocore raises many kinds; the message says which
                raise StoreError(f"cannot list {self.location}: {_describe(exc)}") from None

        self._run(probe())

    def list_objects(self, *, yielding: bool = False) -> dict[PurePosixPath, ObjectInfo]:
        self.listing = self._run(self._list(yielding=yielding))
        return self.listing

    def paths(self) -> Iterator[Path]:
        for relative in sorted(self.list_objects(yielding=True)):
            yield Path(relative)

    # -- reading ----------------------------------------------------------------------------

    async def _get(self, relative: Path | PurePosixPath, *, lane: Lane = "plain") -> bytes:
        assert self._semaphore is not None and self._urgent is not None and self._loading is not None
        assert self._no_urgent is not None
        if lane == "urgent":
            async with self._urgent_work(), self._urgent:
                return await self._fetch(relative)
        if lane == "load":
            async with self._loading:
                await self._yield_to_urgent()
                return await self._fetch(relative)
        async with self._semaphore:
            return await self._fetch(relative)

    @contextlib.asynccontextmanager
    async def _urgent_work(self) -> AsyncIterator[None]:
        """A request waits on what runs inside: bulk work holds back meanwhile."""
        assert self._no_urgent is not None
        self._urgent_in_flight += 1
        self._no_urgent.clear()
        try:
            yield
        finally:
            self._urgent_in_flight -= 1
            if not self._urgent_in_flight:
                self._no_urgent.set()

    async def _yield_to_urgent(self) -> None:
        """Bulk work (the listing and reading at start) waits while requests wait on urgent
        reads; bounded, so steady first-time hits never starve the load a miss waits for."""
        assert self._no_urgent is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._no_urgent.wait(), URGENT_HOLDS_LOAD)

    async def _fetch(self, relative: Path | PurePosixPath) -> bytes:
        try:
            response = await self._client.get_object(Bucket=self.bucket, Key=self._key(relative))
        except Exception as exc:  # noqa: BLE001
            raise StoreError(f"cannot read: {_describe(exc)}") from None
        async with response["Body"] as body:
            size = int(response.get("ContentLength") or 0)
            if size > self.max_file_bytes:
                raise StoreError(f"file is {size} bytes, over the {self.max_file_bytes} byte limit (max_file_mb)")
            data = await body.read()
        if len(data) > self.max_file_bytes:
            raise StoreError(f"file is over the {self.max_file_bytes} byte limit (max_file_mb)")
        return data

    def read_bytes(self, path: Path) -> bytes:
        return self._run(self._get(path))

    def load(self, path: Path) -> Any:
        # One file read on demand (a recording replayed for the first time): a request waits.
        return parse_document(self._run(self._get(path, lane="urgent")))

    def load_many(self, paths: Iterable[Path], *, urgent: bool = False) -> Iterator[tuple[Path, Any]]:
        """Read concurrently (up to `concurrency` requests), hand back in order, at most
        READ_AHEAD documents ahead of the consumer."""

        async def one(path: Path) -> Any:
            try:
                return parse_document(await self._get(path, lane="urgent" if urgent else "load"))
            except StoreError as exc:
                return exc

        pending: list[tuple[Path, Any]] = []
        for path in paths:
            pending.append((path, self._submit(one(path))))
            if len(pending) >= READ_AHEAD:
                first, future = pending.pop(0)
                yield first, self._result(future)
        for path, future in pending:
            yield path, self._result(future)

    # -- writing ----------------------------------------------------------------------------

    async def _put(self, relative: Path, data: bytes, replace: bool) -> None:
        assert self._semaphore is not None
        arguments: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": self._key(relative),
            "Body": data,
            "ContentType": "application/json",
        }
        if not replace:
            arguments["IfNoneMatch"] = "*"
        async with self._semaphore:
            for _ in range(5):
                try:
                    await self._client.put_object(**arguments)
                    return
                except Exception as exc:  # noqa: BLE001
                    status = getattr(exc, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode")
                    if status == 412:
                        raise FileExistsError(self._key(relative)) from None
                    if status == 409:  # ConditionalRequestConflict: a concurrent write to the name; ask again
                        continue
                    raise StoreError(f"cannot write {self._key(relative)}: {_describe(exc)}") from None
        raise FileExistsError(self._key(relative))

    def write(self, relative: Path, document: Any, *, replace: bool = False) -> Path:
        if relative.is_absolute() or ".." in relative.parts:
            raise StoreError(f"refusing to write outside the recordings location: {relative}")
        data = document if isinstance(document, bytes) else self.serialize(document)
        self._run(self._put(relative, data, replace))
        return Path(relative)

    def remove_scope(self, scope: str) -> list[Path]:
        """Delete one scope's recordings (re-recording a test replaces them): only objects under
        its folder whose `request.scope` is exactly `scope`, as in a directory."""
        listing = self._run(self._list(scope_path(scope).as_posix()))
        removed = []
        for relative in sorted(listing):
            try:
                document = self.load(Path(relative))
            except StoreError:
                continue
            request = document.get("request") if isinstance(document, dict) else None
            if isinstance(request, dict) and request.get("scope") == scope:
                self._run(self._delete(relative))
                removed.append(Path(relative))
        return removed

    async def _delete(self, relative: PurePosixPath) -> None:
        assert self._semaphore is not None
        async with self._semaphore:
            try:
                await self._client.delete_object(Bucket=self.bucket, Key=self._key(relative))
            except Exception as exc:  # noqa: BLE001
                raise StoreError(f"cannot delete {self._key(relative)}: {_describe(exc)}") from None

    # -- repeats ----------------------------------------------------------------------------

    def _of_key(
        self, route: str, key: str, name: Path | None, scope: str | None = None
    ) -> list[tuple[PurePosixPath, ObjectInfo, int]]:
        """The key's recordings: listed by the name of its first repeat when known (one LIST
        request whatever the bucket holds), else the whole route folder."""
        pattern = repeat_names(key)
        found = []
        if name is not None:
            listing = self._list(stem=Path(name).as_posix().removesuffix(".json"))
        else:
            listing = self._list((scope_path(scope) / slug(route, 40)).as_posix())
        for relative, info in self._run(listing).items():
            match = pattern.search(relative.name)
            if match:
                found.append((relative, info, int(match.group(1) or 1)))
        return found

    def named_for(self, route: str, key: str, *, name: Path | None = None, scope: str | None = None) -> list[Path]:
        return [Path(relative) for relative, _, _ in self._of_key(route, key, name, scope)]

    def highest_sequence(self, route: str, key: str, *, name: Path | None = None, scope: str | None = None) -> int:
        return max((sequence for _, _, sequence in self._of_key(route, key, name, scope)), default=0)

    def newest_recording(
        self, route: str, key: str, *, since: float, name: Path | None = None, scope: str | None = None
    ) -> Path | None:
        found = self._of_key(route, key, name, scope)
        candidates = [(info.modified, sequence, relative) for relative, info, sequence in found]
        # LastModified has whole seconds: one second of slack, then the highest repeat wins.
        candidates = [c for c in candidates if c[0] >= int(since) - 1]
        if not candidates:
            return None
        return Path(max(candidates)[2])


def _is_recording_name(relative: PurePosixPath) -> bool:
    return not any(part.startswith(".") for part in relative.parts) and not relative.name.endswith(NOT_RECORDINGS)


def _describe(exc: BaseException) -> str:
    """An error without credentials: botocore's message names the operation and code only."""
    error = getattr(exc, "response", {}).get("Error", {})
    if error:
        return f"{error.get('Code')}: {error.get('Message')}"
    return f"{type(exc).__name__}: {exc}"
