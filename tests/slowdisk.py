"""Run `llmproxy` on a slow or stuck disk: every file given its name (the link that publishes a
recording) takes this long, or never completes.

    python -m tests.slowdisk 0.01 record ...    # 10 ms per recording file
    python -m tests.slowdisk stuck record ...   # no recording file is ever published
    python -m tests.slowdisk journal-full record ...   # appending to the journal fails (ENOSPC)

The processes llmproxy starts (its file writer) run on the same disk: the mode is passed on in
LLMPROXY_TEST_SLOWDISK, and tests/slowdisk_site/sitecustomize.py installs it in them.

Like tests/netguard.py this changes the environment llmproxy runs in (the OS call that names a
file), not llmproxy: the proxy runs unmodified on top of it.
"""

from __future__ import annotations

import errno
import os
import sys
import threading
import time


def install(mode: str) -> None:
    if mode == "journal-full":
        _fill_journals()
        return
    real_link = os.link
    never = threading.Event()

    def slow_link(source, target, *args, **kwargs):  # type: ignore[no-untyped-def]
        if mode == "stuck":
            never.wait()
        else:
            time.sleep(float(mode))
        return real_link(source, target, *args, **kwargs)

    os.link = slow_link  # type: ignore[assignment]


def _fill_journals() -> None:
    """Appending to a journal fails as on a full disk (recording files still get written)."""
    real_write = os.write

    def write(fd, data):  # type: ignore[no-untyped-def]
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            path = ""
        if "/.journal-" in path:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    os.write = write  # type: ignore[assignment]


if __name__ == "__main__":
    install(sys.argv[1])
    site = os.path.join(os.path.dirname(os.path.abspath(__file__)), "slowdisk_site")
    os.environ["LLMPROXY_TEST_SLOWDISK"] = sys.argv[1]
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [site, os.environ.get("PYTHONPATH")]))
    from llmproxy.cli import main

    sys.argv = ["llmproxy", *sys.argv[2:]]
    main()
