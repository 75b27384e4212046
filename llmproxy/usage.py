"""Tokens and cost: what a recorded answer used, and what it would cost at the recording's date.

Each provider reads its own usage block (`Provider.usage`); this module holds the small typed
result, the shapes shared across providers, and the price lookup. Prices come from the
maintained `genai-prices` table (the optional `cost` extra). When a model, provider or the
table is unknown the cost is "unknown", never a guess.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

# llmproxy's provider names -> genai-prices provider ids; the others have no price table.
PRICE_PROVIDERS: Mapping[str, str] = {
    "openai": "openai",
    "azure": "azure",
    "anthropic": "anthropic",
    "gemini": "google",
    "bedrock": "aws",
    "cohere": "cohere",
    "mistral": "mistral",
}


@dataclass(frozen=True, slots=True)
class TokenUsage:
    """Tokens of one answer. `input_tokens` counts every prompt token, cached ones included."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0

    @property
    def total(self) -> int:
        return self.input_tokens + self.output_tokens

    def __add__(self, other: TokenUsage) -> TokenUsage:
        return TokenUsage(
            self.input_tokens + other.input_tokens,
            self.output_tokens + other.output_tokens,
            self.cache_read_tokens + other.cache_read_tokens,
            self.cache_write_tokens + other.cache_write_tokens,
        )

    def as_dict(self) -> dict[str, int]:
        return {
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cache_read_tokens": self.cache_read_tokens,
            "cache_write_tokens": self.cache_write_tokens,
        }


@dataclass(frozen=True, slots=True)
class Cost:
    """A price in USD, or None with the reason it is unknown."""

    usd: Decimal | None
    reason: str = ""

    @property
    def known(self) -> bool:
        return self.usd is not None

    def describe(self) -> str:
        return f"${self.usd:.6f}" if self.usd is not None else f"unknown ({self.reason})"


def count(value: Any) -> int:
    """A token count from a usage field: whole numbers only (None, strings, bools count 0)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0
    if isinstance(value, float) and not math.isfinite(value):
        return 0
    return max(int(value), 0)


def openai_usage(values: Iterable[Any]) -> TokenUsage | None:
    """Chat/completions/embeddings `usage` (the last chunk of a stream with include_usage), and
    the Responses API's `response.usage` (in response.completed when streamed)."""
    found = None
    for value in values:
        if not isinstance(value, dict):
            continue
        usage = value.get("usage")
        if not isinstance(usage, dict) and isinstance(value.get("response"), dict):
            usage = value["response"].get("usage")
        if not isinstance(usage, dict):
            continue
        if "prompt_tokens" in usage:
            details = usage.get("prompt_tokens_details") or {}
            found = TokenUsage(
                input_tokens=count(usage.get("prompt_tokens")),
                output_tokens=count(usage.get("completion_tokens")),
                cache_read_tokens=count(details.get("cached_tokens")) if isinstance(details, dict) else 0,
            )
        elif "input_tokens" in usage:
            details = usage.get("input_tokens_details") or {}
            found = TokenUsage(
                input_tokens=count(usage.get("input_tokens")),
                output_tokens=count(usage.get("output_tokens")),
                cache_read_tokens=count(details.get("cached_tokens")) if isinstance(details, dict) else 0,
            )
    return found


def anthropic_usage(values: Iterable[Any]) -> TokenUsage | None:
    """A Message's `usage`, or a stream's: message_start's, then each message_delta's counts,
    which are cumulative (so the latest value of each field wins, never a sum)."""
    fields: dict[str, Any] = {}
    for value in values:
        if not isinstance(value, dict):
            continue
        usage = value.get("usage")
        if value.get("type") == "message_start" and isinstance(value.get("message"), dict):
            usage = value["message"].get("usage")
        if isinstance(usage, dict):
            fields.update({name: item for name, item in usage.items() if item is not None})
    if not fields:
        return None
    cache_read = count(fields.get("cache_read_input_tokens"))
    cache_write = count(fields.get("cache_creation_input_tokens"))
    # Anthropic's input_tokens leaves out cached tokens; ours counts every prompt token.
    return TokenUsage(
        input_tokens=count(fields.get("input_tokens")) + cache_read + cache_write,
        output_tokens=count(fields.get("output_tokens")),
        cache_read_tokens=cache_read,
        cache_write_tokens=cache_write,
    )


