"""Puts every Python process started under `tests.slowdisk` on the same slow disk: the file writer
process llmproxy starts imports this at start-up (tests/slowdisk.py adds this directory to
PYTHONPATH and names the mode in LLMPROXY_TEST_SLOWDISK)."""

import os

if os.environ.get("LLMPROXY_TEST_SLOWDISK"):
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    from tests.slowdisk import install

    install(os.environ["LLMPROXY_TEST_SLOWDISK"])
