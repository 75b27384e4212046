"""Settings: built-in defaults < TOML config file < LLMPROXY_* environment < command line.

The command line and environment are merged by click (each option names its LLMPROXY_*
variable); this module fills whatever they left unset from the config file, then defaults.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from llmproxy.providers import get_provider
from llmproxy.routing import Route, Router, default_routes

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
DEFAULT_RECORDINGS = Path("recordings")
DEFAULT_CONFIG = Path("llmproxy.toml")


class ConfigError(ValueError):
    """A config file or option that cannot be used; the message says which and why."""


@dataclass(slots=True)
class Settings:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    recordings: Path = DEFAULT_RECORDINGS
    routes: list[Route] = field(default_factory=default_routes)
    log_json: bool = False
    log_level: str = "info"
    timing: str = "fast"
    max_body_bytes: int = 64 * 1024 * 1024
    connect_timeout: float = 10.0
    read_timeout: float = 600.0
    on_miss: str = "error"  # replay: "error" (strict, the CI default) or "forward" (live, unrecorded)
    after_last: str = "repeat"  # replay: after the last recorded repeat, "repeat" it or "error"
    record_errors: bool = False  # record: keep 429 and 5xx answers too
    secret_patterns: list[str] = field(default_factory=list)  # extra regexes the scanner refuses
    report: Path | None = None  # usage report (JSON) written on exit
    config_path: Path | None = None
    token: str | None = None  # when set, clients must send it in the x-llmproxy-token header
    client_disconnect: str = "discard"  # record: "discard" the exchange or "drain" and record it
    shutdown_timeout: float = 10.0  # seconds in-flight requests get to finish on SIGTERM/SIGINT
    durable_writes: bool = False  # fsync each recording before its rename (survives power loss)
    ui: bool = False  # serve the recordings browser under /_llmproxy/ on the proxy

    def router(self) -> Router:
        return Router(self.routes)


_PROXY_KEYS = {
    "host": str,
    "port": int,
    "recordings": str,
    "upstream": str,
    "log_json": bool,
    "log_level": str,
    "timing": str,
    "max_body_mb": (int, float),
    "connect_timeout": (int, float),
    "read_timeout": (int, float),
    "on_miss": str,
    "after_last": str,
    "record_errors": bool,
    "secret_patterns": list,
    "report": str,
    "token": str,
    "client_disconnect": str,
    "shutdown_timeout": (int, float),
    "durable_writes": bool,
    "ui": bool,
}
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
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def _route_from_table(table: Mapping[str, Any], index: int) -> Route:
    where = f"routes[{index}]"
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
    return Route(
        round_floats=round_floats,
        name=name,
        provider=provider,
        upstream=table.get("upstream") or provider.default_upstream,
        prefix=prefix.rstrip("/") if prefix else None,
        key_headers=tuple(h.lower() for h in strings("key_headers")),
        ignore_body=strings("ignore_body"),
        ignore_query=strings("ignore_query"),
    )


def load_settings(config_path: Path | None, overrides: Mapping[str, Any]) -> Settings:
    """Settings from an optional config file plus explicit overrides (None means unset)."""
    file_data: dict[str, Any] = {}
    if config_path is not None:
        file_data = read_config_file(config_path)
    elif DEFAULT_CONFIG.is_file():
        file_data = read_config_file(DEFAULT_CONFIG)
    proxy = file_data.get("proxy", {})
    if not isinstance(proxy, dict):
        raise ConfigError("[proxy] must be a table")
    for key, value in proxy.items():
        expected = _PROXY_KEYS.get(key)
        if expected is None:
            raise ConfigError(f"[proxy]: unknown key {key!r} (known: {sorted(_PROXY_KEYS)})")
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise ConfigError(f"[proxy].{key}: wrong type {type(value).__name__}")

    def pick(key: str, default: Any) -> Any:
        value = overrides.get(key)
        if value is not None:
            return value
        return proxy.get(key, default)

    tables = file_data.get("routes", [])
    if not isinstance(tables, list):
        raise ConfigError("routes must be an array of tables ([[routes]])")
    routes = [_route_from_table(table, i) for i, table in enumerate(tables)]
    upstream = pick("upstream", None)
    if not routes:
        routes = default_routes(upstream)
    elif upstream:
        routes = _with_openai_upstream(routes, upstream)
    try:
        Router(routes)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    timing = str(pick("timing", "fast"))
    validate_timing(timing)
    on_miss = str(pick("on_miss", "error"))
    if on_miss not in ("error", "forward"):
        raise ConfigError(f"on_miss must be 'error' or 'forward', not {on_miss!r}")
    after_last = str(pick("after_last", "repeat"))
    if after_last not in ("repeat", "error"):
        raise ConfigError(f"after_last must be 'repeat' or 'error', not {after_last!r}")
    patterns = pick("secret_patterns", [])
    if not all(isinstance(p, str) for p in patterns):
        raise ConfigError("secret_patterns must be a list of regular expressions")
    report = pick("report", None)
    client_disconnect = str(pick("client_disconnect", "discard"))
    if client_disconnect not in ("discard", "drain"):
        raise ConfigError(f"client_disconnect must be 'discard' or 'drain', not {client_disconnect!r}")
    port = int(pick("port", DEFAULT_PORT))
    if not 0 <= port <= 65535:
        raise ConfigError(f"port {port} is out of range")
    return Settings(
        host=str(pick("host", DEFAULT_HOST)),
        port=port,
        recordings=Path(pick("recordings", DEFAULT_RECORDINGS)),
        routes=routes,
        log_json=bool(pick("log_json", False)),
        log_level=str(pick("log_level", "info")),
        timing=timing,
        max_body_bytes=int(float(pick("max_body_mb", 64)) * 1024 * 1024),
        connect_timeout=float(pick("connect_timeout", 10.0)),
        read_timeout=float(pick("read_timeout", 600.0)),
        on_miss=on_miss,
        after_last=after_last,
        record_errors=bool(pick("record_errors", False)),
        secret_patterns=list(patterns),
        report=Path(report) if report else None,
        config_path=config_path or (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None),
        token=pick("token", None) or None,
        client_disconnect=client_disconnect,
        shutdown_timeout=float(pick("shutdown_timeout", 10.0)),
        durable_writes=bool(pick("durable_writes", False)),
        ui=bool(pick("ui", False)),
    )


def _with_openai_upstream(routes: list[Route], upstream: str) -> list[Route]:
    """--upstream points the catch-all OpenAI route (no prefix) somewhere else."""
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
