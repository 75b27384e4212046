"""The provider registry: one module per wire format."""

from __future__ import annotations

from llmproxy.providers.anthropic import AnthropicProvider
from llmproxy.providers.base import Provider
from llmproxy.providers.cohere import CohereProvider
from llmproxy.providers.gemini import GeminiProvider
from llmproxy.providers.mistral import MistralProvider
from llmproxy.providers.ollama import OllamaProvider
from llmproxy.providers.openai import AzureOpenAIProvider, OpenAIProvider
from llmproxy.providers.vertex import VertexProvider

PROVIDERS: dict[str, Provider] = {
    provider.name: provider
    for provider in (
        OpenAIProvider(),
        AzureOpenAIProvider(),
        AnthropicProvider(),
        OllamaProvider(),
        GeminiProvider(),
        CohereProvider(),
        VertexProvider(),
        MistralProvider(),
    )
}


def get_provider(name: str) -> Provider:
    try:
        return PROVIDERS[name]
    except KeyError:
        known = ", ".join(sorted(PROVIDERS))
        raise ValueError(f"unknown provider {name!r} (known: {known})") from None


def provider_for_label(label: str) -> Provider | None:
    """The provider whose foreign-recording labels include this `__type__`."""
    for provider in PROVIDERS.values():
        if label in provider.legacy_requests:
            return provider
    return None


__all__ = ["PROVIDERS", "Provider", "get_provider", "provider_for_label"]
