"""The file writer process (store/fileproc.py): what happens when it or the proxy dies.

Each request carries a nonce in its body, so every answered request is matched with its file;
the writer is held with SIGSTOP (it reads nothing) so the tests decide what it has done.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from llmproxy.store.directory import RecordingStore, StoreError
from llmproxy.store.fileproc import END_FRAME
from llmproxy.store.journal import (
    Journal,
    Target,
    frame_entries,
    journals,
    recover,
    write_create_only,
    write_new,
)
from tests.support import CliProxy, LoopThread, RunningApp, children_of, start_proxy, wait_until
from tests.test_durability import _fire, _nonces_on_disk
from tests.upstreams.openai_wire import OpenAIWire


def _gone(pid: int) -> bool:
    """Exited (and reaped, or a zombie nobody waits for)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state == "Z"


def _writer_of(proxy: CliProxy) -> int:
    writers = children_of(proxy.process.pid)
    assert len(writers) == 1, writers

    def command() -> list[bytes]:
        return Path(f"/proc/{writers[0]}/cmdline").read_bytes().split(b"\0")

    # Popen returns once the child's exec has begun (vfork): its command line is there a moment
    # later, and an empty one was read in ~1 start in 10.
    wait_until(lambda: command() != [b""], "the file writer's exec to finish")
    assert b"llmproxy.store.fileproc" in command()
    return writers[0]


def test_a_killed_file_writer_hands_its_work_to_a_thread(loop_thread: LoopThread, tmp_path: Path) -> None:
    wire = OpenAIWire()
    app = RunningApp(loop_thread, wire.app()).start()
    recordings = tmp_path / "recordings"
    proxy = CliProxy("record", "--upstream", app.url, "--recordings", str(recordings), "--port", "0")
    try:
        writer = _writer_of(proxy)
        os.kill(writer, signal.SIGSTOP)
        answered: list[int] = []
        loop_thread.run(_fire(proxy.url, 10, answered, stream=False))
        assert sorted(answered) == list(range(10))  # answered once journaled, not once written
        assert _nonces_on_disk(recordings) == []
        os.kill(writer, signal.SIGKILL)
        gone = proxy.wait_for_event("file writer process exited: writing in a thread from now on")
        assert gone["outstanding"] == 10 and gone["code"] == -signal.SIGKILL
        wait_until(lambda: len(_nonces_on_disk(recordings)) == 10, "the thread to write the 10 recordings")
        more: list[int] = []
        loop_thread.run(_fire(proxy.url, 3, more, stream=True))  # the thread writes from now on
        wait_until(lambda: len(_nonces_on_disk(recordings)) == 13, "3 more recordings")
        events = proxy.stop()
    finally:
        app.stop()
    assert proxy.process.returncode == 0
    assert _nonces_on_disk(recordings) == sorted([*range(10), *range(3)])  # each once, nothing lost
    assert next(e for e in events if e["event"] == "summary")["recorded"] == 13
    assert journals(recordings) == []


def test_a_killed_proxy_leaves_its_writer_to_finish_and_a_restart_adds_nothing_twice(
    loop_thread: LoopThread, tmp_path: Path
) -> None:
    wire = OpenAIWire()
    app = RunningApp(loop_thread, wire.app()).start()
    recordings = tmp_path / "recordings"
    proxy = CliProxy("record", "--upstream", app.url, "--recordings", str(recordings), "--port", "0")
    writer = _writer_of(proxy)
    try:
        os.kill(writer, signal.SIGSTOP)
        answered: list[int] = []
        loop_thread.run(_fire(proxy.url, 12, answered, stream=False))
        assert len(answered) == 12
        proxy.process.send_signal(signal.SIGKILL)
        proxy.process.wait(10)
        assert _nonces_on_disk(recordings) == [] and len(journals(recordings)) == 1
        # The orphaned writer writes everything it was handed, then sees its feed end and exits.
        os.kill(writer, signal.SIGCONT)
        wait_until(lambda: _gone(writer), "the orphaned writer to finish and exit")
        assert _nonces_on_disk(recordings) == list(range(12))
        # The journal was never marked done: the next start recovers its entries, finds each one
        # already written (the same bytes) and writes none twice.
        restarted = CliProxy("replay", "--recordings", str(recordings), "--port", "0")
        events = restarted.stop()
    finally:
        app.stop()
        if not _gone(writer):
            os.kill(writer, signal.SIGKILL)
    assert _nonces_on_disk(recordings) == list(range(12))
    assert journals(recordings) == []
    recovered = next(e for e in events if e["event"].startswith("recovered recordings from the journal"))
    assert recovered["failed"] == 0


