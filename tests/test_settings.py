"""Settings have one table (llmproxy/config.py OPTIONS): the command line, config.example.toml and
the README are checked against it; start-up refuses what cannot work, in one line; logs name
their logger."""

from __future__ import annotations

import gc
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import openai
import pytest

from llmproxy.config import FILE_KEYS, OPTIONS, Mode, Settings, load_settings, options_markdown
from llmproxy.errors import ConfigError, LlmproxyError, StartupError
from llmproxy.store.directory import StoreError
from llmproxy.store.document import RecordingError
from llmproxy.tools.report import ReportError
from tests.support import REPO, CliProxy, LoopThread, free_port, start_proxy


def llmproxy(*args: str, cwd: Path = REPO, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llmproxy", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        timeout=60,
    )


def test_the_readme_options_table_is_the_settings_table() -> None:
    readme = (REPO / "README.md").read_text()
    assert options_markdown() in readme, "regenerate the README table with llmproxy.config.options_markdown()"


def test_config_example_lists_every_file_setting_with_its_default() -> None:
    text = (REPO / "config.example.toml").read_text()
    proxy = tomllib.loads(text)["proxy"]
    commented = set(re.findall(r"^# (\w+) = ", text, re.MULTILINE))
    assert set(proxy) <= set(FILE_KEYS), set(proxy) - set(FILE_KEYS)
    assert set(FILE_KEYS) <= set(proxy) | commented, set(FILE_KEYS) - set(proxy) - commented
    for key, value in proxy.items():
        default = FILE_KEYS[key].default
        assert value == (list(default) if isinstance(default, tuple) else default), key
    for key, option in FILE_KEYS.items():
        if option.env:
            line = next(line for line in text.splitlines() if re.match(rf"^(# )?{key} = ", line))
            assert option.env in line, f"config.example.toml: {key} should name {option.env}"


def test_settings_defaults_come_from_the_table() -> None:
    settings = Settings()
    for option in OPTIONS:
        derived = ("max_body_mb", "secret_patterns", "secret_allow", "max_file_mb", "recordings")
        if option.key in derived or not hasattr(settings, option.key):
            continue
        assert getattr(settings, option.key) == option.default, option.key
    assert settings.max_body_bytes == FILE_KEYS["max_body_mb"].default * 1024 * 1024
    assert str(settings.recordings) == FILE_KEYS["recordings"].default


