"""Each test owns its recordings: scoped by node id under the pytest plugin, by the
x-llmproxy-scope header for any client, with the shared recordings as the fallback."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from llmproxy.store.directory import RecordingStore, scope_path
from tests.support import LoopThread, RunningApp, files_under, start_proxy
from tests.test_pytest_plugin import run_pytest
from tests.upstreams.openai_wire import OpenAIWire


class CountingWire(OpenAIWire):
    """Answers its Nth chat call "ECHO: CALL N": the same request gets a new answer each time,
    so which recording a test was served shows in its answer."""

    async def _note(self, request: web.Request) -> dict[str, Any]:
        body = await super()._note(request)
        if body.get("messages"):
            body = {**body, "messages": [{"role": "user", "content": f"call {len(self.requests)}"}]}
        return body


# Every test sends the very same request; each writes the answers it got to ANSWERS/<test>.
PROJECT = """
import os
import pathlib

import openai
import pytest


def ask():
    client = openai.OpenAI(max_retries=0)
    answer = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "same question"}])
    return answer.choices[0].message.content


def note(name, *answers):
    folder = pathlib.Path(os.environ["ANSWERS"])
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(" / ".join(answers))


def test_one():
    note("test_one", ask())


def test_two():
    note("test_two", ask(), ask())  # an ordered repeat within the test
