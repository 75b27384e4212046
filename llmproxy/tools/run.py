"""`llmproxy run [record|replay] -- CMD`: a proxy for exactly the lifetime of one command."""

from __future__ import annotations

import asyncio
import os
import shlex
import signal

import structlog

from llmproxy import providers
from llmproxy.config import Settings
from llmproxy.lastresort import install_loop_errors
from llmproxy.server import ProxyServer

log = structlog.get_logger("llmproxy.run")


def client_environment(base_url: str, mode: str, environ: dict[str, str]) -> dict[str, str]:
    """The environment that points every registered provider's SDKs at the proxy, each through
    its provider's prefix (OPENAI_BASE_URL=http://127.0.0.1:PORT/openai/v1, ...); in replay,
    placeholder keys too, so SDKs that refuse to start without one start (never sent anywhere)."""
    env = dict(environ)
    env["LLMPROXY_URL"] = base_url
    env.update(providers.client_environment(base_url))
    if mode == "replay":
        for name, value in providers.PLACEHOLDER_KEYS.items():
            env.setdefault(name, value)  # a real key the user has stays
    return env


def run_hint(settings: Settings, command: list[str]) -> str:
    """What a replay miss under `run` tells the user: the same command, recording what is missing."""
    parts = ["llmproxy run record-missing", f"--recordings {shlex.quote(str(settings.recordings))}"]
    if settings.config_path is not None:
        parts.append(f"--config {shlex.quote(str(settings.config_path))}")
    return " ".join([*parts, "--", shlex.join(command)])


async def run_command(settings: Settings, mode: str, command: list[str]) -> int:
    """Start the proxy (settings.port; 0 for a free one), run the command against it, stop,
    return its status."""
    install_loop_errors(asyncio.get_running_loop())
    server = ProxyServer(settings, mode)
    await server.start()
    base_url = f"http://{settings.host}:{server.port}"
    try:
        try:
            child = await asyncio.create_subprocess_exec(
                *command, env=client_environment(base_url, mode, dict(os.environ))
            )
        except OSError as exc:
            log.error("cannot start the command", command=command[0], error=exc.strerror)
            return 127
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, child.send_signal, sig)
        status = await child.wait()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    finally:
        await server.stop()
    # A child killed by a signal reports -N; shells report 128+N.
    return 128 - status if status < 0 else status
