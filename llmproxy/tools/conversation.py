"""A recording as a conversation: the request's turns and the answer, as chat bubbles.

Every provider's message shapes (OpenAI chat and Responses, Anthropic, Ollama, Gemini, Bedrock
Converse) become one list of bubbles: role, kind (text, tool_call, tool_result, image) and text.
Images and audio become placeholders: a browser page never gets megabytes of base64.
"""

from __future__ import annotations

from typing import Any, Literal, TypedDict

import orjson

Kind = Literal["text", "tool_call", "tool_result", "image", "other"]
MAX_TEXT = 20_000


class Bubble(TypedDict):
    role: str
    kind: Kind
    text: str
    name: str


def _dumps(value: Any) -> str:
    if value is None:
        return ""
    try:
        return orjson.dumps(value, default=str).decode()
    except TypeError:  # e.g. an integer beyond 64 bits
        return repr(value)


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _list(value: Any) -> list[Any]:
    """A field that should hold a list; anything else (a recorder's quirk) holds nothing."""
    return value if isinstance(value, list) else []


def bubble(role: str, kind: Kind, text: Any, name: str = "") -> Bubble:
    if not isinstance(text, str):
        text = _dumps(text)
    return {"role": role, "kind": kind, "text": text[:MAX_TEXT], "name": name}


def _image(part: dict[str, Any]) -> str:
    for key in ("image_url", "url", "file_uri", "fileUri"):
        value = part.get(key)
        if isinstance(value, dict):
            value = value.get("url")
        if isinstance(value, str):
            return "[image: data URL]" if value.startswith("data:") else f"[image: {value[:200]}]"
    mime = part.get("mimeType") or part.get("mime_type") or part.get("media_type")
    source = part.get("source")
    if isinstance(source, dict):
        mime = source.get("media_type") or mime
    return f"[image{': ' + mime if isinstance(mime, str) else ''}]"


def parts(role: str, content: Any) -> list[Bubble]:
    """Bubbles of one message's content, whatever its provider's part shapes."""
    if content is None:
        return []
    if isinstance(content, str):
        return [bubble(role, "text", content)] if content else []
    if isinstance(content, list):
        return [b for part in content for b in parts(role, part)]
    if not isinstance(content, dict):
        return [bubble(role, "text", str(content))]
    kind = content.get("type")
    if "text" in content and isinstance(content["text"], str):  # text, input_text, output_text, Gemini
        return [bubble(role, "text", content["text"])]
    if kind in ("image_url", "input_image", "image") or "inlineData" in content or "image" in content:
        inline = content.get("inlineData") or content.get("image")
        return [bubble(role, "image", _image(inline if isinstance(inline, dict) else content))]
    if kind in ("input_audio", "audio", "input_file", "file", "document") or "fileData" in content:
        return [bubble(role, "image", f"[{kind or 'file'}]")]
    if kind == "tool_use" or "functionCall" in content or "toolUse" in content:
        call = content.get("functionCall") or content.get("toolUse") or content
        call = call if isinstance(call, dict) else content
        arguments = call.get("input", call.get("args"))
        return [bubble(role, "tool_call", arguments, str(call.get("name", "")))]
    if kind == "tool_result" or "functionResponse" in content or "toolResult" in content:
        result = content.get("functionResponse") or content.get("toolResult") or content
        result = result if isinstance(result, dict) else content
        value = result.get("content", result.get("response"))
        name = result.get("name") or result.get("tool_use_id") or result.get("toolUseId") or ""
        return [bubble("tool", "tool_result", _flatten(value), str(name))]
    if kind in ("thinking", "reasoning"):
        return [bubble(role, "other", content.get("thinking") or content.get("summary") or "", "thinking")]
    if kind == "function_call":  # Responses API input/output items
        return [bubble("assistant", "tool_call", content.get("arguments"), str(content.get("name", "")))]
    if kind == "function_call_output":
        return [bubble("tool", "tool_result", content.get("output"), str(content.get("call_id", "")))]
    if "content" in content or "parts" in content:
        return parts(str(content.get("role", role)), content.get("content", content.get("parts")))
    return [bubble(role, "other", content)]