@pytest.mark.parametrize("command", ["record", "replay", "run"])
def test_help_lists_every_option_of_the_table(command: str) -> None:
    result = llmproxy(command, "--help", env={"COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    for option in OPTIONS:
        if option.flag and command in option.commands:
            assert option.flag in result.stdout, option.flag
            assert option.help.replace("`", "")[:40] in result.stdout, option.key


def test_one_exception_tree() -> None:
    for error in (ConfigError, StartupError, StoreError, RecordingError, ReportError):
        assert issubclass(error, LlmproxyError)
    assert issubclass(ConfigError, ValueError) and issubclass(RecordingError, ValueError)  # older callers


def _one_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_replay_refuses_a_missing_recordings_directory_unless_allowed(tmp_path: Path) -> None:
    missing = tmp_path / "recrodings"  # a typo
    result = llmproxy("replay", "--recordings", str(missing), "--port", "0")
    assert result.returncode == 1
    assert f"recordings directory {missing} does not exist" in _one_line(result)
    a_file = tmp_path / "file"
    a_file.write_text("")
    result = llmproxy("replay", "--recordings", str(a_file), "--port", "0")
    assert result.returncode != 0 and "Traceback" not in result.stderr

    proxy = CliProxy("replay", "--recordings", str(missing), "--port", "0", "--allow-empty")
    try:
        client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.NotFoundError, match="llmproxy has no recording"):
            client.models.list()
    finally:
        proxy.stop()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any directory: unreadable cannot be set up")
def test_replay_refuses_an_unreadable_recordings_directory(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0)
    try:
        result = llmproxy("replay", "--recordings", str(locked), "--port", "0")
    finally:
        locked.chmod(0o755)
    assert result.returncode == 1 and "cannot be read" in _one_line(result)


def test_record_missing_creates_its_directory_and_is_not_refused(tmp_path: Path) -> None:
    proxy = CliProxy("record", "--missing", "--recordings", str(tmp_path / "new"), "--port", "0")
    assert proxy.stop()[-1]["event"] == "summary"


@pytest.mark.parametrize(
    ("args", "env", "config", "expected"),
    [
        (["record", "--upstream", "api.openai.com"], {}, None, "--upstream must be a URL with scheme and host"),
        (["record"], {"LLMPROXY_UPSTREAM": "api.openai.com"}, None, "--upstream must be a URL with scheme and host"),
        (["record"], {}, '[[routes]]\nname = "x"\nupstream = "localhost:11434"\n', "must be a URL with scheme"),
        (["replay", "--on-miss", "sometimes"], {}, None, "'sometimes' is not one of 'error', 'forward'"),
        (["replay"], {"LLMPROXY_ON_MISS": "sometimes"}, None, "'sometimes' is not one of 'error', 'forward'"),
        (["replay"], {}, '[proxy]\non_miss = "sometimes"\n', "on_miss must be one of error, forward"),
        (["replay"], {}, '[proxy]\nclient_disconnect = "keep"\n', "client_disconnect must be one of discard, drain"),
        (["replay", "--log-level", "loud"], {}, None, "'loud' is not one of"),
        (["replay", "--timing", "x0"], {}, None, "timing must be"),
        (["run", "replay", "--after-last", "never", "--", "true"], {}, None, "'never' is not one of"),
    ],
)
def test_start_up_refuses_what_cannot_work_in_one_line(
    tmp_path: Path, args: list[str], env: dict[str, str], config: str | None, expected: str
) -> None:
    (tmp_path / "recordings").mkdir()
    if config is not None:
        (tmp_path / "llmproxy.toml").write_text(config)
    result = (
        llmproxy(*args, "--port", "0", cwd=tmp_path, env=env) if "--" not in args else llmproxy(*args, cwd=tmp_path)
    )
    assert result.returncode == 2
    assert expected in _one_line(result)


NUMBER_FLAGS = [option for option in OPTIONS if option.flag and option.kind in (int, float, (int, float))]


@pytest.mark.parametrize("option", NUMBER_FLAGS, ids=lambda option: option.flag)
def test_number_options_are_taken_from_the_command_line_and_the_environment(tmp_path: Path, option: Any) -> None:
    assert option.flag and option.env
    (tmp_path / "recordings").mkdir()
    value = (
        "0"
        if option.key == "port"
        else "2.5"
        if float in (option.kind if isinstance(option.kind, tuple) else ())
        else "3"
    )
    command = "replay" if not option.commands or "replay" in option.commands else "record"
    base = [command, "--recordings", str(tmp_path / "recordings")]
    port = [] if option.key == "port" else ["--port", "0"]
    for args, env in ((base + port + [option.flag, value], {}), (base + port, {option.env: value})):
        proxy = CliProxy(*args, cwd=tmp_path, env=env)
        proxy.stop()
    refused = llmproxy(*base, *port, option.flag, "many", cwd=tmp_path)
    assert refused.returncode == 2
    assert option.flag in refused.stderr and "'many'" in refused.stderr
    if option.kind is not int:
        for endless in ("nan", "inf", "1e400"):
            for args, env in (([*base, *port, option.flag, endless], {}), ([*base, *port], {option.env: endless})):
                result = llmproxy(*args, cwd=tmp_path, env=env)
                assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
                assert len(result.stderr.strip().splitlines()) == 1 and "finite" in result.stderr


def test_run_takes_the_serving_options_honours_port_and_names_itself_in_a_miss(tmp_path: Path) -> None:
    port = free_port()
    child = tmp_path / "child.py"
    child.write_text(
        "import os, openai\n"
        "print(os.environ['OPENAI_BASE_URL'])\n"
        "try:\n"
        "    openai.OpenAI(max_retries=0).models.list()\n"
        "except openai.NotFoundError as exc:\n"
        "    print(exc.message)\n"
    )
    (tmp_path / "recordings").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmproxy",
            "run",
            "replay",
            "--port",
            str(port),
            "--on-miss",
            "error",
            "--timing",
            "realtime",
            "--after-last",
            "error",
            "--recordings",
            "recordings",
            "--",
            sys.executable,
            str(child),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    base_url, message = result.stdout.splitlines()[:2]
    assert base_url == f"http://127.0.0.1:{port}/openai/v1"
    assert f"llmproxy run record-missing --recordings recordings -- {sys.executable} {child}" in message


def test_logs_name_their_logger(tmp_path: Path) -> None:
    proxy = CliProxy("replay", "--recordings", str(tmp_path), "--port", "0")
    events = proxy.stop()
    by_name = {event["event"]: event.get("logger") for event in events}
    assert by_name["listening"] == "llmproxy.server"
    assert by_name["recordings loaded"] == "llmproxy.playback"


def test_each_request_binds_its_context_once_for_every_line_it_logs(tmp_path: Path) -> None:
    """Lines that name nothing themselves still carry the request they belong to, and one request's
    context never leaks into the next one on the same connection."""
    import http.client

    proxy = CliProxy("replay", "--recordings", str(tmp_path), "--port", "0", "--allow-empty")
    try:
        connection = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
        body = b'{"model": "gpt-4o", "messages": []}'
        headers = {"Content-Type": "application/json"}
        connection.request("POST", "/v1/chat/completions", body=body, headers=headers)
        missed = connection.getresponse()
        assert missed.status == 404 and b"recording_not_found" in missed.read()
        connection.request("TRACE", "/elsewhere")  # same connection, refused before routing
        assert connection.getresponse().status == 405
        connection.close()
    finally:
        events = proxy.stop()
    [miss] = [e for e in events if e["event"] == "replay miss"]
    assert miss["route"] == "openai" and miss["method"] == "POST" and len(miss["key"]) == 16
    [refused] = [e for e in events if e["event"] == "method not allowed"]
    assert refused["path"] == "/elsewhere" and "route" not in refused and "key" not in refused


def test_modes_are_an_enum() -> None:
    assert [mode.value for mode in Mode] == ["record", "record-missing", "replay"]


def test_options_without_a_flag_are_taken_from_the_environment(tmp_path: Path) -> None:
    """A file-only option set as LLMPROXY_<KEY> takes effect over the config file's value (a
    fraction of a MB, for an option that takes an integer or a number); a bad value is refused
    in one line naming it."""
    (tmp_path / "llmproxy.toml").write_text("[proxy]\nmax_body_mb = 64\n")
    proxy = CliProxy(
        "replay",
        "--recordings",
        str(tmp_path / "r"),
        "--port",
        "0",
        "--allow-empty",
        cwd=tmp_path,
        env={"LLMPROXY_MAX_BODY_MB": "0.001"},
    )
    try:
        client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
        small = [{"role": "user", "content": "hi"}]
        with pytest.raises(openai.NotFoundError):  # under the bound: read, and a miss
            client.chat.completions.create(model="gpt-4o", messages=small)
        with pytest.raises(openai.APIStatusError) as refused:
            client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x" * 5000}])
        assert refused.value.status_code == 413
    finally:
        proxy.stop()
    result = llmproxy(
        "replay",
        "--recordings",
        str(tmp_path / "r"),
        "--port",
        "0",
        "--allow-empty",
        cwd=tmp_path,
        env={"LLMPROXY_SECRETS": "ignore"},
    )
    assert result.returncode != 0
    line = _one_line(result)
    assert "LLMPROXY_SECRETS" in line and "ignore" in line, line
    assert all(option.env for option in OPTIONS if list not in option.kinds)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("LLMPROXY_JOURNAL", "ON"),
        ("LLMPROXY_WRITER", "threads"),
        ("LLMPROXY_SECRETS", " redact"),
        ("LLMPROXY_CLIENT_DISCONNECT", "keep"),
        ("LLMPROXY_UPSTREAM_CLIENT", "http2"),
        ("LLMPROXY_MAX_BODY_MB", "-1"),
        ("LLMPROXY_MAX_BODY_MB", "0"),
        ("LLMPROXY_MAX_BODY_MB", "nan"),
        ("LLMPROXY_MAX_BODY_MB", "1e30"),
        ("LLMPROXY_CONNECT_TIMEOUT", "0"),
        ("LLMPROXY_READ_TIMEOUT", "-1"),
        ("LLMPROXY_SHUTDOWN_TIMEOUT", "-1"),
        ("LLMPROXY_HEADER_TIMEOUT", "1e400"),
        ("LLMPROXY_MAX_PAUSE", "-0.5"),
        ("LLMPROXY_MAX_FILE_MB", "0"),
        ("LLMPROXY_UI", "maybe"),
        ("LLMPROXY_DURABLE_WRITES", "é"),
        ("LLMPROXY_PORT", "70000"),
    ],
)
def test_a_bad_environment_value_is_refused_in_one_line_naming_its_variable(variable: str, value: str) -> None:
    """Whichever check refuses it (type, choices, range), the user is told which variable: the
    key or a flag they never typed would send them looking in the config file."""
    with pytest.raises(ConfigError) as refused:
        load_settings(None, {}, {variable: value})
    message = str(refused.value)
    assert variable in message and "\n" not in message, message


