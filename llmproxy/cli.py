"""The `llmproxy` command line."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Callable, Iterator
from datetime import UTC
from pathlib import Path
from typing import Any

import click

from llmproxy import __version__
from llmproxy.config import OPTIONS, Mode, Option, Settings, check_startup, load_settings
from llmproxy.errors import ConfigError, StartupError
from llmproxy.logs import configure_logging


def _install_event_loop() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


_PATH_TYPES: dict[str, click.ParamType] = {
    "recordings": click.Path(file_okay=False, path_type=Path),
    "config": click.Path(dir_okay=False, exists=True, path_type=Path),
    "report": click.Path(dir_okay=False, path_type=Path),
}


def _click_option(option: Option, command: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """One row of the settings table as a click option: flag, type, env, help, all from the row."""
    assert option.flag is not None
    name = "config_path" if option.key == "config" else option.key
    shown = option.default if option.default not in (None, False, ()) else option.readme_default
    if command == "run" and option.key == "port":
        shown = "a free port"
    help_text = f"{option.help} [default: {shown}]".replace("`", "")
    kwargs: dict[str, Any] = {"envvar": option.env, "help": help_text, "default": None}
    if option.kind is bool:
        if option.negatable:
            flag = f"{option.flag}/--no-{option.flag[2:]}"
        else:
            flag, kwargs["is_flag"], kwargs["flag_value"] = option.flag, True, True
        return click.option(flag, name, **kwargs)
    if option.choices:
        kwargs["type"] = click.Choice(option.choices)
    elif option.key == "port":
        kwargs["type"] = click.IntRange(0, 65535)
    elif option.key in _PATH_TYPES:
        kwargs["type"] = _PATH_TYPES[option.key]
    elif option.kind in (int, (int, float), float):
        # Numbers from the command line and LLMPROXY_* come in as text: click converts them
        # (and refuses what is not one, naming the flag).
        kwargs["type"] = click.INT if option.kind is int else click.FLOAT
    if option.metavar:
        kwargs["metavar"] = option.metavar
    return click.option(option.flag, name, **kwargs)


def serving_options(command: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The options of a command that starts a proxy, generated from the settings table."""

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed([o for o in OPTIONS if o.flag and command in o.commands]):
            func = _click_option(option, command)(func)
        return func

    return decorate


def _settings(config_path: Path | None, **overrides: Any) -> Settings:
    try:
        settings = load_settings(config_path, overrides)
        configure_logging(json=settings.log_json, level=settings.log_level)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    return settings


def _serving_settings(mode: Mode, config_path: Path | None, **overrides: Any) -> Settings:
    """Settings for a command that serves, refusing at once what cannot work."""
    settings = _settings(config_path, **overrides)
    try:
        check_startup(settings, mode)
    except StartupError as exc:
        raise click.ClickException(str(exc)) from None
    return settings


def _run(settings: Settings, mode: Mode) -> None:
    from llmproxy.server import serve

    _install_event_loop()
    try:
        asyncio.run(serve(settings, mode))
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror}") from None


