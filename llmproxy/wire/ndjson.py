"""NDJSON (Ollama, JSON Lines): one JSON value per line."""

from __future__ import annotations

from llmproxy.wire.framing import Format
from llmproxy.wire.textstream import TextStreamCodec


class NdjsonSplitter:
    """Complete lines, each with its line end; the bytes after the last line end wait."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        cut = self._buffer.rfind(b"\n") + 1
        if cut == 0:
            return []
        lines, self._buffer = self._buffer[:cut].splitlines(keepends=True), self._buffer[cut:]
        return lines

    def close(self) -> bytes:
        rest, self._buffer = self._buffer, b""
        return rest


class NdjsonCodec(TextStreamCodec):
    name = "ndjson"
    format = Format.NDJSON
    content_types = {Format.NDJSON: "application/x-ndjson"}
    media_types = ("application/x-ndjson", "application/jsonl", "application/json-seq")

    def splitter(self) -> NdjsonSplitter:
        return NdjsonSplitter()

    def payload(self, text: str) -> tuple[str | None, str | None]:
        return None, text.rstrip("\r\n") or None

    def frame(self, payload: str, event: str | None, line_ending: str) -> str:
        return f"{payload}{line_ending}"


NDJSON = NdjsonCodec()
