"""llmproxy: a recording proxy for LLM APIs."""

__version__ = "0.1.0"
