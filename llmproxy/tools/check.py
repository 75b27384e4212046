"""`llmproxy check`: lint a recordings directory before it is committed or used by CI."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from llmproxy.errors import LlmproxyError
from llmproxy.routing import Router
from llmproxy.store.directory import DEFAULT_MAX_FILE_BYTES, TEMP_SUFFIX, RecordingStore
from llmproxy.store.index import RecordingIndex
from llmproxy.store.journal import abandoned, journals, recover
from llmproxy.store.secrets import SecretScanner

# Names llmproxy gives its files: ...-<key16>.json, or ...-<key16>-<sequence>.json for repeats.
_OWN_NAME = re.compile(r"-(?P<key>[0-9a-f]{16})(?:-(?P<sequence>\d+))?\.json$")


@dataclass(frozen=True, slots=True)
class Problem:
    path: Path
    kind: str  # invalid | secret | duplicate | misnamed | leftover | fixed
    detail: str

    @property
    def fails(self) -> bool:
        return self.kind != "fixed"

    def __str__(self) -> str:
        return f"{self.path}: {self.kind}: {self.detail}"


def leftover_temp_files(root: Path) -> list[Path]:
    """Temp files of writes that never finished (a crash or kill -9 mid-write)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.rglob(f"*{TEMP_SUFFIX}") if p.is_file())


def check_directory(
    root: Path,
    router: Router,
    scanner: SecretScanner,
    *,
    fix: bool = False,
    progress: Callable[[Iterable[Path]], Iterable[Path]] = lambda paths: paths,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
) -> list[Problem]:
    store = RecordingStore(root, max_file_bytes=max_file_bytes)
    problems: list[Problem] = []
    if fix:
        # First: what a killed proxy journaled becomes recordings, checked below like the rest.
        left = {path: path.stat().st_size for path in journals(root)}
        recovered = recover(store)
        for path in left:
            if not path.exists():
                problems.append(Problem(path, "fixed", "wrote the recordings a killed proxy left in its journal"))
        if recovered.failed:
            problems.append(
                Problem(root, "leftover", f"{recovered.failed} journaled recording(s) could not be written (see log)")
            )
    else:
        for path in journals(root):
            if abandoned(path):  # a running proxy's journal is its own business
                problems.append(Problem(path, "leftover", "journal of a proxy that was killed: recover with --fix"))
    index = RecordingIndex(router, keep_recordings=True, cache_bytes=0)
    seen: dict[tuple[str, int], Path] = {}
    for path in progress(list(store.paths())):
        try:
            # The replay loader's own checks (bounded read, renders): check fails what replay skips.
            entry, document = index.load_file(store, path)
            findings = scanner.scan(document)
        except LlmproxyError as exc:
            problems.append(Problem(path, "invalid", str(exc)))
            continue
        except Exception as exc:  # noqa: BLE001 - a hostile file is a finding, never a crash of check
            problems.append(Problem(path, "invalid", f"{type(exc).__name__}: {exc}"))
            continue
        for finding in findings:
            problems.append(Problem(path, "secret", str(finding)))
        sequence = entry.sequence
        slot = (entry.canonical.key, sequence)
        if slot in seen:
            problems.append(Problem(path, "duplicate", f"same request and sequence {sequence} as {seen[slot]}"))
        else:
            seen[slot] = path
        named = _OWN_NAME.search(path.name)
        if named:
            key_in_name = named.group("key")
            sequence_in_name = int(named.group("sequence") or 1)
            if key_in_name != entry.canonical.key[:16] or sequence_in_name != sequence:
                problems.append(
                    Problem(
                        path,
                        "misnamed",
                        f"the request's key is now {entry.canonical.key[:16]} (sequence {sequence}); "
                        "it still replays, but rename it to keep names meaningful",
                    )
                )
    for path in leftover_temp_files(root):
        if fix:
            path.unlink(missing_ok=True)
            problems.append(Problem(path, "fixed", "deleted the temp file of an unfinished write"))
        else:
            problems.append(Problem(path, "leftover", "temp file of an unfinished write (delete with --fix)"))
    return problems