def _flatten(value: Any) -> Any:
    """A tool result's content as text when it is text blocks."""
    if isinstance(value, list) and all(isinstance(item, dict) and "text" in item for item in value):
        return "\n".join(str(item["text"]) for item in value)
    return value


def _message(message: Any, default_role: str = "user") -> list[Bubble]:
    if not isinstance(message, dict):
        return parts(default_role, message)
    role = str(message.get("role") or default_role)
    if role == "model":
        role = "assistant"
    if message.get("type") in ("function_call", "function_call_output"):
        return parts(role, message)
    found = parts(role, message.get("content", message.get("parts")))
    if role == "tool":  # OpenAI and Ollama tool results
        name = str(message.get("tool_call_id") or message.get("tool_name") or message.get("name") or "")
        found = [bubble("tool", "tool_result", b["text"], name) if b["kind"] == "text" else b for b in found]
    for image in _list(message.get("images")):  # Ollama
        found.append(bubble(role, "image", "[image]" if isinstance(image, str) else _image(image)))
    for call in _list(message.get("tool_calls")):  # OpenAI and Ollama assistant turns
        if isinstance(call, dict):
            function = call.get("function") if isinstance(call.get("function"), dict) else {}
            found.append(bubble(role, "tool_call", function.get("arguments"), str(function.get("name", ""))))
    return found


def request_bubbles(body: Any) -> list[Bubble]:
    """The request's conversation: system first, then each turn in order."""
    if not isinstance(body, dict):
        return [] if body is None else [bubble("request", "other", "non-JSON body")]
    found: list[Bubble] = []
    for key in ("system", "instructions", "systemInstruction", "system_instruction"):
        if body.get(key):
            found += parts("system", body[key])
    for message in _list(body.get("messages")):
        found += _message(message)
    for content in _list(body.get("contents")):  # Gemini
        found += _message(content)
    if isinstance(body.get("input"), list):  # Responses API items
        for item in body["input"]:
            found += _message(item)
    for key in ("input", "prompt"):  # Responses string input, completions, Ollama generate
        if isinstance(body.get(key), str):
            found.append(bubble("user", "text", body[key]))
    found += [bubble("user", "image", "[image]") for _ in _list(body.get("images"))]
    return found


