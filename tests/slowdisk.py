"""Run `llmproxy` on a slow or stuck disk: every file given its name (the link that publishes a
recording) takes this long, or never completes.

    python -m tests.slowdisk 0.01 record ...    # 10 ms per recording file
    python -m tests.slowdisk stuck record ...   # no recording file is ever published

Like tests/netguard.py this changes the environment llmproxy runs in (the OS call that names a
file), not llmproxy: the proxy runs unmodified on top of it.
"""

from __future__ import annotations

import os
import sys
import threading
import time


def install(mode: str) -> None:
    real_link = os.link
    never = threading.Event()

    def slow_link(source, target, *args, **kwargs):  # type: ignore[no-untyped-def]
        if mode == "stuck":
            never.wait()
        else:
            time.sleep(float(mode))
        return real_link(source, target, *args, **kwargs)

    os.link = slow_link  # type: ignore[assignment]


if __name__ == "__main__":
    install(sys.argv[1])
    from llmproxy.cli import main

    sys.argv = ["llmproxy", *sys.argv[2:]]
    main()