def test_check_refuses_a_bad_variable_and_takes_a_good_one(tmp_path: Path) -> None:
    """`llmproxy check` loads the settings: a variable that would fail every call (a zero connect
    timeout: each call a 504) is refused in one line with exit 2, no traceback."""
    (tmp_path / "recordings").mkdir()
    refused = llmproxy("check", str(tmp_path / "recordings"), cwd=tmp_path, env={"LLMPROXY_CONNECT_TIMEOUT": "0"})
    assert refused.returncode == 2
    assert "LLMPROXY_CONNECT_TIMEOUT" in _one_line(refused)
    taken = llmproxy("check", str(tmp_path / "recordings"), cwd=tmp_path, env={"LLMPROXY_CONNECT_TIMEOUT": " 2.5 "})
    assert taken.returncode == 0, taken.stderr


def test_timeouts_and_the_body_limit_that_would_fail_every_call_are_refused_from_the_file(tmp_path: Path) -> None:
    for line in ("read_timeout = 0", "connect_timeout = -1", "max_body_mb = -1", "shutdown_timeout = -2"):
        config = tmp_path / "llmproxy.toml"
        config.write_text(f"[proxy]\n{line}\n")
        with pytest.raises(ConfigError, match=line.split(" ")[0]):
            load_settings(config, {}, {})
    config.write_text("[proxy]\nshutdown_timeout = 0\nmax_pause = 0\n")  # no grace, no pause: meaningful
    settings = load_settings(config, {}, {})
    assert settings.shutdown_timeout == 0 and settings.max_pause == 0


