"""Settings: built-in defaults < TOML config file < LLMPROXY_* environment < command line.

Every option is one row of `OPTIONS`: its default, its type, its choices, its flag, its
environment variable and its help are written there once. The command line (`cli.py`) is
generated from that table; `config.example.toml` and the README's options table are checked
against it by tests. The command line and environment are merged by click (each flag names its
LLMPROXY_* variable); `load_settings` fills whatever they left unset from the config file, then
from the table's defaults, and validates every value the same way wherever it came from.
"""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal, get_args
from urllib.parse import urlsplit

from llmproxy.errors import ConfigError, StartupError
from llmproxy.providers import get_provider
from llmproxy.routing import Route, Router, default_routes
from llmproxy.store.base import is_remote

__all__ = ["ConfigError", "Mode", "OPTIONS", "Option", "Settings", "check_startup", "load_settings"]


class Mode(StrEnum):
    """What the proxy does with a call."""

    RECORD = "record"  # forward every call and record it
    RECORD_MISSING = "record-missing"  # replay what is recorded, forward and record the rest
    REPLAY = "replay"  # answer from recordings only


OnMiss = Literal["error", "forward"]
AfterLast = Literal["repeat", "error"]
ClientDisconnect = Literal["discard", "drain"]
LogLevel = Literal["debug", "info", "warning", "error"]
Secrets = Literal["refuse", "redact"]
JournalMode = Literal["on", "fsync", "off"]
WriterKind = Literal["process", "thread"]
UpstreamClient = Literal["http1", "aiohttp"]
# Timing is "fast", "realtime" or "xN"; validated by validate_timing.

SERVING = ("record", "replay", "run")  # the commands that start a proxy
DEFAULT_CONFIG = Path("llmproxy.toml")


@dataclass(frozen=True, slots=True)
class Option:
    """One setting: the single place its default, type, flag, environment variable and help live."""

    key: str  # the [proxy] key in the TOML file, the Settings field and the override name
    default: Any
    kind: type | tuple[type, ...]  # what the TOML file may hold
    help: str
    flag: str | None = None  # the command-line flag; None: config file only
    commands: tuple[str, ...] = SERVING  # the commands that take the flag
    choices: tuple[str, ...] | None = None
    negatable: bool = False  # a boolean flag with a --no- form (so it can override the file)
    in_file: bool = True  # False: command line and environment only
    readme_default: str | None = None  # how the README's options table words the default
    metavar: str | None = None  # the value's name in --help and the README

    @property
    def kinds(self) -> tuple[type, ...]:
        return self.kind if isinstance(self.kind, tuple) else (self.kind,)

    @property
    def env(self) -> str | None:
        """Every option with a single value can also be set as LLMPROXY_<KEY> (the two lists of
        patterns, whose items may hold any character, only in the file)."""
        return f"LLMPROXY_{self.key.upper()}" if self.flag or list not in self.kinds else None


