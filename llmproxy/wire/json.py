"""JSON: whole-body codec, and how an upstream spells JSON (its style), for every codec.

Upstreams write the same value differently: many compactly as orjson does (Node's JSON.stringify
differs only for floats of 1e20 and up), Python servers with `json.dumps` defaults (`", "`,
`": "`, `\\uXXXX` escapes, `5.978460467304103e-05`). A recording stores the parsed value
(readable) plus its style, so replay writes the exact bytes; texts no style reproduces (exotic
spacing, numbers past 64 bits) are kept verbatim.
"""

from __future__ import annotations

import json as stdlib_json
from enum import StrEnum
from typing import Any

import orjson

from llmproxy.wire.framing import CapturedBody, Format, JsonValue, Labeler, Splitter, WholeBody, data_of, typed


class JsonStyle(StrEnum):
    """`framing.json_style`: a serialiser whose output matched every JSON text of a recording."""

    ORJSON = "orjson"  # compact, UTF-8 as is (the default: files without json_style)
    PYTHON = "python"  # json.dumps defaults: ", " and ": ", non-ASCII as \uXXXX
    PYTHON_UNICODE = "python-unicode"  # ", " and ": ", ensure_ascii=False
    PYTHON_COMPACT = "python-compact"  # separators=(",", ":"), non-ASCII as \uXXXX
    PYTHON_COMPACT_UNICODE = "python-compact-unicode"  # separators=(",", ":"), ensure_ascii=False
    KEY_SPACED = "key-spaced"  # "," and ": ", UTF-8 as is (Gemini and Vertex stream events)
    INDENT_2 = "indent-2"  # json.dumps(indent=2): pretty-printed bodies
    INDENT_2_UNICODE = "indent-2-unicode"  # json.dumps(indent=2, ensure_ascii=False)


_PYTHON_OPTIONS: dict[JsonStyle, dict[str, Any]] = {
    JsonStyle.PYTHON: {"separators": (", ", ": "), "ensure_ascii": True},
    JsonStyle.PYTHON_UNICODE: {"separators": (", ", ": "), "ensure_ascii": False},
    JsonStyle.PYTHON_COMPACT: {"separators": (",", ":"), "ensure_ascii": True},
    JsonStyle.PYTHON_COMPACT_UNICODE: {"separators": (",", ":"), "ensure_ascii": False},
    JsonStyle.KEY_SPACED: {"separators": (",", ": "), "ensure_ascii": False},
    JsonStyle.INDENT_2: {"indent": 2, "ensure_ascii": True},
    JsonStyle.INDENT_2_UNICODE: {"indent": 2, "ensure_ascii": False},
}


def dumps(value: Any, style: JsonStyle = JsonStyle.ORJSON) -> str:
    """The JSON text of a value as a serialiser of this style writes it."""
    if style is JsonStyle.ORJSON:
        return orjson.dumps(value).decode("utf-8")
    return stdlib_json.dumps(value, **_PYTHON_OPTIONS[style])


def style_of(framing: dict[str, Any]) -> JsonStyle:
    """The recording's style; raises ValueError for a name this version does not know."""
    name = framing.get("json_style")
    if name is None:
        return JsonStyle.ORJSON
    try:
        return JsonStyle(name)
    except ValueError:
        raise ValueError(f"unknown json_style {name!r}") from None


def set_style(framing: dict[str, Any], style: JsonStyle) -> None:
    if style is not JsonStyle.ORJSON:
        framing["json_style"] = style.value


NOT_JSON = object()


def loads(text: str | bytes) -> Any:
    """The parsed value, or NOT_JSON."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return NOT_JSON


class StyleDetector:
    """Finds the one style that reproduces a recording's JSON texts, fed one text at a time.

    Starts with orjson's; switches once a text needs another style, if that style also
    reproduces every text accepted before. A text no style reproduces is for verbatim."""

    # After this many texts no style reproduced, the upstream's serialiser is none of ours: stop
    # trying the others on every text (each try is a full serialisation).
    GIVE_UP_AFTER = 8

    def __init__(self) -> None:
        self.style = JsonStyle.ORJSON
        self._accepted: list[tuple[Any, str]] = []
        self._misses = 0

    def accepts(self, value: Any, text: str) -> bool:
        """Whether rendering `value` in the recording's style gives back `text` exactly."""
        # Numbers orjson could not keep (integers past 64 bits read as floats) never render back
        # to their text, so the comparison alone sends them to verbatim.
        if dumps(value, self.style) == text:
            self._accepted.append((value, text))
            return True
        if self._misses >= self.GIVE_UP_AFTER:
            return False
        for style in JsonStyle:
            if style is self.style or dumps(value, style) != text:
                continue
            if all(dumps(old_value, style) == old_text for old_value, old_text in self._accepted):
                self.style = style
                self._accepted.append((value, text))
                return True
        self._misses += 1
        return False


class JsonCodec:
    name = "json"
    content_types = {Format.JSON: "application/json"}
    media_types = ("application/json",)
    streaming = False

    def splitter(self) -> Splitter:
        return WholeBody()

    def default_framing(self) -> dict[str, Any]:
        return {"format": Format.JSON.value}

    def capture(self, raw: bytes, labeler: Labeler) -> CapturedBody:
        value = loads(raw) if raw and not raw.isspace() else NOT_JSON
        if value is NOT_JSON:
            # Imported here, where needed: an import statement costs each call that runs it.
            from llmproxy.wire.opaque import OPAQUE  # a body that is not JSON after all

            return OPAQUE.capture(raw, labeler)
        framing: dict[str, Any] = {"format": Format.JSON.value}
        body = raw.rstrip(b" \t\r\n")
        compact = orjson.dumps(value)
        if compact == body:
            # The usual: orjson's own spelling, which the detector tries first. Compared as bytes
            # (orjson.loads has proven them UTF-8; the stripped tail is ASCII).
            if len(body) != len(raw):
                framing["end"] = raw[len(body) :].decode("ascii")
            return CapturedBody(typed(labeler(value), value), framing, compact=compact)
        text = raw.decode("utf-8")
        body_text = text.rstrip(" \t\r\n")
        detector = StyleDetector()
        if detector.accepts(value, body_text):
            set_style(framing, detector.style)
            if body_text != text:
                framing["end"] = text[len(body_text) :]
        else:
            framing["verbatim"] = {"0": text}
        return CapturedBody(typed(labeler(value), value), framing, compact=compact)

    def render(self, body: Any, framing: dict[str, Any], json_value: JsonValue = data_of) -> list[bytes]:
        verbatim = framing.get("verbatim") or {}
        if "0" in verbatim:
            return [str(verbatim["0"]).encode("utf-8")]
        style = style_of(framing)
        value = json_value(body)
        end = framing.get("end") or ""
        if style is JsonStyle.ORJSON and not end:
            return [orjson.dumps(value)]
        return [(dumps(value, style) + end).encode("utf-8")]


JSON = JsonCodec()