def answer_bubbles(values: list[Any]) -> list[Bubble]:
    """The answer, assembled from a stream's chunks or read from the body, as bubbles."""
    text: list[str] = []
    thinking: list[str] = []
    found: list[Bubble] = []
    calls: dict[tuple[str, str], dict[str, Any]] = {}
    for value in values:
        if not isinstance(value, dict):
            continue
        for choice in _list(value.get("choices")):  # OpenAI chat/completions
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta") or choice.get("message") or {}
            delta = delta if isinstance(delta, dict) else {}
            if isinstance(delta.get("content"), str):
                text.append(delta["content"])
            elif isinstance(choice.get("text"), str):
                text.append(choice["text"])
            for call in _list(delta.get("tool_calls")):
                if not isinstance(call, dict):
                    continue
                where = (repr(choice.get("index")), repr(call.get("index", call.get("id"))))
                slot = calls.setdefault(where, {"name": "", "args": ""})
                function = call.get("function") if isinstance(call.get("function"), dict) else {}
                name, arguments = function.get("name"), function.get("arguments")
                slot["name"] += name if isinstance(name, str) else ""
                slot["args"] += arguments if isinstance(arguments, str) else _dumps(arguments)
        kind = value.get("type")
        if kind == "content_block_start":  # Anthropic stream
            block = value.get("content_block")
            if isinstance(block, dict) and block.get("type") == "tool_use":
                calls[("a", repr(value.get("index")))] = {"name": str(block.get("name", "")), "args": ""}
        if kind == "content_block_delta" and isinstance(value.get("delta"), dict):
            delta = value["delta"]
            if delta.get("type") == "input_json_delta":
                slot = calls.setdefault(("a", repr(value.get("index"))), {"name": "", "args": ""})
                partial = delta.get("partial_json")
                slot["args"] += partial if isinstance(partial, str) else ""
            elif isinstance(delta.get("text"), str):
                text.append(delta["text"])
            elif isinstance(delta.get("thinking"), str):
                thinking.append(delta["thinking"])
        if value.get("event_type") == "content.delta" and isinstance(value.get("delta"), dict):  # Gemini Interactions
            if isinstance(value["delta"].get("text"), str):
                text.append(value["delta"]["text"])
        if kind == "message" and value.get("role") == "assistant":  # Anthropic message
            found += parts("assistant", value.get("content"))
        if kind == "response.output_text.delta":  # Responses stream
            text.append(_str(value.get("delta")))
        if value.get("object") == "response" and isinstance(value.get("output"), list):
            for item in value["output"]:
                found += _message(item, "assistant")
        if isinstance(value.get("message"), dict):  # Ollama chat
            message = value["message"]
            text.append(_str(message.get("content")))
            found += [b for b in _message({**message, "content": None}, "assistant") if b["kind"] != "text"]
        if isinstance(value.get("response"), str):  # Ollama generate
            text.append(value["response"])
        for candidate in _list(value.get("candidates")):  # Gemini
            content = candidate.get("content") if isinstance(candidate, dict) else None
            for part in _list((content if isinstance(content, dict) else {}).get("parts")):
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    text.append(part["text"])
                else:
                    found += parts("assistant", part)
        output = value.get("output")
        if isinstance(output, dict) and isinstance(output.get("message"), dict):  # Bedrock Converse
            found += _message(output["message"], "assistant")
        if isinstance(value.get("contentBlockDelta"), dict):  # Bedrock converse-stream
            delta = value["contentBlockDelta"].get("delta")
            text.append(_str(delta.get("text")) if isinstance(delta, dict) else "")
        summary = _listing(value)
        if summary:
            found.append(bubble("assistant", "other", summary))
        if isinstance(value.get("error"), dict | str) and not found:
            found.append(bubble("error", "other", value["error"]))
    joined = "".join(text)
    answer = [bubble("assistant", "other", "".join(thinking), "thinking")] if thinking else []
    answer += [bubble("assistant", "text", joined)] if joined else []
    answer += [bubble("assistant", "tool_call", call["args"], call["name"]) for call in calls.values()]
    return answer + found


def _listing(value: dict[str, Any]) -> str:
    """Embeddings and model lists, summarised: numbers nobody reads in a chat bubble."""
    vectors = value.get("embeddings")  # Ollama embed
    if not isinstance(vectors, list):
        data = _list(value.get("data"))
        vectors = [item.get("embedding") for item in data if isinstance(item, dict) and "embedding" in item]
        if not vectors and data and all(isinstance(item, dict) and item.get("object") == "model" for item in data):
            return f"[{len(data)} models]"
    if vectors:
        first = vectors[0]
        size = len(first) if isinstance(first, list) else "base64"
        return f"[{len(vectors)} embedding(s) of {size} dimensions]"
    if isinstance(value.get("embedding"), list):  # Ollama embeddings, one vector
        return f"[1 embedding of {len(value['embedding'])} dimensions]"
    models = value.get("models")  # Ollama tags and ps
    if isinstance(models, list) and all(isinstance(m, dict) for m in models):
        return f"[{len(models)} models: {', '.join(str(m.get('name') or m.get('model') or '?') for m in models[:10])}]"
    return ""


def answer_text(values: list[Any]) -> str:
    """The answer as plain text (for search and for the diff)."""
    lines = []
    for item in answer_bubbles(values):
        prefix = f"[{item['kind']} {item['name']}] " if item["kind"] != "text" else ""
        lines.append(prefix + item["text"])
    return "\n".join(lines)