OPTIONS: tuple[Option, ...] = (
    Option(
        "upstream",
        None,
        str,
        "Base URL of the OpenAI route's upstream, with scheme and host.",
        flag="--upstream",
        metavar="URL",
        readme_default="`https://api.openai.com` for the OpenAI route",
    ),
    Option(
        "recordings",
        "recordings",
        str,
        "Directory of recording files, or a bucket: s3://bucket/prefix (credentials from the AWS environment).",
        flag="--recordings",
        metavar="DIR|s3://BUCKET/PREFIX",
    ),
    Option(
        "host", "127.0.0.1", str, "Address to bind (anything but loopback: set a token).", flag="--host", metavar="HOST"
    ),
    Option(
        "port",
        8765,
        int,
        "Port to listen on; 0 picks a free one (named in the `listening` log line).",
        flag="--port",
        metavar="N",
        readme_default="`8765` (`0`: any free port, named in the `listening` log line)",
    ),
    Option(
        "config",
        None,
        str,
        "TOML config file with settings and routes.",
        flag="--config",
        metavar="FILE",
        in_file=False,
        readme_default="`./llmproxy.toml` if present",
    ),
    Option(
        "timing",
        "fast",
        str,
        "Replayed stream pacing: fast, realtime, or xN (N times faster than recorded).",
        flag="--timing",
        metavar="fast|realtime|xN",
    ),
    Option(
        "on_miss",
        "error",
        str,
        "Replay, a request with no recording: error (a 404 naming the closest recording) or forward "
        "(call the real API, record nothing).",
        flag="--on-miss",
        commands=("replay", "run"),
        choices=get_args(OnMiss),
    ),
    Option(
        "after_last",
        "repeat",
        str,
        "A request recorded N times and asked an N+1th time: repeat the last recording, or error "
        "(in record --missing: record it as a new repeat).",
        flag="--after-last",
        choices=get_args(AfterLast),
    ),
    Option(
        "missing",
        False,
        bool,
        "Replay what is recorded; forward and record only what is not (each live call is logged).",
        flag="--missing",
        commands=("record",),
        in_file=False,
        readme_default="off",
    ),
    Option(
        "record_errors",
        False,
        bool,
        "Also record upstream 429 and 5xx answers and cut-short streams (marked truncated).",
        flag="--record-errors",
        commands=("record", "run"),
        negatable=True,
        readme_default="off",
    ),
    Option(
        "allow_empty",
        False,
        bool,
        "Replay even when the recordings directory is missing (every request is then a miss).",
        flag="--allow-empty",
        readme_default="off: replay refuses a missing or unreadable directory",
    ),
    Option(
        "report",
        None,
        str,
        "Write a JSON usage report here on exit (hits, misses, recorded, unused).",
        flag="--report",
        metavar="FILE",
        readme_default="none",
    ),
    Option(
        "token",
        None,
        str,
        "Require clients to send this in an x-llmproxy-token header.",
        flag="--token",
        metavar="TOKEN",
        readme_default="none",
    ),
    Option(
        "log_json",
        False,
        bool,
        "Log one JSON object per line instead of key=value.",
        flag="--log-json",
        negatable=True,
        readme_default="key=value lines on stderr",
    ),
    Option("log_level", "info", str, "Log level.", flag="--log-level", choices=get_args(LogLevel)),
    Option("max_body_mb", 64, (int, float), "Larger request bodies are refused with 413."),
    Option("connect_timeout", 10.0, (int, float), "Seconds to connect to an upstream; then 502."),
    Option("read_timeout", 600.0, (int, float), "Seconds between two reads from an upstream; then 504."),
    Option(
        "upstream_client",
        "http1",
        str,
        "The HTTP client for upstream calls: llmproxy's own lean HTTP/1.1 client, or aiohttp's (the "
        "fallback, should an upstream need what only aiohttp does).",
        choices=get_args(UpstreamClient),
    ),
    Option(
        "client_disconnect",
        "drain",
        str,
        "A client leaving before the end: drain (read the upstream on and record the exchange whole) or "
        "discard (close the upstream at once, record nothing).",
        choices=get_args(ClientDisconnect),
    ),
    Option(
        "share_inflight",
        True,
        bool,
        "Identical calls in flight at once go upstream once and each client gets the chunks as they "
        "arrive (true), or each goes upstream and is recorded as its own repeat (false).",
        flag="--share-inflight",
        commands=("record", "run"),
        negatable=True,
        readme_default="on",
    ),
    Option(
        "max_recording_mb",
        64,
        (int, float),
        "What is kept of one response for its recording; past it the client still gets everything, "
        "but the exchange is not recorded (counted and warned).",
        flag="--max-recording-mb",
        commands=("record", "run"),
        metavar="MB",
    ),
    Option("shutdown_timeout", 10.0, (int, float), "Seconds in-flight requests get to finish on SIGTERM/SIGINT."),
    Option(
        "header_timeout",
        60.0,
        (int, float),
        "Seconds a client connection gets to send a request's headers (from connecting, or from its "
        "previous answer; also how long an idle keep-alive connection stays open); then it is closed.",
    ),
    Option(
        "body_timeout",
        120.0,
        (int, float),
        "Seconds a client gets to send a request's whole body; then 408 and the connection is closed.",
    ),
    Option("durable_writes", False, bool, "fsync every recording before renaming it into place."),
    Option(
        "journal",
        "on",
        str,
        "Write-ahead journal of recordings not yet written (a dot-file in the recordings directory): "
        "on (survives a kill of the proxy), fsync (also a power cut, one disk flush per recording) or off. "
        "The next start or `check --fix` writes what a killed proxy left in it.",
        choices=get_args(JournalMode),
    ),
    Option(
        "writer",
        "process",
        str,
        "Record: who creates the recording files: a child process (no GIL shared with the proxy's "
        "event loop) or a thread of the proxy. A bucket is always written by a thread.",
        commands=("record", "run"),
        choices=get_args(WriterKind),
    ),
    Option(
        "max_pending_mb",
        32,
        (int, float),
        "Record: bytes of responses and recordings waiting for the disk; past it new calls wait "
        "before going upstream (backpressure).",
        commands=("record", "run"),
    ),
    Option("secret_patterns", (), list, "Extra regexes the secret scanner refuses to write."),
    Option("ui", False, bool, "Serve the recordings browser under /_llmproxy/ on the proxy (read-only)."),
    Option(
        "secrets",
        "refuse",
        str,
        "A credential found in what would be written: refuse (the exchange is not recorded) or redact "
        "(replaced by a placeholder, recorded; the key is computed so that replay still matches).",
        choices=get_args(Secrets),
    ),
    Option("secret_allow", (), list, "Values or regexes the secret scanner lets through (test keys)."),
    Option("max_file_mb", 256, (int, float), "Replay and check: larger recording files are reported and skipped."),
    Option(
        "scope_fallback",
        True,
        bool,
        "A request in a scope (a pytest test, an x-llmproxy-scope header) with no recording there is "
        "answered by the shared recordings (true), or is a miss (false).",
    ),
    Option(
        "max_pause", 60.0, (int, float), "Paced replay (realtime, xN): no single recorded pause is longer (seconds)."
    ),
    Option(
        "refresh_seconds",
        10.0,
        (int, float),
        "Replay from a bucket (s3://), or a directory with --watch: look for recordings other writers added "
        "this often; what another replica records is served at most this many seconds (plus one listing) later.",
        flag="--refresh-seconds",
        commands=("record", "replay"),
        metavar="S",
    ),
    Option(
        "watch",
        False,
        bool,
        "Pick up recording files added to the directory while the proxy runs (every refresh_seconds).",
        flag="--watch",
        negatable=True,
        readme_default="off (always on for s3://)",
    ),
    Option(
        "redis_url",
        None,
        str,
        "Share identical in-flight calls across machines through this Redis (redis://host:6379/0); "
        "default: across the processes of one host only.",
        flag="--redis-url",
        metavar="URL",
        readme_default="none",
    ),
)
BY_KEY: dict[str, Option] = {option.key: option for option in OPTIONS}
FILE_KEYS: dict[str, Option] = {option.key: option for option in OPTIONS if option.in_file}


