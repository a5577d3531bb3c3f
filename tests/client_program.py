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


# The opening of a client script over one region (argv: SOCKET NPAGES,
# then the script's own): connect, alloc NPAGES pages; `sock`, `npages`,
# `c`, `r` and `a` (one row of 512 words per page) are left for the rest of
# the script, and `sys`, `np`, `uswap` and `out` imported.
REGION = """
import sys
import numpy as np
import uswap
from tests.client_program import out

sock, npages = sys.argv[1], int(sys.argv[2])
c = uswap.connect(sock)
r = c.alloc(npages * 4096)
a = np.frombuffer(r.buf, dtype=np.uint64).reshape(-1, 512)
"""

# The opening of the client scripts that fill a region: REGION, then each
# page's first word written as its index + 1, and {"filled": NPAGES}
# reported.
FILLED_REGION = REGION + """a[:, 0] = np.arange(npages, dtype=np.uint64) + 1
out(filled=npages)
"""


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
