"""Helpers for the small client programs that tests run as `python -c CODE`
(harness.Workload.script; the program runs from the repository root, so it
imports this module as tests.client_program).

A program reports on stdout, one JSON object a line, which the test reads
with deadlines; it ends with {"done": True} and exits 0, or 3 if it found a
page holding what it did not write."""
from __future__ import annotations

import json
import sys
import threading
from typing import NoReturn

import uswap


def out(**fields) -> None:
    """One report line, flushed at once: the test waits for it."""
    print(json.dumps(fields), flush=True)


def run_threads(threads: list[threading.Thread]) -> None:
    """Start every thread, then wait for all of them."""
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def finish(c: uswap.Client, r: uswap.Region, bad: int) -> NoReturn:
    """Free region `r` and close `c` (the caller has dropped its numpy views
    of r.buf: a region cannot be unmapped under them), report done, exit 3 if
    any page was bad, else 0."""
    r.close()
    c.close()
    out(done=True)
    sys.exit(3 if bad else 0)
