"""What the text stream codecs (SSE, NDJSON) share: the capture and render loop.

A stream is a sequence of events (exact texts, from the codec's splitter). Events whose payload
is a JSON object or array become chunks; every other byte (comments, pings, `[DONE]`, the tail)
is kept as text in the framing, so rendering gives back the received bytes.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from llmproxy.wire.framing import CapturedBody, Format, JsonValue, Labeler, data_of, typed
from llmproxy.wire.json import NOT_JSON, StyleDetector, dumps, loads, set_style, style_of

_LINE_END = re.compile(r"\r\n|\n|\r")
LINE_ENDINGS = ("\n", "\r\n", "\r")


def line_ending_of(text: str) -> str:
    match = _LINE_END.search(text)
    return match.group(0) if match else "\n"


class TextStreamCodec:
    """Base of the text stream codecs; subclasses say how one event holds its payload."""

    name: str
    format: Format
    streaming = True

    def splitter(self) -> Any:
        raise NotImplementedError

    def payload(self, text: str) -> tuple[str | None, str | None]:
        """(event name, JSON text) of one event; None for what the event does not have."""
        raise NotImplementedError

    def frame(self, payload: str, event: str | None, line_ending: str) -> str:
        """The canonical text of an event holding `payload`."""
        raise NotImplementedError

    def event_field_of(self, event: str | None, value: Any) -> str | None:
        """The JSON field repeated as the event's name (SSE `event:` lines); none by default."""
        return None

    def extra_framing(self, framing: dict[str, Any], event_field: str | None) -> None:
        """Codec-specific framing fields written at capture."""

    def default_framing(
        self, *, line_ending: str = "\n", end: str = "", event_field: str | None = None
    ) -> dict[str, Any]:
        framing: dict[str, Any] = {"format": self.format.value, "line_ending": line_ending}
        self.extra_framing(framing, event_field)
        framing["end"] = end
        return framing

    def split(self, raw: bytes) -> tuple[list[bytes], bytes]:
        splitter = self.splitter()
        events = splitter.feed(raw)
        return events, splitter.close()

    def capture(self, raw: bytes, labeler: Labeler) -> CapturedBody:
        try:
            return self._capture(raw, labeler)
        except UnicodeDecodeError:
            from llmproxy.wire.opaque import OPAQUE  # here: an import statement costs each call

            return OPAQUE.capture(raw, labeler)

    def _capture(self, raw: bytes, labeler: Labeler) -> CapturedBody:
        events, remainder = self.split(raw)
        body: list[dict[str, Any]] = []
        chunk_ends: list[int] = []
        inserts: dict[str, str] = {}
        verbatim: dict[str, str] = {}
        pending = ""  # non-chunk text waiting for the next chunk (or the end)
        line_ending: str | None = None
        event_field: str | None = None
        # Events whose framing matched, for the style check: done for all of them at once below.
        framed: list[tuple[int, Any, str, str]] = []
        offset = 0
        for raw_event in events:
            offset += len(raw_event)
            text = raw_event.decode("utf-8")
            event_name, payload = self.payload(text)
            value = loads(payload) if payload else NOT_JSON
            if not isinstance(value, (dict, list)):
                pending += text
                continue
            assert payload is not None
            if line_ending is None:
                line_ending = line_ending_of(text)
                event_field = self.event_field_of(event_name, value)
            index = len(body)
            if pending:
                inserts[str(index)] = pending
                pending = ""
            # Both checks: the framing around the JSON (here), and the JSON's own spelling (below).
            if self.frame(payload, _event_name(value, event_field), line_ending) != text:
                verbatim[str(index)] = text
            else:
                framed.append((index, value, payload, text))
            body.append(typed(labeler(value), value))
            chunk_ends.append(offset)
        return self._finish(
            body, chunk_ends, inserts, verbatim, framed, line_ending, event_field, pending + remainder.decode("utf-8")
        )

    def _finish(
        self,
        body: list[dict[str, Any]],
        chunk_ends: list[int],
        inserts: dict[str, str],
        verbatim: dict[str, str],
        framed: list[tuple[int, Any, str, str]],
        line_ending: str | None,
        event_field: str | None,
        end: str,
    ) -> CapturedBody:
        """The JSON spelling check of the framed events, then the framing."""
        detector = StyleDetector()
        if not _all_compact(framed):
            for index, value, payload, text in framed:
                if not detector.accepts(value, payload):
                    verbatim[str(index)] = text
            verbatim = dict(sorted(verbatim.items(), key=lambda item: int(item[0])))  # in event order
        framing: dict[str, Any] = {"format": self.format.value, "line_ending": line_ending or "\n"}
        self.extra_framing(framing, event_field)
        set_style(framing, detector.style)
        framing["end"] = end
        if inserts:
            framing["inserts"] = inserts
        if verbatim:
            framing["verbatim"] = verbatim
        return CapturedBody(body, framing, chunk_ends, streaming=True)

    def render(self, body: Any, framing: dict[str, Any], json_value: JsonValue = data_of) -> list[bytes]:
        if not isinstance(body, list):
            raise ValueError(f"a {self.format} recording needs a list of chunks as its body")
        line_ending = framing.get("line_ending") or "\n"
        if line_ending not in LINE_ENDINGS:
            raise ValueError(f"bad line ending {line_ending!r}")
        event_field = framing.get("event_field")
        inserts = framing.get("inserts") or {}
        verbatim = framing.get("verbatim") or {}
        style = style_of(framing)
        segments: list[bytes] = []
        for index, item in enumerate(body):
            key = str(index)
            text = inserts.get(key, "")
            if key in verbatim:
                text += verbatim[key]
            else:
                data = data_of(item)
                text += self.frame(dumps(data, style), _event_name(data, event_field), line_ending)
            segments.append(text.encode("utf-8"))
        tail = inserts.get(str(len(body)), "") + (framing.get("end") or "")
        segments.append(tail.encode("utf-8"))
        return segments


def _all_compact(framed: list[tuple[int, Any, str, str]]) -> bool:
    """Whether orjson spells every payload exactly as received (the usual case), proven with one
    serialisation of them all instead of one per event. Each payload is one object or array:
    brackets delimit it, so equal joined texts mean equal texts one by one."""
    if not framed:
        return True
    values = [value for _, value, _, _ in framed]
    joined = "[" + ",".join(payload for _, _, payload, _ in framed) + "]"
    try:
        return orjson.dumps(values) == joined.encode("utf-8")
    except (TypeError, orjson.JSONEncodeError):  # e.g. integers orjson cannot write back
        return False


def _event_name(value: Any, event_field: str | None) -> str | None:
    if event_field is None:
        return None
    name = value.get(event_field) if isinstance(value, dict) else None
    return name if isinstance(name, str) else None
