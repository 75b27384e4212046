"""`llmproxy run [record|replay] -- CMD`: a proxy for exactly the lifetime of one command."""

from __future__ import annotations

import asyncio
import os
import shlex
import signal

import structlog

from llmproxy.config import Settings
from llmproxy.server import ProxyServer

log = structlog.get_logger("llmproxy.run")

# Placeholder keys so SDKs that refuse to start without one start in replay; never sent anywhere.
DUMMY_KEYS = {
    "OPENAI_API_KEY": "sk-llmproxy-replay-placeholder",
    "ANTHROPIC_API_KEY": "sk-ant-llmproxy-replay-placeholder",
    "GEMINI_API_KEY": "llmproxy-replay-placeholder",
    "GOOGLE_API_KEY": "llmproxy-replay-placeholder",
    "AZURE_OPENAI_API_KEY": "llmproxy-replay-placeholder",
}


def client_environment(base_url: str, mode: str, environ: dict[str, str]) -> dict[str, str]:
    """The environment that points every supported SDK at the proxy."""
    env = dict(environ)
    env.update(
        {
            "LLMPROXY_URL": base_url,
            "OPENAI_BASE_URL": base_url + "/v1",
            "ANTHROPIC_BASE_URL": base_url,
            "OLLAMA_HOST": base_url,
            "GOOGLE_GEMINI_BASE_URL": base_url,
            "AZURE_OPENAI_ENDPOINT": base_url,
        }
    )
    if mode == "replay":
        for name, value in DUMMY_KEYS.items():
            env.setdefault(name, value)
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