@pytest.mark.parametrize(("word", "meaning"), [(" t ", True), ("Y", True), ("on", True), ("f", False), (" NO", False)])
def test_a_boolean_variable_means_the_same_to_every_command(tmp_path: Path, word: str, meaning: bool) -> None:
    """click reads LLMPROXY_RECORD_ERRORS for `record` (which has --record-errors); the settings
    read it for every other command: both take the same words."""
    assert load_settings(None, {}, {"LLMPROXY_RECORD_ERRORS": word, "LLMPROXY_UI": word}).record_errors is meaning
    assert load_settings(None, {}, {"LLMPROXY_UI": word}).ui is meaning


def test_the_environment_sits_between_the_file_and_the_command_line(tmp_path: Path) -> None:
    config = tmp_path / "llmproxy.toml"
    config.write_text('[proxy]\njournal = "off"\nread_timeout = 5\nwriter = "thread"\n')
    environ = {"LLMPROXY_JOURNAL": "fsync", "LLMPROXY_READ_TIMEOUT": "7"}
    settings = load_settings(config, {"read_timeout": 9.0}, environ)
    assert (settings.journal, settings.read_timeout, settings.writer) == ("fsync", 9.0, "thread")


def test_the_pytest_plugin_refuses_a_bad_variable_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "test_nothing.py").write_text(
        'import pytest\n\n@pytest.mark.usefixtures("llmproxy")\ndef test_nothing():\n    pass\n'
    )
    env = {**os.environ, "LLMPROXY_WRITER": "fork", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--llmproxy-mode", "record"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 4, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert "LLMPROXY_WRITER" in _one_line(result) and "'fork'" in result.stderr


def test_an_in_process_proxy_leaves_the_host_interpreter_alone(tmp_path: Path) -> None:
    """Only the CLI's own process tunes the runtime (server.tune_runtime): a proxy started in a
    host application's process (tests, the pytest plugin, `llmproxy run`) leaves its switch
    interval and collector as they were."""
    before = (sys.getswitchinterval(), gc.get_threshold(), gc.get_freeze_count())
    loop = LoopThread()
    try:
        proxy = start_proxy(loop, "replay", tmp_path, allow_empty=True)
        proxy.stop()
    finally:
        loop.close()
    assert (sys.getswitchinterval(), gc.get_threshold(), gc.get_freeze_count()) == before
