"""What an upstream is to the pipeline: send a routed call, get a response to read.

The upstream never touches the client's socket: it hands back the status, the headers and an
async iterator over the body bytes, and the pipeline decides who gets them (the client, the
followers of an identical call, the recorder). Tests may implement this protocol with a double;
the proxy uses the aiohttp implementation in `upstream.client`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Literal, Protocol

from llmproxy.call import Call

FailureCode = Literal["no_upstream", "upstream_timeout", "upstream_unreachable", "internal_error"]


class UpstreamFailure(Exception):
    """No response at all (nothing to pass on or record); the client gets `status` and `code`."""

    def __init__(self, status: int, code: FailureCode, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class UpstreamBroken(Exception):
    """The upstream broke off in the middle of the body (reset, timeout, bad framing)."""


class UpstreamResponse(Protocol):
    status: int
    headers: list[tuple[str, str]]  # as received, duplicates kept
    url: str  # the URL the call went to (may hold secret query parameters: use safe_url to show it)
    headers_ms: float  # from sending the request to its response headers

    def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives (decompressed); raises UpstreamBroken when it is cut short."""
        ...

    def close(self) -> None:
        """Release the connection; closes it at once when the body was not read to its end."""
        ...


class Upstream(Protocol):
    read_timeout: float

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def send(self, call: Call) -> UpstreamResponse:
        """The upstream's response headers; raises UpstreamFailure when there are none."""
        ...
