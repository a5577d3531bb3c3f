"""The page-checking stream client of the read-ahead tests
(tests/daemon/test_readahead.py, test_readahead_scattered.py,
test_review_vectored_loads.py), both its halves:

- `OPENING`, the start of the client script (argv: SOCKET NPAGES): one
  region (client_program.REGION) whose pages `fill()` names in word 0
  (MAGIC ^ page), and `commands()`, the test's command lines until "exit";
  each test's script adds its own checks and commands;
- the test's side: `running` (the client on a daemon, for a `with` block),
  `cmd` (one command and its report), `fill_swapped` (the client's fill,
  until so many pages are on the store), `settled` (the daemon's status
  once no store I/O is in flight) and `assert_daemon_sound` (the end of a
  test).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

from tests.client_program import REGION
from tests.harness import Workload, assert_audit, assert_no_io_overlap, finishing, status, wait_for

OPENING = REGION + """import os
from tests.client_program import finish

MAGIC = 0x5EED_A11E_0000_0000


def fill():
    a[:, 0] = np.arange(npages, dtype=np.uint64) ^ np.uint64(MAGIC)


def commands():
    \"\"\"The region's id reported, then each command line of the test, split, until "exit".\"\"\"
    out(region=r.id)
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "exit":
            return
        yield cmd
"""


@contextlib.contextmanager
def running(d, script: str, npages: int) -> Iterator[Workload]:
    """`script` (OPENING and its own part) on daemon `d` over NPAGES pages,
    its region reported; at the end of the block it is told to exit and
    must finish done (exit 0). Killed whatever happens."""
    with finishing(d, script, npages) as c:
        c.next(30)
        yield c
        c.send("exit\n")


def cmd(c: Workload, text: str, key: str, timeout: float = 60) -> dict:
    """Send one command; its report line (the one holding `key`), which
    must not say that the client read a wrong value."""
    c.send(text + "\n")
    line = c.wait_line(lambda x: key in x or "wrong" in x, timeout)
    assert "wrong" not in line, f"client read a wrong value: {line}"
    return line


def settled(d, timeout: float = 60) -> dict:
    """The daemon's status once no store read or write is in flight."""
    def quiet() -> dict | None:
        st = status(d)
        return st if st["reads_inflight"] == 0 and st["writeback_inflight"] == 0 else None
    return wait_for("no I/O in flight", quiet, timeout=timeout)


def fill_swapped(d, c: Workload, pages: int, timeout: float = 60) -> dict:
    """The client's `fill`, then the daemon's status once at least `pages`
    pages of it are on the store and no write is in flight."""
    cmd(c, "fill", "filled")

    def out() -> dict | None:
        st = status(d)
        return st if st["writeback_inflight"] == 0 and st["swapped_bytes"] >= pages * 4096 else None
    return wait_for(f"{pages} pages swapped out", out, timeout=timeout)


def assert_daemon_sound(d, io_overlap: bool = False) -> None:
    """The daemon at the end of a test, its clients gone: with `io_overlap`
    (the fault injector's store) no read of a slot with a write in flight;
    its audit exact; no traceback in its log."""
    if io_overlap:
        assert_no_io_overlap(status(d))
    assert_audit(status(d))
    assert "Traceback" not in d.log_text()
