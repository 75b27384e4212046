"""The README is executed: every shell and Python block runs, in order, in a sandbox, so the
walkthroughs cannot drift from what llmproxy does.

The sandbox
- A copy of the repository in a temp directory; each block runs there in a fresh `bash`, with
  `.venv` activated once a set-up block has made it (the README says every command assumes so).
- Offline and local: `https://api.openai.com` in a block, and LLMPROXY_UPSTREAM (the default
  upstream a reader's proxy would use), point at a local OpenAI-style upstream
  (tests/upstreams/openai_wire.py); OPENAI_API_KEY is a fake key, as a reader's would be real.
- Set-up blocks run as written (`python3 -m venv`, `pip install -e '.[extra]'`), but pip installs
  only the project itself (PIP_NO_INDEX, PIP_NO_DEPS): its dependencies and their commands come
  from this test environment, linked into the new virtualenv. What pip would have fetched is
  checked instead: every package a Python block imports is declared in the extras the set-up
  commands install.
- Port 8765 in a block becomes a free port, and a background command gets it as LLMPROXY_PORT.

Markers: an HTML comment right before a block, `<!-- readme-test: ... -->`
- `background`: the block ends in a long-running command (a proxy). The test starts it, waits
  for its `listening` log line, leaves it running for the blocks after it, and stops it with
  Ctrl-C (SIGINT) when the next background block starts or the README ends; it must then exit 0.
- `file NAME`: a Python block that is a file the next blocks run: written to NAME, and a later
  block must run it.
- `expect TEXT`: the block's output must contain TEXT.
- `same-output-as-previous`: the block's output must equal the previous block's, byte for byte,
  and the upstream must not be called meanwhile (a replay answers it).
- `env NAME=VALUE`: set for this block. The one use: the test set-up block runs pytest with
  `--collect-only` (the suite itself is what CI runs; collecting proves it is ready to run).
- `check-help`: commands too long to run here (the benchmark); each line's module must accept
  every `--flag` the line names (checked against its `--help`).
Blocks in other languages (json, plain text) are examples of output, not commands: not run.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import REPO, LoopThread, RunningApp, free_port
from tests.upstreams.openai_wire import OpenAIWire

BLOCK = re.compile(r"(?:<!-- readme-test: (?P<marker>[^>]*?) -->\n)?```(?P<lang>[a-z]*)\n(?P<body>.*?)```", re.DOTALL)
RUNNABLE = {"sh", "python"}
README_PORT = "8765"
LIVE_UPSTREAM = "https://api.openai.com"
COPIED = ["llmproxy", "tests", "bench", "recordings", "pyproject.toml", "README.md", "config.example.toml"]


@dataclass
class Block:
    number: int
    lang: str
    body: str
    marker: str

    @property
    def kind(self) -> str:
        return self.marker.split(" ", 1)[0] if self.marker else ""

    @property
    def argument(self) -> str:
        return self.marker.split(" ", 1)[1] if " " in self.marker else ""


def readme_blocks() -> list[Block]:
    text = (REPO / "README.md").read_text()
    return [
        Block(number, match["lang"], match["body"], (match["marker"] or "").strip())
        for number, match in enumerate(BLOCK.finditer(text), 1)
    ]


# `python3` in the sandbox: the test's interpreter, whose `-m venv` also links this test
# environment's packages (and their commands) into the new virtualenv, so that the pip install
# of the set-up blocks can run offline.
PYTHON_SHIM = """#!{python}
import importlib.metadata, os, subprocess, sys

args = sys.argv[1:]
if args[:2] != ["-m", "venv"]:
    os.execv({python!r}, [{python!r}, *args])