class _Commands(click.Group):
    """Errors are one line on stderr (`Error: ...`), never a usage dump or a traceback."""

    def main(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        kwargs["standalone_mode"] = False
        try:
            result = super().main(*args, **kwargs)
        except click.exceptions.Abort:
            click.echo("Aborted.", err=True)
            sys.exit(1)
        except click.ClickException as exc:
            click.echo(f"Error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        sys.exit(result if isinstance(result, int) else 0)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="llmproxy")
def main() -> None:
    """A recording proxy for LLM APIs.

    Point your client's base URL at the proxy (for the OpenAI SDK:
    base_url="http://127.0.0.1:8765/v1"). `record` forwards each call to the real API
    and saves the exchange under the recordings directory; `replay` answers from those
    files with no network and no API key.

    Every option can also be set in the config file or as an LLMPROXY_* environment
    variable (e.g. LLMPROXY_PORT); the command line wins.
    """


@main.command()
@serving_options("record")
def record(config_path: Path | None, missing: bool | None, **options: Any) -> None:
    """Forward every call to the real API and record each exchange.

    Streams are passed through chunk by chunk as they arrive; each exchange is written to
    one JSON file when it completes. Credentials are forwarded upstream, never written.

    \b
    Example:
      llmproxy record --upstream https://api.openai.com
      OPENAI_BASE_URL=http://127.0.0.1:8765/v1 python my_script.py
    """
    mode = Mode.RECORD_MISSING if missing else Mode.RECORD
    _run(_serving_settings(mode, config_path, **options), mode)


@main.command()
@serving_options("replay")
def replay(config_path: Path | None, **options: Any) -> None:
    """Serve recorded exchanges; never touch the network.

    A request with no recording gets a 404 in the provider's error shape naming what was
    missing and the closest recording.

    \b
    Example:
      llmproxy replay
      OPENAI_BASE_URL=http://127.0.0.1:8765/v1 OPENAI_API_KEY=any python my_script.py
    """
    _run(_serving_settings(Mode.REPLAY, config_path, **options), Mode.REPLAY)


@main.command()
@click.option(
    "--report",
    "report_path",
    required=True,
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="A usage report written by `replay --report` or `record --missing --report`.",
)
@click.option("--dry-run", is_flag=True, help="Only list what would be deleted.")
def prune(report_path: Path, dry_run: bool) -> None:
    """Delete recordings a run never used.

    Only a report from a run with no misses is trusted: a run that missed may not have
    exercised every code path, so "unused" would not mean "stale".
    """
    from llmproxy.tools.report import ReportError, prunable, read_report

    try:
        paths = prunable(read_report(report_path))
    except ReportError as exc:
        raise click.ClickException(f"not pruning: {exc}") from None
    for path in paths:
        if dry_run:
            click.echo(f"would delete {path}")
        elif path.exists():
            path.unlink()
            click.echo(f"deleted {path}")
        else:
            click.echo(f"already gone {path}")
    click.echo(f"{len(paths)} unused recording(s){' (dry run)' if dry_run else ''}")


def _config_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Options of the commands that read a recordings directory without serving it."""
    func = click.option(
        "--config",
        "config_path",
        type=click.Path(dir_okay=False, exists=True, path_type=Path),
        envvar="LLMPROXY_CONFIG",
        help="TOML config file with routes and rules (default: ./llmproxy.toml if present).",
    )(func)
    return func


def _load_index(settings: Settings) -> Any:
    from llmproxy.store.directory import RecordingStore
    from llmproxy.store.index import RecordingIndex

    index = RecordingIndex(settings.router(), keep_recordings=True)
    index.load_store(RecordingStore(settings.recordings))
    return index


@main.command()
@click.argument("directory", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.option("--fix", is_flag=True, help="Delete temp files left by unfinished writes.")
@_config_options
def check(directory: Path | None, fix: bool, config_path: Path | None) -> None:
    """Lint a recordings directory (default: ./recordings) for CI.

    Reports unreadable or invalid files, credentials, two files for the same request and
    repeat, files whose name no longer matches their key, and leftover temp files. Exits 1
    when anything is wrong.
    """
    from llmproxy.store.secrets import SecretScanner
    from llmproxy.tools.check import check_directory

    settings = _settings(config_path, recordings=directory, log_level="error")
    root = settings.recordings
    if not root.is_dir():
        raise click.ClickException(f"no such directory: {root}")

    def progress(paths: list[Path]) -> Iterator[Path]:
        if len(paths) < 500:
            yield from paths
            return
        # click draws the bar only on a terminal.
        with click.progressbar(paths, label=f"checking {root}", file=click.get_text_stream("stderr")) as bar:
            yield from bar

    try:
        problems = check_directory(
            root,
            settings.router(),
            SecretScanner(settings.secret_patterns, allow=settings.secret_allow),
            fix=fix,
            progress=progress,
            max_file_bytes=settings.max_file_bytes,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    for problem in problems:
        click.echo(str(problem))
    failing = [p for p in problems if p.fails]
    from llmproxy.store.directory import RecordingStore

    count = sum(1 for _ in RecordingStore(root).paths())
    click.echo(f"checked {root}: {len(failing)} problem(s) in {count} file(s)")
    if failing:
        raise SystemExit(1)


@main.command(name="sync")
@click.argument("source")
@click.argument("destination")
@click.option("--dry-run", is_flag=True, help="Only list what would be copied.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def sync_command(source: str, destination: str, dry_run: bool, quiet: bool) -> None:
    """Copy recordings between a directory and a bucket (s3://bucket/prefix), either way.

    Only files missing from DESTINATION or with other bytes are copied; nothing is deleted.
    Bucket access comes from the standard AWS environment (AWS_ENDPOINT_URL, AWS_PROFILE...).
    """
    from llmproxy.errors import LlmproxyError
    from llmproxy.store.base import is_remote, open_store
    from llmproxy.tools.sync import sync

    configure_logging(json=False, level="warning")
    if not is_remote(source) and not Path(source).is_dir():
        raise click.ClickException(f"no such directory: {source}")

    def progress(done: Iterator[str], total: int) -> Iterator[str]:
        if quiet or not total:
            yield from done
            return
        # click draws the bar only on a terminal; elsewhere it prints the label once.
        with click.progressbar(done, length=total, label="copying", file=click.get_text_stream("stderr")) as bar:
            yield from bar

    src, dst = open_store(source), open_store(destination)
    try:
        result = sync(src, dst, dry_run=dry_run, progress=progress)
    except LlmproxyError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        src.close()
        dst.close()
    verb = "would copy" if dry_run else "copied"
    for name in result.copied if dry_run else ():
        click.echo(name)
    for name, reason in result.failed:
        click.echo(f"failed: {name}: {reason}", err=True)
    click.echo(f"{verb} {len(result.copied)}, unchanged {result.unchanged}, failed {len(result.failed)}")
    if result.failed:
        raise SystemExit(1)


@main.command()
@click.argument("request_file", type=click.Path(dir_okay=False, exists=True, allow_dash=True, path_type=Path))
@click.option("--recordings", type=click.Path(file_okay=False, path_type=Path), envvar="LLMPROXY_RECORDINGS")
@_config_options
def explain(request_file: Path, recordings: Path | None, config_path: Path | None) -> None:
    """Say what replay would do with a request; exit 1 when replay would not answer it.

    REQUEST_FILE (- for stdin) is a recording, or {"method", "path" (or "url"), "headers",
    "body"}. Prints its route, the rules applied, its key, the file it would hit, or the
    nearest recordings and how they differ.
    """
    import orjson

    from llmproxy.errors import LlmproxyError
    from llmproxy.tools.explain import explanation

    settings = _settings(config_path, recordings=recordings, log_level="error")
    name = "stdin" if str(request_file) == "-" else str(request_file)
    try:
        data = sys.stdin.buffer.read() if name == "stdin" else request_file.read_bytes()
        document = orjson.loads(data)
        text, hit = explanation(document, settings.router(), _load_index(settings))
    except OSError as exc:
        raise click.ClickException(f"{name}: cannot read it: {exc.strerror}") from None
    except orjson.JSONDecodeError as exc:
        raise click.ClickException(f"{name}: not valid JSON: {exc}") from None
    except (ValueError, LlmproxyError) as exc:
        raise click.ClickException(f"{name}: {exc}") from None
    click.echo(text)
    if not hit:
        raise SystemExit(1)


@main.command(name="ls")
@click.option("--recordings", type=click.Path(file_okay=False, path_type=Path), envvar="LLMPROXY_RECORDINGS")
@click.option("--route", help="Only this route.")
@click.option("--model", help="Only models containing this text.")
@click.option("--endpoint", help="Only endpoints containing this text.")
@click.option("--older-than", help="Only recordings older than this (30d, 12h, 2w) or of unknown age.")
@_config_options
def list_recordings(
    recordings: Path | None,
    route: str | None,
    model: str | None,
    endpoint: str | None,
    older_than: str | None,
    config_path: Path | None,
) -> None:
    """List recordings: route, endpoint, model, age and size."""
    from datetime import datetime

    from llmproxy.tools.explain import listings, parse_age

    settings = _settings(config_path, recordings=recordings, log_level="error")
    try:
        age = parse_age(older_than) if older_than else None
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    now = datetime.now(UTC)
    found = listings(_load_index(settings), route=route, model=model, endpoint=endpoint, older_than=age, now=now)
    for item in found:
        click.echo(
            f"{item.route:<10} {item.endpoint:<40} {item.model:<28} {item.age(now):>8} {item.size:>9}  {item.path}"
        )
    click.echo(f"{len(found)} recording(s)")


@main.command()
@click.argument("recording_file", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@_config_options
def show(recording_file: Path, config_path: Path | None) -> None:
    """Print one recording as a readable conversation."""
    import orjson

    from llmproxy.store.document import RecordingError
    from llmproxy.store.index import RecordingIndex
    from llmproxy.tools.explain import show as render

    settings = _settings(config_path, log_level="error")
    try:
        document = orjson.loads(recording_file.read_bytes())
        click.echo(render(recording_file, document, RecordingIndex(settings.router()).provider_for))
    except (orjson.JSONDecodeError, RecordingError) as exc:
        raise click.ClickException(f"{recording_file}: {exc}") from None


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("mode", type=click.Choice([m.value for m in Mode]))
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@serving_options("run")
def run(mode: str, command: tuple[str, ...], config_path: Path | None, port: int | None, **options: Any) -> None:
    """Run COMMAND with a proxy in MODE around it, then exit with its status.

    The proxy listens on --port (default: a free port); the command gets OPENAI_BASE_URL,
    ANTHROPIC_BASE_URL, OLLAMA_HOST, GOOGLE_GEMINI_BASE_URL, AZURE_OPENAI_ENDPOINT and
    LLMPROXY_URL pointing at it, and placeholder API keys in replay so SDKs that insist on
    one start.

    \b
    Example:
      llmproxy run replay -- pytest tests/
    """
    from llmproxy.tools.run import run_command, run_hint

    chosen = Mode(mode)
    settings = _serving_settings(chosen, config_path, port=port if port is not None else 0, **options)
    settings.record_hint = run_hint(settings, list(command))
    _install_event_loop()
    raise SystemExit(asyncio.run(run_command(settings, chosen, list(command))))


@main.command()
@click.option(
    "--recordings",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="LLMPROXY_RECORDINGS",
    help="Directory of recording files (default: ./recordings).",
)
@click.option(
    "--report",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="A usage report (replay --report): shows which recordings were used, unused and missed.",
)
@click.option("--host", envvar="LLMPROXY_UI_HOST", help="Address to bind (default: 127.0.0.1).")
@click.option(
    "--port", type=click.IntRange(0, 65535), envvar="LLMPROXY_UI_PORT", help="Port (default: 8766; 0 picks a free one)."
)
@click.option(
    "--token",
    envvar="LLMPROXY_TOKEN",
    help="Require this token in an x-llmproxy-token header (the page asks for it once); for a non-loopback --host.",
)
@click.option("--log-json/--no-log-json", default=None, envvar="LLMPROXY_LOG_JSON", help="Log JSON lines.")
@_config_options
def ui(
    recordings: Path | None,
    report: Path | None,
    host: str | None,
    port: int | None,
    token: str | None,
    log_json: bool | None,
    config_path: Path | None,
) -> None:
    """Browse recordings in a web page: list, search, conversation view, diff, tokens and cost.

    Read-only. Serves http://127.0.0.1:8766/ by default.
    """
    from llmproxy.tools.ui import DEFAULT_UI_PORT, UIServer, serve_ui

    settings = _settings(config_path, recordings=recordings, host=host, token=token, log_json=log_json)
    if not settings.recordings.is_dir():
        raise click.ClickException(f"no such directory: {settings.recordings}")
    server = UIServer(
        settings.recordings,
        settings.router(),
        host=settings.host,
        port=DEFAULT_UI_PORT if port is None else port,
        token=settings.token,
        report=report,
    )
    _install_event_loop()
    try:
        asyncio.run(serve_ui(server))
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {settings.host}:{server.port}: {exc.strerror}") from None


@main.command()
@click.argument("directory", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--by",
    "group",
    type=click.Choice(["model", "route", "scope"]),
    default="model",
    help="Sum per model (default), route or test scope.",
)
@_config_options
def cost(directory: Path | None, group: str, config_path: Path | None) -> None:
    """Tokens and cost of the recordings in DIRECTORY (default: ./recordings).

    Prices come from the genai-prices table (pip install 'llmproxy[cost]') at each recording's
    date; a model the table does not know is counted as unknown, never guessed.
    """
    from llmproxy.tools.ui import Catalog

    settings = _settings(config_path, recordings=directory, log_level="error")
    if not settings.recordings.is_dir():
        raise click.ClickException(f"no such directory: {settings.recordings}")
    catalog = Catalog(settings.recordings, settings.router())
    catalog.load()
    summary = catalog.costs(group)  # type: ignore[arg-type]

    def money(item: dict[str, Any]) -> str:
        known = "unknown" if item["cost_usd"] is None else f"${item['cost_usd']:.6f}"
        partly = item["cost_usd"] is not None and item["unknown_cost"]
        return known + (f" (+{item['unknown_cost']} unknown)" if partly else "")

    def line(name: str, item: dict[str, Any]) -> str:
        counts = f"{item['recordings']:>10} {item['tokens_in']:>12} {item['tokens_out']:>12}"
        return f"{name[:40]:<40} {counts}  {money(item)}"

    heading = "test" if group == "scope" else group
    click.echo(f"{heading:<40} {'recordings':>10} {'tokens in':>12} {'tokens out':>12}  cost")
    for item in summary["items"]:
        click.echo(line(item["group"], item))
    click.echo(line("total", summary["total"]))