def default(key: str) -> Any:
    return BY_KEY[key].default


@dataclass(slots=True)
class Settings:
    host: str = default("host")
    port: int = default("port")
    recordings: Path = Path(default("recordings"))
    routes: list[Route] = field(default_factory=default_routes)
    log_json: bool = default("log_json")
    log_level: LogLevel = default("log_level")
    timing: str = default("timing")
    max_body_bytes: int = int(default("max_body_mb") * 1024 * 1024)
    connect_timeout: float = default("connect_timeout")
    read_timeout: float = default("read_timeout")
    upstream_client: UpstreamClient = default("upstream_client")
    on_miss: OnMiss = default("on_miss")
    after_last: AfterLast = default("after_last")
    record_errors: bool = default("record_errors")
    secret_patterns: list[str] = field(default_factory=list)
    report: Path | None = None
    config_path: Path | None = None
    token: str | None = None
    client_disconnect: ClientDisconnect = default("client_disconnect")
    share_inflight: bool = default("share_inflight")
    max_recording_bytes: int = int(default("max_recording_mb") * 1024 * 1024)
    shutdown_timeout: float = default("shutdown_timeout")
    header_timeout: float = default("header_timeout")
    body_timeout: float = default("body_timeout")
    durable_writes: bool = default("durable_writes")
    journal: JournalMode = default("journal")
    writer: WriterKind = default("writer")
    max_pending_bytes: int = int(default("max_pending_mb") * 1024 * 1024)
    allow_empty: bool = default("allow_empty")
    secrets: Secrets = default("secrets")
    secret_allow: list[str] = field(default_factory=list)
    max_file_bytes: int = int(default("max_file_mb") * 1024 * 1024)
    max_pause: float = default("max_pause")
    refresh_seconds: float = default("refresh_seconds")
    watch: bool = default("watch")
    redis_url: str | None = None
    ui: bool = default("ui")
    scope_fallback: bool = default("scope_fallback")
    # What a replay miss tells the user to run; None: the CLI command (pytest and `run` set theirs).
    record_hint: str | None = None

    def router(self) -> Router:
        return Router(self.routes)


