"""A swap-in whose page is found present in the memfd (the COPY's EEXIST):
the store copy wins (native/readmap.h us_verify_map; README "Known
limits"). Something that reads the daemon's own mapping of a region's
memfd at a swapped page -- /proc/PID/mem, a debugger, a sampling profiler
following stale pointers -- plants a page of zeros in the memfd. Before,
a swap-in in flight then kept that page "as newer" and the client read
zeros: lost data (seen once in 12 `py-spy --nonblocking` runs).

Here the planting is made during the swap-in by construction: the daemon
runs through tests/swapin_hooks.py, which holds the load of one page on
the engine thread once its pages are LOADING and before its store read is
submitted; the test reads that page through /proc/DAEMON/mem at the
daemon's mapping (found in /proc/DAEMON/maps as the region's memfd), which
puts a zero page in the memfd, then lets the read go. The client, which
faulted on the page, must read its data. Engine loads (fault_threads 0),
on the C I/O pool (the file store) and on the Python pool (the fault
injector); the fault threads' one-page loads call the same routine
(tests/daemon/test_readmap.py tests it in process)."""
from __future__ import annotations

import errno
import json
import os

import pytest

from tests.daemon.test_swapin_write_fault import _filled
from tests.harness import wait_for

PAGE = 4096
HOLD = 400  # swapped out: the oldest pages of a 6 MiB client under a 2 MiB budget


def _held(hooks: str) -> dict | None:
    try:
        with open(os.path.join(hooks, "held.json")) as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None


def _memfd_mapping(pid: int, addr: int) -> str | None:
    """The line of /proc/PID/maps whose range holds addr."""
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= addr < hi:
                return line.strip()
    return None


def _release(hooks: str) -> None:
    """Open the hook's FIFO for writing and close it: the held read goes."""
    path = os.path.join(hooks, "release")

    def opened():
        try:
            return os.open(path, os.O_WRONLY | os.O_NONBLOCK) + 1  # ENXIO until the hook reads it
        except OSError as e:
            if e.errno != errno.ENXIO:
                raise
            return None
    os.close(wait_for("the hook waiting on its FIFO", opened, 30) - 1)


@pytest.mark.parametrize("pool", ["c", "python"])
def test_page_planted_during_swapin_is_replaced_by_the_store_copy(file_backing, start_daemon, tmp_path, pool):
    hooks = str(tmp_path / "hooks")
    os.makedirs(hooks)
    os.mkfifo(os.path.join(hooks, "release"))
    d = start_daemon(file_backing, store_size="64M", max_resident="2M", config={"fault_threads": 0},
                     inject={} if pool == "python" else None, module="tests.swapin_hooks",
                     extra_env={"USWAP_TEST_HOOKS": hooks, "USWAP_TEST_HOLD_PAGE": str(HOLD)})
    a = _filled(d)
    try:
        a.send(f"touch {HOLD}\n")  # faults; the load of page HOLD is held, LOADING
        held = wait_for("the swap-in held by the hook", lambda: _held(hooks), 30)
        mapping = _memfd_mapping(d.pid, held["view"])
        assert mapping is not None and "/memfd:" in mapping, mapping  # the daemon's mapping of the memfd
        # A reader of the daemon's memory at the swapped page: a hole, so it
        # reads zeros -- and leaves a zero page in the memfd.
        with open(f"/proc/{d.pid}/mem", "rb", buffering=0) as mem:
            mem.seek(held["view"])
            assert mem.read(PAGE) == bytes(PAGE)
        _release(hooks)
        line = a.wait_line(lambda x: "touched" in x or "wrong" in x, 60)
        assert "wrong" not in line, line  # before: the client read the zeros ("got": 0) and exited

        # Its neighbours and the page again, through the client's mapping.
        a.cmd(f"touch {HOLD - 1} {HOLD} {HOLD + 1}", "touched")
        log = d.log_text()
        assert "the store copy wins" in log, log[-3000:]
        a.exit_ok()
    finally:
        a.kill()