def test_the_writer_ignores_a_ctrl_c_to_the_process_group_and_the_proxy_writes_everything(
    loop_thread: LoopThread, tmp_path: Path
) -> None:
    """A terminal's Ctrl-C reaches every process of the group: the writer must not die first."""
    wire = OpenAIWire()
    app = RunningApp(loop_thread, wire.app()).start()
    recordings = tmp_path / "recordings"
    proxy = CliProxy("record", "--upstream", app.url, "--recordings", str(recordings), "--port", "0", new_session=True)
    try:
        writer = _writer_of(proxy)
        os.kill(writer, signal.SIGSTOP)
        answered: list[int] = []
        loop_thread.run(_fire(proxy.url, 8, answered, stream=True))
        os.killpg(proxy.process.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole group
        os.kill(writer, signal.SIGCONT)
        proxy.process.wait(30)
        proxy._reader.join(15)
    finally:
        app.stop()
    events = proxy.events()
    assert proxy.process.returncode == 0, proxy.lines
    assert not [e for e in events if e["event"].startswith("file writer process exited")]
    assert _nonces_on_disk(recordings) == list(range(8))
    assert journals(recordings) == []
    assert _gone(writer)


def _frames(root: Path, numbers: range) -> tuple[bytes, list[Path]]:
    """Journal-framed recordings (as the proxy feeds its writer) and where each one goes."""
    store = RecordingStore(root)
    entries = []
    names = []
    for number in numbers:
        target = Target("openai", "/v1/chat/completions", "gpt-4o", f"{number:016x}" + "0" * 48, 1)
        document = {"request": {"sequence": 1, "n": number}, "response": {"status": 200}}
        entries.append((number + 1, (target, store.serialize(document))))
        names.append(root / target.relative(store))
    return b"".join(frame_entries(entries)), names


def _writer(root: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-P", "-m", "llmproxy.store.fileproc", str(root)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )


def test_the_writer_writes_on_after_its_proxy_stops_reading_its_answers(tmp_path: Path) -> None:
    """A killed proxy reads no answer: the writer still writes everything it was handed."""
    writer = _writer(tmp_path)
    assert writer.stdin is not None and writer.stdout is not None
    first, first_names = _frames(tmp_path, range(0, 3))
    writer.stdin.write(first)
    writer.stdin.flush()
    assert writer.stdout.readline()  # it answers while the proxy is there
    writer.stdout.close()  # the proxy is gone: the next answer meets a closed pipe
    second, second_names = _frames(tmp_path, range(3, 6))
    writer.stdin.write(second)
    writer.stdin.flush()
    wait_until(lambda: all(path.is_file() for path in second_names), "the second batch to be written")
    third, third_names = _frames(tmp_path, range(6, 9))  # read after its answer to the second failed
    writer.stdin.write(third)
    writer.stdin.close()
    assert writer.wait(30) == 0
    assert all(path.is_file() for path in first_names + second_names + third_names)


def test_the_end_frame_stops_the_writer_even_if_its_pipe_stays_open(tmp_path: Path) -> None:
    """A process forked from the proxy (a test's multiprocessing child) may keep the feed open."""
    writer = _writer(tmp_path)
    assert writer.stdin is not None
    held = os.dup(writer.stdin.fileno())  # the fork's copy of the pipe
    try:
        frames, names = _frames(tmp_path, range(4))
        writer.stdin.write(frames + END_FRAME)
        writer.stdin.close()
        assert writer.wait(30) == 0
    finally:
        os.close(held)
    assert all(path.is_file() for path in names)


def test_recovery_finds_an_entry_the_orphaned_writer_wrote_as_a_later_repeat(tmp_path: Path) -> None:
    """The name the journal asked for was taken (an earlier run's recording), so the writer wrote
    the entry as the next repeat before the proxy's kill was noticed: the restart must not write it
    a third time."""
    store = RecordingStore(tmp_path)
    target = Target("openai", "/v1/chat/completions", "gpt-4o", "ab" * 32, 1)
    # A first repeat's request has no "sequence"; the writer adds it to later ones.
    store.write(target.relative(store), store.serialize({"request": {"model": "gpt-4o"}, "response": {"old": 1}}))
    fresh = store.serialize({"request": {"model": "gpt-4o"}, "response": {"new": 1}})
    journal = Journal(tmp_path)
    journal.append_many([(target, fresh)])
    assert write_create_only(store, target, fresh) == tmp_path / target.relative(store, 2)  # the orphan's write
    journal._fd, fd = -1, journal._fd  # the proxy dies holding it
    os.close(fd)
    result = recover(store)
    assert (result.written, result.failed) == (1, 0)
    names = sorted(p.name for p in tmp_path.rglob("*.json"))
    assert names == sorted([target.relative(store).name, target.relative(store, 2).name])  # no third


def test_a_writer_that_stops_answering_at_shutdown_is_replaced_by_a_thread(
    loop_thread: LoopThread, tmp_path: Path
) -> None:
    wire = OpenAIWire()
    app = RunningApp(loop_thread, wire.app()).start()
    recordings = tmp_path / "recordings"
    proxy = start_proxy(loop_thread, "record", recordings, upstream=app.url)
    recorder = proxy.server.pipeline.recorder
    assert recorder is not None and recorder.writer_pid is not None
    recorder.stall_seconds = 0.2
    writer = recorder.writer_pid
    os.kill(writer, signal.SIGSTOP)  # stopped: it answers nothing, and never will by itself
    try:
        answered: list[int] = []
        loop_thread.run(_fire(proxy.url, 5, answered, stream=False))
        proxy.stop()  # returns: the stuck writer is killed, the thread writes the 5
    finally:
        app.stop()
        if not _gone(writer):
            os.kill(writer, signal.SIGKILL)
    assert _nonces_on_disk(recordings) == list(range(5))
    assert journals(recordings) == []


def test_the_writer_runs_the_proxys_llmproxy_whatever_the_working_directory(
    loop_thread: LoopThread, tmp_path: Path
) -> None:
    """Started from inside another checkout (a `llmproxy` package in the working directory), the
    writer must import the proxy's own package, not that one."""
    decoy = tmp_path / "checkout"
    (decoy / "llmproxy").mkdir(parents=True)
    (decoy / "llmproxy" / "__init__.py").write_text("")
    wire = OpenAIWire()
    app = RunningApp(loop_thread, wire.app()).start()
    recordings = tmp_path / "recordings"
    # -P: the proxy itself (like the `llmproxy` console script) does not import from its cwd.
    proxy = CliProxy(
        "record", "--upstream", app.url, "--recordings", str(recordings), "--port", "0", cwd=decoy, python_flags=("-P",)
    )
    try:
        answered: list[int] = []
        loop_thread.run(_fire(proxy.url, 3, answered, stream=False))
        wait_until(lambda: len(_nonces_on_disk(recordings)) == 3, "3 recordings")
        writer = _writer_of(proxy)
        events = proxy.stop()
    finally:
        app.stop()
    assert not [e for e in events if e["event"].startswith("file writer process exited")]
    assert _gone(writer)


def test_a_journal_that_cannot_be_appended_to_does_not_stall_the_writer(
    loop_thread: LoopThread, tmp_path: Path
) -> None:
    wire = OpenAIWire()
    app = RunningApp(loop_thread, wire.app()).start()
    recordings = tmp_path / "recordings"
    proxy = CliProxy(
        "record", "--upstream", app.url, "--recordings", str(recordings), "--port", "0", slowdisk="journal-full"
    )
    try:
        answered: list[int] = []
        loop_thread.run(_fire(proxy.url, 6, answered, stream=False))
        wait_until(lambda: len(_nonces_on_disk(recordings)) == 6, "6 recordings, unjournaled")
        events = proxy.stop()
    finally:
        app.stop()
    assert proxy.process.returncode == 0
    assert sorted(answered) == _nonces_on_disk(recordings) == list(range(6))
    failed = [e for e in events if e["event"].startswith("journal not written")]
    assert failed and all("No space left" in e["error"] for e in failed)
    assert next(e for e in events if e["event"] == "summary")["recorded"] == 6


def test_a_writer_stopped_while_idle_does_not_hold_up_shutdown(loop_thread: LoopThread, tmp_path: Path) -> None:
    wire = OpenAIWire()
    app = RunningApp(loop_thread, wire.app()).start()
    proxy = start_proxy(loop_thread, "record", tmp_path / "recordings", upstream=app.url)
    recorder = proxy.server.pipeline.recorder
    assert recorder is not None and recorder.writer_pid is not None
    recorder.stall_seconds = 0.2
    writer = recorder.writer_pid
    try:
        os.kill(writer, signal.SIGSTOP)  # nothing pending: it would never read the end of its feed
        proxy.stop()
    finally:
        app.stop()
        if not _gone(writer):
            os.kill(writer, signal.SIGKILL)
    wait_until(lambda: _gone(writer), "the stopped writer to be killed")


def test_a_slow_writer_that_makes_progress_is_not_taken_for_a_stuck_one(
    loop_thread: LoopThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A long batch on a slow disk: the writer answers as it goes, so stopping waits for it."""
    site = Path(__file__).parent / "slowdisk_site"
    monkeypatch.setenv("LLMPROXY_TEST_SLOWDISK", "0.4")  # the writer process's disk: 0.4 s a file
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
    wire = OpenAIWire()
    app = RunningApp(loop_thread, wire.app()).start()
    recordings = tmp_path / "recordings"
    proxy = start_proxy(loop_thread, "record", recordings, upstream=app.url)
    recorder = proxy.server.pipeline.recorder
    assert recorder is not None and recorder._files is not None
    files = recorder._files
    recorder.stall_seconds = 3.0  # the whole batch takes ~5 s; an answer comes every ~1 s
    try:
        answered: list[int] = []
        loop_thread.run(_fire(proxy.url, 12, answered, stream=False))
        proxy.stop()
    finally:
        app.stop()
    assert not files.killed
    assert _nonces_on_disk(recordings) == list(range(12))


@pytest.mark.parametrize("scope", [None, "tests/test_app.py::TestX::test_one[a b]"])
@pytest.mark.parametrize("model", [None, "gpt-4o", "Models/Weird..Name:1"])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/", "/v1beta/models/gemini:generateContent"])
def test_the_writers_quick_way_names_files_as_name_for_does(
    tmp_path: Path, path: str, model: str | None, scope: str | None
) -> None:
    """write_new (the writer's hot path, str paths and name parts kept per call shape) gives the
    very names name_for gives, and moves on to the next repeat when a name is taken."""
    store = RecordingStore(tmp_path / "recordings")
    key = "0123456789abcdef" * 4
    for sequence in (1, 2):
        target = Target("my-route", path, model, key, sequence, scope)
        data = store.serialize({"request": {"sequence": sequence}, "response": {}})
        written = write_new(store, target, data)
        assert written == str(store.root / target.relative(store))
        assert Path(written).read_bytes() == data
    taken = Target("my-route", path, model, key, 2, scope)
    again = store.serialize({"request": {"sequence": 2, "other": True}, "response": {}})
    assert write_new(store, taken, again) == str(store.root / taken.relative(store, 3))
    assert (store.root / taken.relative(store, 2)).read_bytes() != again  # never replaced


def test_a_key_that_is_not_hex_takes_the_checked_way(tmp_path: Path) -> None:
    """Never from llmproxy, but a journal is a file: a key that would climb out of the directory
    is refused by the store's checks, not written by the quick way."""
    store = RecordingStore(tmp_path / "recordings")
    target = Target("openai", "/v1/chat/completions", None, "/../../../outside", 1)
    with pytest.raises(StoreError, match="outside the recordings directory"):
        write_new(store, target, b"{}\n")
    assert not list(tmp_path.rglob("*outside*"))
