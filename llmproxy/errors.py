"""One exception tree: everything llmproxy raises on purpose is an `LlmproxyError`.

Callers that must survive bad input (a recording that cannot be read, a config that cannot be
used) catch the branch they mean, never a bare `ValueError`/`TypeError` mix. Children that
replaced a `ValueError` keep it as a base, so older `except ValueError` callers still work.
"""

from __future__ import annotations


class LlmproxyError(Exception):
    """Base of every error llmproxy raises on purpose; the message says what and why."""


class ConfigError(LlmproxyError, ValueError):
    """A config file, option or environment value that cannot be used."""


class StartupError(LlmproxyError):
    """The proxy cannot start as configured (e.g. replay with no recordings directory)."""


# Further children live next to the code that raises them:
#   llmproxy.store.directory.StoreError    a file in the recordings directory that cannot be read
#   llmproxy.store.document.RecordingError a recording whose content is not a usable exchange
#   llmproxy.tools.report.ReportError      a usage report that cannot be used for pruning


class ResponseAbandoned(LlmproxyError, ConnectionResetError):
    """An answer already under way was cut off after an unexpected error, which was logged once
    already (one redacted line): aiohttp sees the connection end, the log sees nothing more."""
