"""The file writer process (store/fileproc.py): what happens when it or the proxy dies.

Each request carries a nonce in its body, so every answered request is matched with its file;
the writer is held with SIGSTOP (it reads nothing) so the tests decide what it has done.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from llmproxy.store.journal import journals
from tests.support import CliProxy, LoopThread, RunningApp, children_of, wait_until
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
    command = Path(f"/proc/{writers[0]}/cmdline").read_bytes().split(b"\0")
    assert b"llmproxy.store.fileproc" in command
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
