"""Out of the box: `llmproxy replay` with no options serves the shipped seed recording."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import openai
import pytest

from tests.support import REPO, SEED, CliProxy, LoopThread, start_proxy

SEED_MESSAGES = [
    {"role": "user", "content": [{"type": "text", "text": "Which planet do humans live on?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "Humans live on Earth."}]},
    {"role": "user", "content": "Repeat your previous response in all caps."},
]


def _ask_seed(base_url: str) -> str:
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="any-key-works-in-replay", max_retries=0)
    stream = client.chat.completions.create(
        model="gpt-4o", messages=SEED_MESSAGES, response_format={"type": "text"}, stream=True
    )
    return "".join(chunk.choices[0].delta.content or "" for chunk in stream)


def test_seed_replays_through_the_sdk(loop_thread: LoopThread, tmp_path: Path) -> None:
    shutil.copy(SEED, tmp_path / SEED.name)
    proxy = start_proxy(loop_thread, "replay", tmp_path)
    try:
        assert _ask_seed(proxy.url) == "HUMANS LIVE ON EARTH."
    finally:
        proxy.stop()


def test_seed_replays_under_any_file_name(loop_thread: LoopThread, tmp_path: Path) -> None:
    (tmp_path / "nested" / "dir").mkdir(parents=True)
    shutil.copy(SEED, tmp_path / "nested" / "dir" / "renamed-by-a-colleague.json")
    proxy = start_proxy(loop_thread, "replay", tmp_path)
    try:
        assert _ask_seed(proxy.url) == "HUMANS LIVE ON EARTH."
    finally:
        proxy.stop()


def test_the_shipped_seed_is_unchanged() -> None:
    shared_seed = REPO.parent / "shared" / "seeds" / SEED.name
    if not shared_seed.exists():
        pytest.skip(f"shared seed not present at {shared_seed}")
    assert SEED.read_bytes() == shared_seed.read_bytes()


def test_cli_replay_with_no_options_serves_the_seed() -> None:
    """The README's first command: `llmproxy replay` from the repo root (port 0 to stay free)."""
    proxy = CliProxy("replay", "--port", "0")
    try:
        assert _ask_seed(proxy.url) == "HUMANS LIVE ON EARTH."
    finally:
        events = {event["event"]: event for event in proxy.stop()}
    assert events["recordings loaded"]["recordings"] == 1
    assert events["summary"]["hits"] == 1 and events["summary"]["misses"] == 0


def test_cli_settings_come_from_env_and_config_and_cli_wins(tmp_path: Path) -> None:
    config = tmp_path / "llmproxy.toml"
    recordings = tmp_path / "from-config"
    recordings.mkdir()
    shutil.copy(SEED, recordings / SEED.name)
    config.write_text(f'[proxy]\nrecordings = "{recordings}"\nport = 1\n')
    # Port 1 from the config is overridden by the environment, which the CLI then overrides.
    proxy = CliProxy("replay", "--config", str(config), "--port", "0", env={"LLMPROXY_PORT": "2"})
    try:
        assert _ask_seed(proxy.url) == "HUMANS LIVE ON EARTH."
    finally:
        proxy.stop()
    env_proxy = CliProxy("replay", "--config", str(config), env={"LLMPROXY_PORT": "0"})
    try:
        assert _ask_seed(env_proxy.url) == "HUMANS LIVE ON EARTH."
    finally:
        env_proxy.stop()


def test_cli_help_and_bad_config_are_readable(tmp_path: Path) -> None:
    for args in (["--help"], ["record", "--help"], ["replay", "--help"]):
        result = subprocess.run([sys.executable, "-m", "llmproxy", *args], capture_output=True, text=True)
        assert result.returncode == 0 and "Usage:" in result.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text("[proxy\nport = ")
    result = subprocess.run(
        [sys.executable, "-m", "llmproxy", "replay", "--config", str(bad)], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "not valid TOML" in result.stderr
    assert "Traceback" not in result.stderr
    result = subprocess.run(
        [sys.executable, "-m", "llmproxy", "replay", "--timing", "sometimes"], capture_output=True, text=True
    )
    assert result.returncode == 2 and "timing must be" in result.stderr


def test_the_shipped_example_config_is_valid() -> None:
    from llmproxy.config import load_settings

    settings = load_settings(REPO / "config.example.toml", {})
    assert [route.name for route in settings.routes] == ["openai", "anthropic", "ollama", "gemini"]
    assert settings.router().resolve("POST", "/v1/messages", {}).route.name == "anthropic"  # type: ignore[union-attr]
