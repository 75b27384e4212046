"""What an upstream is to the pipeline: send a routed call, get a response to read.

The upstream never touches the client's socket: it hands back the status, the headers and an
async iterator over the body bytes, and the pipeline decides who gets them (the client, the
followers of an identical call, the recorder). Tests may implement this protocol with a double;
the proxy uses the aiohttp implementation in `upstream.client`.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator
from typing import Literal, Protocol

from yarl import URL

from llmproxy.call import Call
from llmproxy.headers import forward_request_headers

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


async def prepared_request(call: Call) -> tuple[str, str | URL, list[tuple[str, str]]]:
    """(the upstream URL, the target to send to, the headers to send) for a call, after its
    provider's hook (e.g. re-signing for the upstream's host); UpstreamFailure when it has no
    upstream or cannot be prepared."""
    route = call.route
    try:
        url = route.upstream_url(call.path, call.query_string)
        prepare = functools.partial(
            route.provider.prepare_upstream, call.method, url, forward_request_headers(call.raw_headers), call.body
        )
        if route.provider.prepare_blocks:
            target, headers = await asyncio.get_running_loop().run_in_executor(None, prepare)
        else:
            target, headers = prepare()
    except LookupError as exc:  # no upstream, or the provider cannot prepare the request
        raise UpstreamFailure(502, getattr(exc, "code", "no_upstream"), str(exc)) from None
    return url, target, headers