status = subprocess.call([{python!r}, *args])
target = os.path.abspath(args[-1])
purelib = subprocess.check_output(
    [os.path.join(target, "bin", "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
    text=True,
).strip()
with open(os.path.join(purelib, "_readme_test_environment.pth"), "w") as handle:
    handle.write({site!r} + "\\n")
for dist in importlib.metadata.distributions():
    if dist.metadata["Name"] == "llmproxy":
        continue
    for entry in dist.entry_points.select(group="console_scripts"):
        script = os.path.join(target, "bin", entry.name)
        if os.path.exists(script):
            continue
        module, _, attr = entry.value.partition(":")
        with open(script, "w") as handle:
            handle.write(
                "#!" + os.path.join(target, "bin", "python") + "\\nimport sys\\nfrom " + module + " import "
                + attr.split(".")[0] + " as main\\nsys.exit(main" + "".join("." + p for p in attr.split(".")[1:])
                + "())\\n"
            )
        os.chmod(script, 0o755)
sys.exit(status)
"""


class Background:
    """A long-running block: started, read to its end in a thread, stopped with Ctrl-C."""

    def __init__(self, block: Block, script: str, cwd: Path, env: dict[str, str]) -> None:
        self.block = block
        self.process = subprocess.Popen(
            ["bash", "-c", script],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own process group, as a terminal's foreground job
        )
        self.output: list[str] = []
        self._listening = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.output.append(line)
            if "listening" in line:
                self._listening.set()
        self._listening.set()  # ended: wake the waiter, who sees it did not listen

    def wait_listening(self) -> None:
        # Generous: a set-up block creates a virtualenv first. Only a hang reaches it.
        assert self._listening.wait(300), f"block {self.block.number} never listened"
        assert self.process.poll() is None, f"block {self.block.number} exited:\n{''.join(self.output)}"

    def stop(self) -> str:
        os.killpg(self.process.pid, signal.SIGINT)  # Ctrl-C
        status = self.process.wait(60)
        self._reader.join(10)
        output = "".join(self.output)
        assert status == 0, f"block {self.block.number} exited {status} on Ctrl-C:\n{output}"
        assert "summary" in output, output
        return output


def _sandbox(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".*")
    for name in COPIED:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, repo / name, ignore=ignore)
        else:
            shutil.copy2(source, repo / name)
    return repo


def _environment(tmp_path: Path, upstream: str) -> dict[str, str]:
    shim_dir = tmp_path / "bin"
    shim_dir.mkdir()
    site = sysconfig.get_paths()["purelib"]
    shim = shim_dir / "python3"
    shim.write_text(PYTHON_SHIM.format(python=sys.executable, site=site))
    shim.chmod(0o755)
    keep = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OPENAI_", "ANTHROPIC_", "LLMPROXY_", "PYTEST_", "PIP_"))
        and k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")
    }
    path = [str(shim_dir)] + [p for p in keep.get("PATH", "/usr/bin:/bin").split(os.pathsep) if ".venv" not in p]
    return {
        **keep,
        "PATH": os.pathsep.join(path),
        "PIP_NO_INDEX": "1",
        "PIP_NO_DEPS": "1",
        "PIP_NO_BUILD_ISOLATION": "0",  # pip's spelling of --no-build-isolation
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "OPENAI_API_KEY": "sk-readme-test-not-a-real-key-0000000000",
        "LLMPROXY_UPSTREAM": upstream,
    }


ACTIVATE = "if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi\n"


def _prepare(block: Block, port: str, upstream: str) -> str:
    return block.body.replace(README_PORT, port).replace(LIVE_UPSTREAM, upstream)


def _check_help(block: Block, cwd: Path, env: dict[str, str]) -> None:
    for line in block.body.splitlines():
        if not line.strip():
            continue
        words = shlex.split(line.replace("#", " "))
        command = []
        for word in words:
            if word.startswith("--"):
                break
            command.append(word)
        result = subprocess.run(
            ["bash", "-c", ACTIVATE + shlex.join([*command, "--help"])],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        for flag in (word for word in words if word.startswith("--")):
            assert flag in result.stdout, f"{line!r}: {shlex.join(command)} has no {flag}"


def _imports(source: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names)


def test_every_package_the_walkthroughs_import_is_in_the_extras_the_setup_installs() -> None:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    blocks = readme_blocks()
    installs = [re.findall(r"pip install -e '\.\[(\w+)\]'", b.body) for b in blocks if b.lang == "sh"]
    chosen = [extra for found in installs for extra in found]
    assert len(chosen) == 2, chosen  # the two set-up commands
    imported = set().union(*(_imports(b.body) for b in blocks if b.lang == "python"))
    assert imported, "the README has Python blocks"
    for extra in chosen:
        declared = {re.split(r"[<>=\[ ;]", requirement)[0].lower() for requirement in extras[extra]}
        assert imported <= declared, f"pip install -e '.[{extra}]' does not install {imported - declared}"


def test_every_shell_and_python_block_of_the_readme_runs(loop_thread: LoopThread, tmp_path: Path) -> None:
    wire = OpenAIWire()
    upstream = RunningApp(loop_thread, wire.app()).start()
    repo = _sandbox(tmp_path)
    env = _environment(tmp_path, upstream.url)
    port = str(free_port())
    blocks = [b for b in readme_blocks() if b.lang in RUNNABLE]
    assert len(blocks) >= 10, [b.body[:40] for b in blocks]
    background: Background | None = None
    previous_output: str | None = None
    files: dict[str, int] = {}
    ran: list[str] = []
    try:
        for block in blocks:
            body = _prepare(block, port, upstream.url)
            if block.kind == "file":
                name = block.argument
                (repo / name).write_text(body)
                files[name] = block.number
                continue
            if block.kind == "check-help":
                _check_help(block, repo, env)
                continue
            if block.kind == "background":
                if background is not None:
                    background.stop()
                background = Background(block, ACTIVATE + body, repo, {**env, "LLMPROXY_PORT": port})
                background.wait_listening()
                ran.append(body)
                continue
            block_env = dict(env)
            if block.kind == "env":
                name, _, value = block.argument.partition("=")
                block_env[name] = value
            if block.lang == "python":
                script = repo / f"readme_block_{block.number}.py"
                script.write_text(body)
                body = f"python {script.name}"
            calls_before = len(wire.requests)
            result = subprocess.run(
                ["bash", "-euo", "pipefail", "-c", ACTIVATE + body],
                cwd=repo,
                env=block_env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert result.returncode == 0, f"block {block.number} failed:\n{body}\n{result.stdout}\n{result.stderr}"
            assert "Traceback" not in result.stderr, result.stderr
            assert "does not provide the extra" not in result.stdout + result.stderr
            if block.kind == "expect":
                assert block.argument in result.stdout, (block.argument, result.stdout)
            if block.kind == "same-output-as-previous":
                assert previous_output and result.stdout == previous_output, (previous_output, result.stdout)
                assert len(wire.requests) == calls_before, "answered by the upstream, not by replay"
            previous_output = result.stdout
            ran.append(body)
    finally:
        if background is not None:
            try:
                background.stop()
            finally:
                upstream.stop()
        else:
            upstream.stop()
    for name, number in files.items():
        assert any(name in body for body in ran), f"the file of block {number} ({name}) is never run"
    assert wire.requests, "the walkthroughs recorded from the local upstream"


@pytest.mark.parametrize("marker", sorted({b.kind for b in readme_blocks() if b.marker}))
def test_readme_markers_are_the_documented_ones(marker: str) -> None:
    assert marker in {"background", "file", "expect", "same-output-as-previous", "env", "check-help"}