# Kept for callers that imported them; the values come from the table.
DEFAULT_HOST: str = default("host")
DEFAULT_PORT: int = default("port")
DEFAULT_RECORDINGS = Path(default("recordings"))

_ROUTE_KEYS = {
    "name",
    "provider",
    "upstream",
    "prefix",
    "key_headers",
    "ignore_body",
    "ignore_query",
    "round_floats",
}


def read_config_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"config file is a directory: {path}") from None
    except PermissionError:
        raise ConfigError(f"config file cannot be read: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def validate_upstream(url: str, where: str = "--upstream") -> str:
    """An upstream base URL must name its scheme and host: 'api.openai.com' alone cannot work."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{where} must be a URL with scheme and host, like https://api.openai.com, not {url!r}")
    return url


def _route_from_table(table: Mapping[str, Any], index: int) -> Route:
    where = f"routes[{index}]"
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where} must be a table")
    unknown = set(table) - _ROUTE_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)} (known: {sorted(_ROUTE_KEYS)})")
    name = table.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}: 'name' is required")
    try:
        provider = get_provider(str(table.get("provider", "openai")))
    except ValueError as exc:
        raise ConfigError(f"{where} ({name}): {exc}") from None
    prefix = table.get("prefix")
    if prefix is not None and (not isinstance(prefix, str) or not prefix.startswith("/") or prefix == "/"):
        raise ConfigError(f"{where} ({name}): 'prefix' must be a path like '/anthropic'")

    def strings(key: str) -> tuple[str, ...]:
        value = table.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where} ({name}): '{key}' must be a list of strings")
        return tuple(value)

    round_floats = table.get("round_floats")
    if round_floats is not None and (
        not isinstance(round_floats, int) or isinstance(round_floats, bool) or round_floats < 0
    ):
        raise ConfigError(f"{where} ({name}): 'round_floats' must be a whole number of decimals")
    upstream = table.get("upstream")
    if upstream is not None:
        if not isinstance(upstream, str):
            raise ConfigError(f"{where} ({name}): 'upstream' must be a URL")
        validate_upstream(upstream, f"{where} ({name}): 'upstream'")
    return Route(
        round_floats=round_floats,
        name=name,
        provider=provider,
        upstream=upstream or provider.default_upstream,
        prefix=prefix.rstrip("/") if prefix else None,
        key_headers=tuple(h.lower() for h in strings("key_headers")),
        ignore_body=strings("ignore_body"),
        ignore_query=strings("ignore_query"),
    )


def _checked(option: Option, value: Any, where: str) -> Any:
    """One value of one option, from whichever source, checked against the table."""
    kinds = option.kinds
    if not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool)):
        if isinstance(value, Path) and str in kinds:
            return value
        expected = "/".join(k.__name__ for k in kinds)
        raise ConfigError(f"{where}: wrong type {type(value).__name__} (expected {expected})")
    if option.choices is not None and value not in option.choices:
        raise ConfigError(f"{where} must be one of {', '.join(option.choices)}, not {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where} must be a finite number, not {value!r}")
    return value


_TRUE_WORDS = frozenset({"1", "true", "t", "yes", "y", "on"})
_FALSE_WORDS = frozenset({"0", "false", "f", "no", "n", "off"})


def _from_environment(option: Option, environ: Mapping[str, str]) -> Any:
    """An option's LLMPROXY_* variable, converted to the option's type (None when unset)."""
    text = environ.get(option.env) if option.env else None
    if text is None or text == "":
        return None
    kinds = option.kinds
    if bool in kinds:
        # The words click takes for a flag's LLMPROXY_* variable: one variable means the same to
        # every command, whether or not that command has the flag.
        word = text.strip().lower()
        if word not in _TRUE_WORDS and word not in _FALSE_WORDS:
            raise ConfigError(f"{option.env}: not a valid value: {text!r}")
        return word in _TRUE_WORDS
    for number in (int, float):  # "2.5" for an option that takes an integer or a number
        if number in kinds:
            try:
                return number(text)
            except ValueError:
                continue
    if int in kinds or float in kinds:
        raise ConfigError(f"{option.env}: not a valid value: {text!r}")
    return text


def load_settings(
    config_path: Path | None, overrides: Mapping[str, Any], environ: Mapping[str, str] | None = None
) -> Settings:
    """Settings from an optional config file, LLMPROXY_* variables of `environ` (default: this
    process's) and explicit overrides (None means unset), in rising precedence."""
    environ = os.environ if environ is None else environ
    if config_path is None and environ.get("LLMPROXY_CONFIG"):
        config_path = Path(environ["LLMPROXY_CONFIG"])
    file_data: dict[str, Any] = {}
    if config_path is not None:
        file_data = read_config_file(config_path)
    elif DEFAULT_CONFIG.is_file():
        file_data = read_config_file(DEFAULT_CONFIG)
    proxy = file_data.get("proxy", {})
    if not isinstance(proxy, dict):
        raise ConfigError("[proxy] must be a table")
    for key, value in proxy.items():
        option = FILE_KEYS.get(key)
        if option is None:
            raise ConfigError(f"[proxy]: unknown key {key!r} (known: {sorted(FILE_KEYS)})")
        _checked(option, value, f"[proxy].{key}")

    from_environment: dict[str, str] = {}

    def pick(key: str) -> Any:
        option = BY_KEY[key]
        value = overrides.get(key)
        if value is None:
            value = _from_environment(option, environ)
            if value is not None and option.env:
                from_environment[key] = option.env
        if value is not None:
            return _checked(option, value, named(key))
        return proxy.get(key, option.default)

    def named(key: str) -> str:
        """How a refusal names the option: the variable it came from, else its flag or key."""
        return from_environment.get(key) or BY_KEY[key].flag or key

    def seconds(key: str, *, zero: bool = False) -> float:
        value = pick(key)  # first: it notes where the value came from
        return _seconds(named(key), value, zero=zero)

    def megabytes(key: str) -> int:
        value = pick(key)
        return _megabytes(named(key), value)

    tables = file_data.get("routes", [])
    if not isinstance(tables, list):
        raise ConfigError("routes must be an array of tables ([[routes]])")
    routes = [_route_from_table(table, i) for i, table in enumerate(tables)]
    upstream = pick("upstream")
    if upstream is not None:
        validate_upstream(str(upstream))
    if not routes:
        routes = default_routes(upstream)
    elif upstream:
        routes = _with_openai_upstream(routes, upstream)
    try:
        Router(routes)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    timing = str(pick("timing"))
    validate_timing(timing)
    patterns = pick("secret_patterns")
    if not all(isinstance(p, str) for p in patterns):
        raise ConfigError("secret_patterns must be a list of regular expressions")
    report = pick("report")
    secret_allow = pick("secret_allow")
    if not all(isinstance(p, str) for p in secret_allow):
        raise ConfigError("secret_allow must be a list of values or regular expressions")
    max_pause = seconds("max_pause", zero=True)
    port = int(pick("port"))
    if not 0 <= port <= 65535:  # pick first: it notes where the value came from
        raise ConfigError(f"{named('port')}: port {port} is out of range")
    return Settings(
        host=str(pick("host")),
        port=port,
        recordings=Path(pick("recordings")),
        routes=routes,
        log_json=bool(pick("log_json")),
        log_level=pick("log_level"),
        timing=timing,
        max_body_bytes=megabytes("max_body_mb"),
        connect_timeout=seconds("connect_timeout"),
        read_timeout=seconds("read_timeout"),
        upstream_client=pick("upstream_client"),
        on_miss=pick("on_miss"),
        after_last=pick("after_last"),
        record_errors=bool(pick("record_errors")),
        secret_patterns=list(patterns),
        report=Path(report) if report else None,
        config_path=config_path or (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None),
        token=pick("token") or None,
        client_disconnect=pick("client_disconnect"),
        share_inflight=bool(pick("share_inflight")),
        max_recording_bytes=megabytes("max_recording_mb"),
        shutdown_timeout=seconds("shutdown_timeout", zero=True),
        header_timeout=seconds("header_timeout"),
        body_timeout=seconds("body_timeout"),
        durable_writes=bool(pick("durable_writes")),
        journal=pick("journal"),
        writer=pick("writer"),
        max_pending_bytes=megabytes("max_pending_mb"),
        allow_empty=bool(pick("allow_empty")),
        secrets=pick("secrets"),
        secret_allow=list(secret_allow),
        max_file_bytes=megabytes("max_file_mb"),
        max_pause=max_pause,
        refresh_seconds=seconds("refresh_seconds"),
        watch=bool(pick("watch")),
        redis_url=pick("redis_url") or None,
        ui=bool(pick("ui")),
        scope_fallback=bool(pick("scope_fallback")),
        record_hint=overrides.get("record_hint"),
    )


def _seconds(name: str, value: Any, *, zero: bool = False) -> float:
    """A duration; 0 only where it means "no waiting" (a zero timeout would fail every call)."""
    seconds = float(value)
    if not math.isfinite(seconds) or seconds < 0 or (seconds == 0 and not zero):
        least = "0 or more" if zero else "more than 0"
        raise ConfigError(f"{name} must be a number of seconds {least}, not {value!r}")
    return seconds


def _megabytes(name: str, value: Any) -> int:
    megabytes = float(value)
    if not math.isfinite(megabytes) or megabytes > 1024 * 1024:
        raise ConfigError(f"{name} must be a number of megabytes up to 1048576, not {value!r}")
    size = int(megabytes * 1024 * 1024)
    if size <= 0:
        raise ConfigError(f"{name} must be more than 0")
    return size


def check_startup(settings: Settings, mode: Mode | str) -> None:
    """Refuse, before listening, what cannot work: replay of a directory that is not there, or
    any mode on a bucket that cannot be listed (a record run would lose every recording)."""
    root = settings.recordings
    if is_remote(root):
        _check_bucket(str(root))
        return
    if mode != Mode.REPLAY or settings.allow_empty:
        return
    if not root.exists():
        raise StartupError(
            f"recordings directory {root} does not exist: nothing to replay "
            "(record first, check --recordings, or pass --allow-empty)"
        )
    if not root.is_dir():
        raise StartupError(f"recordings directory {root} is not a directory")
    if not os.access(root, os.R_OK | os.X_OK):
        raise StartupError(f"recordings directory {root} cannot be read (permissions)")


def _check_bucket(location: str) -> None:
    from llmproxy.store.base import open_store
    from llmproxy.store.directory import StoreError
    from llmproxy.store.s3 import S3Store

    store = open_store(location)
    try:
        assert isinstance(store, S3Store)
        store.check()
    except StoreError as exc:
        raise StartupError(f"recordings bucket: {exc}") from None
    finally:
        store.close()


def _with_openai_upstream(routes: list[Route], upstream: str) -> list[Route]:
    """--upstream points the OpenAI route (the one without a configured prefix) somewhere else."""
    for index, route in enumerate(routes):
        if route.provider.name == "openai" and not route.prefix:
            updated = list(routes)
            updated[index] = replace(route, upstream=upstream)
            return updated
    raise ConfigError("--upstream needs an OpenAI route without a prefix in the config")


def validate_timing(timing: str) -> float | None:
    """Replay pacing: 'fast' (None), 'realtime' (1.0) or 'xN' (N times faster than recorded)."""
    if timing == "fast":
        return None
    if timing == "realtime":
        return 1.0
    if timing.startswith("x"):
        try:
            factor = float(timing[1:])
        except ValueError:
            factor = 0.0
        if factor > 0:
            return factor
    raise ConfigError(f"timing must be 'fast', 'realtime' or 'xN' (e.g. x2), not {timing!r}")


def _toml_default(option: Option) -> str:
    """A default as the config file spells it."""
    if option.readme_default:
        return option.readme_default
    default = option.default
    if default is None:
        return "none"
    if isinstance(default, bool):
        return f"`{str(default).lower()}`"
    if isinstance(default, tuple):
        return f"`{list(default)}`"
    return f"`{default}`" if not isinstance(default, str) else f'`"{default}"`'


def options_markdown() -> str:
    """The README's options table, generated from OPTIONS (tests/test_settings.py keeps it in sync)."""
    rows = ["| option | env | commands | default |", "|---|---|---|---|"]
    for option in OPTIONS:
        if option.flag is None:
            continue
        flag = option.flag
        if option.choices:
            flag += " " + "\\|".join(option.choices)
        elif option.metavar:
            flag += " " + option.metavar.replace("|", "\\|")
        shown = option.readme_default or ("none" if option.default is None else f"`{option.default}`")
        commands = ", ".join(option.commands)
        rows.append(f"| `{flag}` | {f'`{option.env}`' if option.env else ''} | {commands} | {shown} |")
    rows += ["", "Without a flag (config file, and environment where named):", ""]
    rows += ["| key | env | default |", "|---|---|---|"]
    for option in OPTIONS:
        if option.flag is not None or not option.in_file:
            continue
        env = f"`{option.env}`" if option.env else "file only"
        rows.append(f"| `{option.key}` | {env} | {_toml_default(option)} |")
    return "\n".join(rows) + "\n"
