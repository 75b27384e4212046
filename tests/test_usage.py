"""Tokens and cost: each provider's usage shape, streamed and not; prices at the recording's date;
unknown models say unknown; `llmproxy cost`; what a replay run saved, in its report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmproxy.providers import Provider, get_provider
from llmproxy.usage import TokenUsage, bedrock_usage, price
from tests.support import REPO, LoopThread, start_proxy
from tests.ui_support import chat_recording, write_recording

genai_prices = pytest.importorskip("genai_prices", reason="prices need the cost extra (genai-prices)")

SEPT_2025 = datetime(2025, 9, 10, tzinfo=UTC)


def test_openai_chat_plain_and_streamed_include_usage() -> None:
    openai_provider = get_provider("openai")
    plain = {
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"}}],
        "usage": {"prompt_tokens": 30, "completion_tokens": 7, "prompt_tokens_details": {"cached_tokens": 10}},
    }
    assert openai_provider.usage("/v1/chat/completions", [plain]) == TokenUsage(30, 7, cache_read_tokens=10)
    stream = [
        {"choices": [{"index": 0, "delta": {"content": "Hi"}}], "usage": None},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": None},
        {"choices": [], "usage": {"prompt_tokens": 30, "completion_tokens": 7, "total_tokens": 37}},
    ]
    assert openai_provider.usage("/v1/chat/completions", stream) == TokenUsage(30, 7)
    # Without include_usage a stream reports nothing: no tokens, not zero tokens.
    assert openai_provider.usage("/v1/chat/completions", stream[:2]) is None


def test_openai_responses_plain_and_streamed() -> None:
    openai_provider = get_provider("openai")
    usage = {"input_tokens": 40, "output_tokens": 9, "input_tokens_details": {"cached_tokens": 0}}
    assert openai_provider.usage("/v1/responses", [{"object": "response", "usage": usage}]) == TokenUsage(40, 9)
    stream = [
        {"type": "response.created", "response": {"usage": None}},
        {"type": "response.output_text.delta", "delta": "Hi"},
        {"type": "response.completed", "response": {"object": "response", "usage": usage}},
    ]
    assert openai_provider.usage("/v1/responses", stream) == TokenUsage(40, 9)
    # Azure speaks OpenAI's format.
    assert get_provider("azure").usage("/openai/v1/responses", stream) == TokenUsage(40, 9)


def test_anthropic_message_and_stream_with_cumulative_deltas() -> None:
    anthropic_provider = get_provider("anthropic")
    message = {
        "type": "message",
        "role": "assistant",
        "content": [{"type": "text", "text": "Hi"}],
        "usage": {"input_tokens": 20, "output_tokens": 5, "cache_read_input_tokens": 100},
    }
    # Anthropic's input_tokens leaves cached tokens out; ours counts them.
    assert anthropic_provider.usage("/v1/messages", [message]) == TokenUsage(120, 5, cache_read_tokens=100)
    stream = [
        {"type": "message_start", "message": {"usage": {"input_tokens": 25, "output_tokens": 1}}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}},
        {"type": "message_delta", "delta": {"stop_reason": None}, "usage": {"output_tokens": 10}},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 15}},
        {"type": "message_stop"},
    ]
    # Cumulative: the last delta's 15, not 1 + 10 + 15.
    assert anthropic_provider.usage("/v1/messages", stream) == TokenUsage(25, 15)
    assert anthropic_provider.usage("/v1/messages/count_tokens", [{"input_tokens": 25}]) is None


def test_ollama_final_object_counts() -> None:
    ollama_provider = get_provider("ollama")
    stream = [
        {"model": "llama3.2", "message": {"role": "assistant", "content": "Hi"}, "done": False},
        {"model": "llama3.2", "done": True, "prompt_eval_count": 26, "eval_count": 12},
    ]
    assert ollama_provider.usage("/api/chat", stream) == TokenUsage(26, 12)
    plain = {"model": "llama3.2", "response": "Hi", "done": True, "prompt_eval_count": 8, "eval_count": 3}
    assert ollama_provider.usage("/api/generate", [plain]) == TokenUsage(8, 3)


def test_gemini_usage_metadata_last_wins_and_thoughts_are_output() -> None:
    gemini_provider = get_provider("gemini")
    path = "/v1beta/models/gemini-2.0-flash:streamGenerateContent"
    stream = [
        {"candidates": [{"content": {"parts": [{"text": "H"}]}}], "usageMetadata": {"promptTokenCount": 9}},
        {
            "candidates": [{"content": {"parts": [{"text": "i"}]}, "finishReason": "STOP"}],
            "usageMetadata": {"promptTokenCount": 9, "candidatesTokenCount": 4, "thoughtsTokenCount": 6},
        },
    ]
    assert gemini_provider.usage(path, stream) == TokenUsage(9, 10)
    # The Interactions API: usage on the interaction (streamed: in interaction.complete).
    usage = {"total_input_tokens": 2, "total_output_tokens": 10, "total_thought_tokens": 3, "total_cached_tokens": 0}
    events = [
        {"event_type": "interaction.start", "interaction": {"status": "in_progress"}},
        {"event_type": "interaction.complete", "interaction": {"status": "completed", "usage": usage}},
    ]
    assert gemini_provider.usage("/v1beta/interactions", events) == TokenUsage(2, 13)
    plain = {"usageMetadata": {"promptTokenCount": 9, "candidatesTokenCount": 4, "cachedContentTokenCount": 2}}
    assert gemini_provider.usage(path.replace("stream", "").replace(":G", ":g"), [plain]) == TokenUsage(9, 4, 2)


def test_bedrock_converse_stream_and_invoke_metrics() -> None:
    converse = {"output": {"message": {}}, "usage": {"inputTokens": 11, "outputTokens": 4, "totalTokens": 15}}
    assert bedrock_usage([converse]) == TokenUsage(11, 4)
    stream = [
        {"contentBlockDelta": {"delta": {"text": "Hi"}, "contentBlockIndex": 0}},
        {"metadata": {"usage": {"inputTokens": 11, "outputTokens": 6, "cacheReadInputTokens": 3}}},
    ]
    assert bedrock_usage(stream) == TokenUsage(14, 6, cache_read_tokens=3)
    invoke = [
        {"type": "message_stop", "amazon-bedrock-invocationMetrics": {"inputTokenCount": 7, "outputTokenCount": 2}}
    ]
    assert bedrock_usage(invoke) == TokenUsage(7, 2)
    # Providers without their own reader (bedrock, until it has one) still find it.
    assert Provider().usage("/model/x/converse", [converse]) == TokenUsage(11, 4)


def test_prices_use_the_recording_date_and_unknown_models_say_unknown() -> None:
    usage = TokenUsage(1_000_000, 1_000_000)
    cost = price(usage, "gpt-4o-2024-08-06", "openai", SEPT_2025)
    assert cost.usd == Decimal("12.5")  # $2.50 in + $10 out per million tokens
    unknown = price(usage, "no-such-model-7", "openai", SEPT_2025)
    assert unknown.usd is None and "not in the price table" in unknown.describe()
    assert price(usage, "llama3.2", "ollama", SEPT_2025).reason == "no price table for ollama"
    assert price(None, "gpt-4o", "openai", SEPT_2025).reason == "no usage in the answer"
    # Historic prices: this model's price changed on 2026-03-13; a recording is priced at its date.
    before = price(usage, "claude-sonnet-4-6", "anthropic", datetime(2026, 1, 1, tzinfo=UTC))
    after = price(usage, "claude-sonnet-4-6", "anthropic", datetime(2026, 4, 1, tzinfo=UTC))
    assert before.usd is not None and after.usd is not None and before.usd != after.usd


def test_cost_command_sums_per_model(tmp_path: Path) -> None:
    root = tmp_path / "recordings"
    write_recording(root, "a.json", chat_recording("q1", "a1", prompt_tokens=1000, completion_tokens=100))
    write_recording(root, "b.json", chat_recording("q2", "a2", prompt_tokens=2000, completion_tokens=200))
    write_recording(root, "c.json", chat_recording("q3", "a3", model="house-model-x"))
    result = subprocess.run(
        [sys.executable, "-m", "llmproxy", "cost", str(root)], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines()}
    # 3000 in at $2.50/M + 300 out at $10/M = $0.0105
    assert lines["gpt-4o"].split()[1:4] == ["2", "3000", "300"] and "$0.010500" in lines["gpt-4o"]
    assert lines["house-model-x"].rstrip().endswith("unknown")
    assert "$0.010500 (+1 unknown)" in lines["total"]


def test_replay_report_and_summary_say_what_replay_saved(tmp_path: Path, loop_thread: LoopThread) -> None:
    root = tmp_path / "recordings"
    write_recording(root, "a.json", chat_recording("What is 2+2?", "4.", prompt_tokens=1000, completion_tokens=1000))
    report = tmp_path / "report.json"
    proxy = start_proxy(loop_thread, "replay", root, report=report)
    try:
        client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="unused")
        for _ in range(2):
            stream = client.chat.completions.create(
                model="gpt-4o",
                messages=[{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}],
                temperature=0.2,
                stream=True,
                stream_options={"include_usage": True},
            )
            assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "4."
    finally:
        proxy.stop()
    saved = json.loads(report.read_text())["saved"]
    assert saved["replays"] == 2 and saved["input_tokens"] == 2000 and saved["output_tokens"] == 2000
    assert saved["cost_usd"] == pytest.approx(2 * (0.0025 + 0.01))
    assert saved["unknown"] == 0


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "usage",
                    "choices",
                    "delta",
                    "message",
                    "content",
                    "type",
                    "candidates",
                    "parts",
                    "usageMetadata",
                    "prompt_tokens",
                    "input_tokens",
                    "output",
                    "response",
                    "metadata",
                    "text",
                    "tool_calls",
                    "role",
                    "function",
                    "eval_count",
                    "contentBlockDelta",
                    "content_block",
                    "messages",
                    "contents",
                    "system",
                    "index",
                    "name",
                    "arguments",
                    "partial_json",
                    "functionCall",
                    "images",
                    "input",
                    "prompt",
                    "instructions",
                    "tool_call_id",
                    "inlineData",
                    "source",
                ]
            ),
            children,
            max_size=5,
        )
    ),
    max_leaves=20,
)


@settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(values=st.lists(JSON, max_size=4))
def test_usage_and_conversation_never_fail_on_any_json(values: list) -> None:
    """Recordings come from anywhere: any JSON gives usage or None, and bubbles, never an error."""
    from llmproxy.providers import PROVIDERS
    from llmproxy.tools.conversation import answer_bubbles, request_bubbles

    for provider in PROVIDERS.values():
        found = provider.usage("/v1/chat/completions", values)
        assert found is None or (found.input_tokens >= 0 and found.output_tokens >= 0)
    assert isinstance(answer_bubbles(values), list)
    for value in values:
        assert all(isinstance(b["text"], str) for b in request_bubbles(value))
