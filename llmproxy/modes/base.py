"""What a mode is: the part that decides what answers a routed call.

Record forwards it (and records the answer), replay looks it up; both get the same Call from
the same routing layer.
"""

from __future__ import annotations

from typing import Protocol

from aiohttp import web

from llmproxy.call import Call, Outcome


class Mode(Protocol):
    name: str
    outcome: Outcome

    async def start(self) -> None: ...

    async def wait_ready(self) -> None: ...

    async def close(self) -> None: ...

    async def handle(self, request: web.Request, call: Call) -> web.StreamResponse: ...