"""

QUESTION = {"model": "gpt-4o", "messages": [{"role": "user", "content": "same question"}]}


def _project(tmp_path: Path, source: str = PROJECT, name: str = "test_app.py") -> Path:
    project = tmp_path / "project"
    project.mkdir()
    (project / name).write_text(source)
    return project


def _answers(folder: Path) -> dict[str, str]:
    answers = {path.name: path.read_text() for path in folder.iterdir()}
    for path in folder.iterdir():
        path.unlink()
    return answers


def _pytest(project: Path, answers: Path, *args: str) -> str:
    result = run_pytest(project, *args, env={"ANSWERS": str(answers)})
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _record(loop_thread: LoopThread, project: Path, answers: Path, wire: OpenAIWire, *args: str) -> str:
    app = RunningApp(loop_thread, wire.app()).start()
    try:
        return _pytest(project, answers, "--llmproxy-mode", "record", "--llmproxy-upstream", app.url, *args)
    finally:
        app.stop()


def _scope_of(path: Path) -> str | None:
    return orjson.loads(path.read_bytes())["request"].get("scope")


def test_two_tests_sending_the_same_request_get_their_own_answers_whatever_runs(
    loop_thread: LoopThread, tmp_path: Path
) -> None:
    project, answers = _project(tmp_path), tmp_path / "answers"
    wire = CountingWire()
    _record(loop_thread, project, answers, wire)
    assert len(wire.requests) == 3
    assert _answers(answers) == {"test_one": "ECHO: CALL 1", "test_two": "ECHO: CALL 2 / ECHO: CALL 3"}
    # Readable paths, one directory per test, the node id in each file.
    recordings = project / "recordings"
    files = files_under(recordings)
    assert [path.relative_to(recordings).parts[:3] for path in files] == [
        ("test_app", "test_one", "openai"),
        ("test_app", "test_two", "openai"),
        ("test_app", "test_two", "openai"),
    ]
    assert [_scope_of(path) for path in files] == ["test_app.py::test_one"] + ["test_app.py::test_two"] * 2

    wire.requests.clear()
    _pytest(project, answers, "--llmproxy-mode", "replay", "-k", "test_two")  # test_two alone
    assert _answers(answers) == {"test_two": "ECHO: CALL 2 / ECHO: CALL 3"}
    _pytest(project, answers, "--llmproxy-mode", "replay", "-k", "test_two or test_one", "-p", "xdist", "-n", "2")
    assert _answers(answers) == {"test_one": "ECHO: CALL 1", "test_two": "ECHO: CALL 2 / ECHO: CALL 3"}
    assert wire.requests == []


def test_re_recording_one_test_replaces_its_files_and_leaves_the_others_untouched(
    loop_thread: LoopThread, tmp_path: Path
) -> None:
    project, answers = _project(tmp_path), tmp_path / "answers"
    wire = CountingWire()
    _record(loop_thread, project, answers, wire)
    recordings = project / "recordings"
    one = recordings / "test_app" / "test_one"
    before = {path: (path.read_bytes(), path.stat().st_mtime_ns) for path in files_under(one)}
    old_two = {path.name for path in files_under(recordings / "test_app" / "test_two")}

    stdout = _record(loop_thread, project, answers, wire, "-k", "test_two")  # calls 4 and 5
    assert "2 recorded" in stdout
    assert {path: (path.read_bytes(), path.stat().st_mtime_ns) for path in files_under(one)} == before
    two = files_under(recordings / "test_app" / "test_two")
    assert {path.name for path in two} == old_two  # replaced: no third and fourth repeat beside them
    documents = sorted((json.loads(path.read_text()) for path in two), key=lambda d: d["request"].get("sequence", 1))
    contents = [document["response"]["body"]["__data__"]["choices"][0]["message"]["content"] for document in documents]
    assert contents == ["ECHO: CALL 4", "ECHO: CALL 5"]

    _pytest(project, answers, "--llmproxy-mode", "replay")
    assert _answers(answers) == {"test_one": "ECHO: CALL 1", "test_two": "ECHO: CALL 4 / ECHO: CALL 5"}


def _post(url: str, scope: str | None) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json", "Authorization": "Bearer sk-test-scope-key-0000000000000000"}
    if scope is not None:
        headers["X-LLMProxy-Scope"] = scope
    request = urllib.request.Request(f"{url}/v1/chat/completions", orjson.dumps(QUESTION), headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _content(answer: dict[str, Any]) -> str:
    return answer["choices"][0]["message"]["content"]


def test_a_raw_client_chooses_its_scope_by_header_which_never_reaches_the_upstream(
    loop_thread: LoopThread, tmp_path: Path
) -> None:
    wire = CountingWire()
    app = RunningApp(loop_thread, wire.app()).start()
    recordings = tmp_path / "recordings"
    proxy = start_proxy(loop_thread, "record", recordings, upstream=app.url)
    try:
        sent = [_post(proxy.url, scope) for scope in ("checkout", "signup", None, "checkout")]
    finally:
        proxy.stop()
        app.stop()
    assert [_content(answer) for _, answer in sent] == [f"ECHO: CALL {n}" for n in (1, 2, 3, 4)]
    assert all("x-llmproxy-scope" not in {name.lower() for name in call["headers"]} for call in wire.requests)
    by_scope: dict[str | None, list[str]] = {}
    for path in files_under(recordings):
        document = orjson.loads(path.read_bytes())
        assert "x-llmproxy-scope" not in document["request"]["headers"]
        by_scope.setdefault(_scope_of(path), []).append(str(path.relative_to(recordings).parent))
    assert by_scope == {"checkout": ["checkout/openai"] * 2, "signup": ["signup/openai"], None: ["openai"]}

    replay = start_proxy(loop_thread, "replay", recordings)
    try:
        answers = {scope: _content(_post(replay.url, scope)[1]) for scope in ("signup", "checkout", None)}
        assert answers == {"signup": "ECHO: CALL 2", "checkout": "ECHO: CALL 1", None: "ECHO: CALL 3"}
        assert _content(_post(replay.url, "checkout")[1]) == "ECHO: CALL 4"  # its own second repeat
        assert _content(_post(replay.url, "elsewhere")[1]) == "ECHO: CALL 3"  # no recording there: the shared one
        assert _content(_post(replay.url, "")[1]) == "ECHO: CALL 3"  # an empty scope is the shared one
    finally:
        replay.stop()

    strict = start_proxy(loop_thread, "replay", recordings, config=_config(tmp_path, "scope_fallback = false"))
    try:
        status, error = _post(strict.url, "elsewhere")
        assert status == 404
        assert "in scope elsewhere." in error["error"]["message"]
        assert _content(_post(strict.url, "signup")[1]) == "ECHO: CALL 2"
    finally:
        strict.stop()
    report = strict.server.report()
    assert [(miss["path"], miss["scope"]) for miss in report["misses"]] == [("/v1/chat/completions", "elsewhere")]


def _config(tmp_path: Path, line: str) -> Path:
    path = tmp_path / "llmproxy.toml"
    path.write_text(f"[proxy]\n{line}\n")
    return path


ONE = """
import openai


def test_one():
    answer = openai.OpenAI(max_retries=0).chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "same question"}]
    )
    assert answer.choices[0].message.content == "ECHO: CALL 1"
