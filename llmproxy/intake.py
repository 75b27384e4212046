"""Reading a client's request safely: whatever the client sends or does, the handler gets bytes
or a BadRequest (answered in the provider's error shape, logged as one line), never an
exception that turns into a bare 500 with a traceback."""

from __future__ import annotations

import asyncio
import hmac

import structlog
from aiohttp import ClientPayloadError, http_exceptions, web
from aiohttp.web_protocol import RequestPayloadError

from llmproxy.canonical import BadRequest, header_bytes

log = structlog.get_logger("llmproxy.server")


class ClientGone(BadRequest):
    """The client closed the connection before its request body arrived: nobody to answer."""

    def __init__(self) -> None:
        super().__init__(
            400,
            "client_closed_request",
            "the client closed the connection during the request body",
            "client left during the request body",
        )


async def read_body(request: web.Request, limit: int) -> bytes:
    """The request body as aiohttp decoded it (it undoes Content-Encoding), or BadRequest."""
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise BadRequest(
            413, "body_too_large", f"request body exceeds the {limit} byte limit", "request body too large"
        ) from None
    except (http_exceptions.ContentEncodingError, RequestPayloadError) as exc:
        if not isinstance(exc, http_exceptions.ContentEncodingError) and not isinstance(
            exc.__cause__, http_exceptions.ContentEncodingError
        ):
            raise _unreadable(request) from None
        encoding = request.headers.get("Content-Encoding", "")
        raise BadRequest(
            400, "bad_content_encoding", f"the request body is not valid {encoding or 'encoded'} data"
        ) from None
    except (ConnectionError, ClientPayloadError, asyncio.IncompleteReadError, http_exceptions.HttpProcessingError):
        raise _unreadable(request) from None


def _unreadable(request: web.Request) -> BadRequest:
    # aiohttp reports a body cut short by the client's leaving as one of several errors.
    if request.transport is None or request.transport.is_closing():
        return ClientGone()
    return BadRequest(400, "bad_request_body", "the request body could not be read")


def token_matches(sent: str | None, token: str) -> bool:
    """Constant-time token check on the header's bytes (any bytes a client sends, 0xff included)."""
    return hmac.compare_digest(header_bytes(sent or ""), token.encode())