def ollama_usage(values: Iterable[Any]) -> TokenUsage | None:
    """`prompt_eval_count` and `eval_count`, on the final (done) object of a stream or the body."""
    found = None
    for value in values:
        if isinstance(value, dict) and ("prompt_eval_count" in value or "eval_count" in value):
            found = TokenUsage(count(value.get("prompt_eval_count")), count(value.get("eval_count")))
    return found


def gemini_usage(values: Iterable[Any]) -> TokenUsage | None:
    """`usageMetadata`: cumulative in a stream, so the last one holds the totals; and the
    Interactions API's `usage` (on the interaction, in `interaction.complete` when streamed)."""
    found = None
    for value in values:
        if not isinstance(value, dict):
            continue
        interaction = value.get("interaction") if isinstance(value.get("interaction"), dict) else value
        usage = interaction.get("usage")
        if isinstance(usage, dict) and "total_input_tokens" in usage:
            found = TokenUsage(
                input_tokens=count(usage.get("total_input_tokens")),
                output_tokens=count(usage.get("total_output_tokens")) + count(usage.get("total_thought_tokens")),
                cache_read_tokens=count(usage.get("total_cached_tokens")),
            )
        meta = value.get("usageMetadata")
        if isinstance(meta, dict):
            found = TokenUsage(
                input_tokens=count(meta.get("promptTokenCount")),
                # Thinking tokens are billed as output.
                output_tokens=count(meta.get("candidatesTokenCount")) + count(meta.get("thoughtsTokenCount")),
                cache_read_tokens=count(meta.get("cachedContentTokenCount")),
            )
    return found


def bedrock_usage(values: Iterable[Any]) -> TokenUsage | None:
    """Bedrock Converse `usage` (or a converse-stream `metadata` event's), and InvokeModel's
    `amazon-bedrock-invocationMetrics`; Anthropic bodies through InvokeModel read as Anthropic."""
    found = None
    items = list(values)
    for value in items:
        if not isinstance(value, dict):
            continue
        metadata = value.get("metadata")
        usage = metadata.get("usage") if isinstance(metadata, dict) else value.get("usage")
        if isinstance(usage, dict) and "inputTokens" in usage:
            cache_read = count(usage.get("cacheReadInputTokens"))
            cache_write = count(usage.get("cacheWriteInputTokens"))
            found = TokenUsage(
                count(usage.get("inputTokens")) + cache_read + cache_write,
                count(usage.get("outputTokens")),
                cache_read,
                cache_write,
            )
        metrics = value.get("amazon-bedrock-invocationMetrics")
        if isinstance(metrics, dict):
            found = TokenUsage(count(metrics.get("inputTokenCount")), count(metrics.get("outputTokenCount")))
    return found or anthropic_usage(items)


def any_usage(values: Iterable[Any]) -> TokenUsage | None:
    """Usage in whichever known shape the values hold (providers without their own reader)."""
    items = list(values)
    for reader in (openai_usage, gemini_usage, ollama_usage, bedrock_usage):
        found = reader(items)
        if found is not None:
            return found
    return None


def warm_prices() -> None:
    """Load the price table now (a fraction of a second) rather than at the first price asked."""
    price(TokenUsage(1, 1), "gpt-4o", "openai", None)


def price(usage: TokenUsage | None, model: str | None, provider: str, when: datetime | None) -> Cost:
    """What `usage` cost with `model` at `when` (the recording's date: prices change)."""
    if usage is None:
        return Cost(None, "no usage in the answer")
    if not model:
        return Cost(None, "no model")
    price_provider = PRICE_PROVIDERS.get(provider)
    if price_provider is None:
        return Cost(None, f"no price table for {provider}")
    try:
        from genai_prices import Usage, calc_price
    except ImportError:
        return Cost(None, "prices need the cost extra: pip install 'llmproxy[cost]'")
    try:
        calculation = calc_price(
            Usage(
                input_tokens=usage.input_tokens,
                output_tokens=usage.output_tokens,
                cache_read_tokens=usage.cache_read_tokens,
                cache_write_tokens=usage.cache_write_tokens,
            ),
            model,
            provider_id=price_provider,
            genai_request_timestamp=when,
        )
    except LookupError:
        return Cost(None, f"{model} is not in the price table")
    except (ValueError, TypeError, ArithmeticError) as exc:
        return Cost(None, f"price lookup failed: {exc}")
    return Cost(calculation.total_price)
