from __future__ import annotations

from collections.abc import Iterator

import pytest

from llmproxy.logs import configure_logging
from tests.support import LoopThread

configure_logging(level="info")


@pytest.fixture(scope="session")
def loop_thread() -> Iterator[LoopThread]:
    loop = LoopThread()
    yield loop
    loop.close()