"""


def test_a_test_without_recordings_of_its_own_falls_back_to_the_shared_ones(
    loop_thread: LoopThread, tmp_path: Path
) -> None:
    """Files recorded outside pytest answer a test; with the fallback off the test misses, and
    the report and the summary name the test."""
    project = _project(tmp_path, ONE)
    wire = CountingWire()
    app = RunningApp(loop_thread, wire.app()).start()
    proxy = start_proxy(loop_thread, "record", project / "recordings", upstream=app.url)
    try:
        assert _content(_post(proxy.url, None)[1]) == "ECHO: CALL 1"
    finally:
        proxy.stop()
        app.stop()

    replayed = run_pytest(project, "--llmproxy-mode", "replay", "-p", "no:xdist")
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    assert "mode replay: 1 hit(s), 0 miss(es)" in replayed.stdout

    (project / "pytest.ini").write_text("[pytest]\nllmproxy_scope_fallback = false\n")
    report = tmp_path / "usage.json"
    strict = run_pytest(project, "--llmproxy-mode", "replay", "-p", "no:xdist", "--llmproxy-report", str(report))
    assert strict.returncode == 1, strict.stdout + strict.stderr
    assert "in scope test_app.py::test_one." in strict.stdout  # the miss message
    assert "missed POST /v1/chat/completions (model gpt-4o, key" in strict.stdout
    assert ") in test_app.py::test_one" in strict.stdout  # the terminal summary
    assert [miss["scope"] for miss in json.loads(report.read_text())["misses"]] == ["test_app.py::test_one"]


MARKED = """
import openai
import pytest

pytestmark = pytest.mark.llmproxy(scope="module")


def ask():
    answer = openai.OpenAI(max_retries=0).chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "same question"}]
    )
    return answer.choices[0].message.content


@pytest.mark.llmproxy(mode="replay", scope="shared")
def test_frozen():
    assert ask() == "ECHO: CALL 1"  # recorded outside pytest, never recorded again


def test_live():
    assert ask() == "ECHO: CALL 2"


class TestGroup:
    pytestmark = pytest.mark.llmproxy(scope="class")

    def test_in_class(self):
        assert ask() == "ECHO: CALL 3"
"""


def test_marks_give_a_test_its_own_mode_and_scope(loop_thread: LoopThread, tmp_path: Path) -> None:
    project = _project(tmp_path, MARKED, "test_marks.py")
    recordings = project / "recordings"
    wire = CountingWire()
    app = RunningApp(loop_thread, wire.app()).start()
    try:
        proxy = start_proxy(loop_thread, "record", recordings, upstream=app.url)
        try:
            _post(proxy.url, None)  # the shared recording (call 1)
        finally:
            proxy.stop()
        shared = files_under(recordings)
        assert len(shared) == 1
        recorded = run_pytest(project, "--llmproxy-mode", "record", "--llmproxy-upstream", app.url, "-p", "no:xdist")
    finally:
        app.stop()
    assert recorded.returncode == 0, recorded.stdout + recorded.stderr
    assert len(wire.requests) == 3  # the replayed test never went upstream
    scopes = {_scope_of(path): str(path.relative_to(recordings).parent) for path in files_under(recordings)}
    assert scopes == {
        None: "openai",
        "test_marks.py": "test_marks/openai",
        "test_marks.py::TestGroup": "test_marks/testgroup/openai",
    }
    assert shared[0] in files_under(recordings)  # record never replaces shared files

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "test_bad.py").write_text(
        "import pytest\n\n@pytest.mark.llmproxy(mode='sometimes')\ndef test_x():\n    pass\n"
    )
    refused = run_pytest(bad, "-p", "no:xdist")
    assert refused.returncode == 4
    assert "llmproxy mode must be one of record, record-missing, replay, not 'sometimes'" in refused.stderr


def test_removing_a_scope_removes_its_own_files_only(tmp_path: Path) -> None:
    """Node ids can share a directory (a module `test_one.py` beside a test `test_one`, names that
    slug alike): only the files whose request.scope is the scope go."""
    store = RecordingStore(tmp_path)
    scope = "tests/test_app.py::test_one"
    nested = "tests/test_app/test_one.py::test_x"
    alike = "tests/test_app.py::Test_One"
    assert scope_path(scope) == Path("tests/test_app/test_one")
    assert scope_path(nested) == Path("tests/test_app/test_one/test_x")

    def document(owner: str | None) -> dict[str, Any]:
        request: dict[str, Any] = {"method": "POST", "url": "https://api.openai.com/v1/chat/completions"}
        if owner is not None:
            request["scope"] = owner
        return {"request": request, "response": {"status": 200, "body": {}}}

    mine = store.write(scope_path(scope) / "openai" / "a.json", document(scope))
    kept = [
        store.write(scope_path(nested) / "openai" / "b.json", document(nested)),
        store.write(scope_path(alike) / "openai" / "c.json", document(alike)),
        store.write(scope_path(scope) / "openai" / "d.json", document(None)),
        store.write(Path("openai") / "e.json", document(None)),
    ]
    (tmp_path / scope_path(scope) / "openai" / "broken.json").write_text("{")
    assert store.remove_scope(scope) == [mine]
    assert not mine.exists()
    assert all(path.exists() for path in kept)
