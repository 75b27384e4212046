"""Shared by the benchmark and the soak: deterministic response bytes, processes, /proc readings."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import orjson

REPO = Path(__file__).resolve().parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Spec:
    """What the bench upstream sends: a JSON body of `size` bytes, or `chunks` SSE events."""

    kind: str = "json"  # json | sse
    chunks: int = 1
    delay_ms: float = 0.0
    size: int = 200

    def request_body(self, salt: str = "") -> bytes:
        return orjson.dumps(
            {
                "model": "bench-model",
                "messages": [{"role": "user", "content": f"bench {salt}"}],
                "stream": self.kind == "sse",
                "bench": {"kind": self.kind, "chunks": self.chunks, "delay_ms": self.delay_ms, "size": self.size},
            }
        )


def spec_of(body: dict) -> Spec:
    b = body.get("bench") or {}
    return Spec(b.get("kind", "json"), int(b.get("chunks", 1)), float(b.get("delay_ms", 0)), int(b.get("size", 200)))


def json_body(spec: Spec, salt: str) -> bytes:
    filler = "x" * max(0, spec.size - 200)
    return orjson.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": 1,
            "model": "bench-model",
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": f"{salt} {filler}"}, "finish_reason": "stop"}
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }
    )


def sse_events(spec: Spec, salt: str) -> list[bytes]:
    events = []
    for index in range(spec.chunks):
        chunk = {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "bench-model",
            "choices": [{"index": 0, "delta": {"content": f"{salt}:{index} "}, "finish_reason": None}],
        }
        events.append(b"data: " + orjson.dumps(chunk) + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    return events


def expected_bytes(spec: Spec, salt: str) -> bytes:
    return json_body(spec, salt) if spec.kind == "json" else b"".join(sse_events(spec, salt))


def salt_of(body: dict) -> str:
    return body["messages"][0]["content"].removeprefix("bench ")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 60.0, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listens on {port}")


def start(module_or_args: list[str], port: int, env: dict | None = None, cwd: Path = REPO) -> subprocess.Popen:
    # stderr goes to a file, not a pipe nobody reads: a process that logs much (replay misses)
    # would block on a full pipe and stall the run.
    log = tempfile.TemporaryFile()
    process = subprocess.Popen(
        [sys.executable, *module_or_args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    try:
        wait_for_port(port, process=process)
    except (RuntimeError, TimeoutError) as exc:
        log.seek(0)
        tail = log.read()[-2000:].decode(errors="replace")
        raise RuntimeError(f"{' '.join(module_or_args)}: {exc}\n{tail}") from None
    return process


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def children(pid: int) -> list[int]:
    """The live child processes of `pid` (llmproxy's file writer)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


def _process_clock(pid: int) -> float | None:
    """A process's CPU time to the nanosecond (all its threads, exited ones too), or None where
    the system has no per-process CPU clock."""
    clock = ctypes.c_int()
    now = _Timespec()
    try:
        if _libc.clock_getcpuclockid(pid, ctypes.byref(clock)) or _libc.clock_gettime(clock, ctypes.byref(now)):
            return None
    except AttributeError:
        return None
    return now.tv_sec + now.tv_nsec / 1e9


def settle_disk() -> str:
    """Write back and drop the kernel's caches before a run (root only); what was done, for the
    run's header.

    On an ext4 without a journal (this machine's), making an inode skips every inode freed in
    the last 60 s (360 s while its table block is dirty) whose table block is still cached,
    looking each one up (the kernel's `recently_deleted`). After a run or a test suite deleted
    thousands of files, each new file then costs up to ~1 ms of kernel time, in whichever
    target's directory lands in that block group: a measurement of the filesystem's recent past,
    not of the target. Uncached, those blocks count as written out and are not looked up."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3")
    except OSError as exc:
        return f"caches not dropped ({exc.strerror}): file creation may pay for files deleted in the last minutes"
    return "synced, caches dropped"


def cpu_seconds(pid: int) -> float:
    """CPU time of a process and of the live children it runs (llmproxy's file writer).
    /proc's utime and stime count in 10 ms ticks: a round of a few hundred requests costs a
    few tens of ms, so the per-process clock is read where there is one."""
    total = _process_clock(pid)
    if total is None:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime
    for child in children(pid):
        try:
            total += cpu_seconds(child)
        except OSError:
            pass  # it just exited
    return total


def rss_mb(pid: int) -> float:
    """Resident memory of a process and of its live children (llmproxy's file writer)."""
    total = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            total = int(line.split()[1]) / 1024
    for child in children(pid):
        try:
            total += rss_mb(child)
        except OSError:
            pass
    return total


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def use_uvloop() -> bool:
    """Same event loop for every target: uvloop when installed (llmproxy uses it then too)."""
    try:
        import uvloop
    except ImportError:
        return False
    uvloop.install()
    return True
