"""The provider registry: one module per wire format, listed once below.

Everything llmproxy knows about providers in general (which headers and query parameters are
credentials, which environment variables point SDKs at the proxy) is derived from this list.
"""

from __future__ import annotations

from llmproxy.providers.anthropic import AnthropicProvider
from llmproxy.providers.base import ClientSetting, Provider
from llmproxy.providers.bedrock import BedrockProvider
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
        BedrockProvider(),
        CohereProvider(),
        VertexProvider(),
        MistralProvider(),
    )
}


# Derived from the registry: which request headers and query parameters carry a credential
# (never on disk, in a key or a log line) and which headers say which provider a request is for.
CREDENTIAL_HEADERS: frozenset[str] = frozenset().union(*(p.credential_headers for p in PROVIDERS.values()))
CREDENTIAL_QUERY: frozenset[str] = frozenset().union(*(p.credential_query for p in PROVIDERS.values()))
IDENTITY_HEADERS: frozenset[str] = frozenset().union(*(p.identity_headers for p in PROVIDERS.values()))


# Placeholder keys for replay, so SDKs that refuse to start without a key start.
PLACEHOLDER_KEYS: dict[str, str] = {k: v for p in PROVIDERS.values() for k, v in p.placeholder_keys.items()}


def client_environment(base_url: str) -> dict[str, str]:
    """The environment variables that point every registered provider's SDKs at a proxy at
    `base_url`, each through its provider's prefix (OPENAI_BASE_URL=http://host:port/openai/v1)."""
    return {
        setting.variable: base_url.rstrip("/") + provider.prefix + setting.suffix
        for provider in PROVIDERS.values()
        for setting in provider.client_settings
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


__all__ = [
    "CREDENTIAL_HEADERS",
    "CREDENTIAL_QUERY",
    "IDENTITY_HEADERS",
    "PLACEHOLDER_KEYS",
    "PROVIDERS",
    "ClientSetting",
    "Provider",
    "client_environment",
    "get_provider",
    "provider_for_label",
]
