"""A real `uswap run` with a test-only hook that holds one swap-in between
the moment its pages went LOADING and its store read, for
tests/daemon/test_swapin_present.py:

    python -m tests.swapin_hooks run ARGS...   (as `python -m uswap.cli run ARGS...`)

DaemonProc(module="tests.swapin_hooks") starts it. The production code is
not changed; the hook wraps SwapIn._submit_read before `uswap.cli.main`
runs, and only with USWAP_TEST_HOOKS=DIR and USWAP_TEST_HOLD_PAGE=P in the
environment: the first load whose pages include page P (of any region) is
held on the engine thread, its pages LOADING, before its read is handed to
an I/O pool (the C pool, or the Python pool under the fault injector):

- DIR/held.json gets {"region", "first", "n", "page", "view"}: `view` is
  the address of page P in the daemon's own mapping of the region's memfd
  (region.daddr), where a reader of the daemon's memory would plant a page;
- then the engine thread opens the FIFO DIR/release for reading, which
  blocks until the test opens it for writing and closes it: the read is
  submitted then -- no timing involved.

With USWAP_TEST_HOLD_AT=io (the Python pool only: run it under the fault
injector) the engine thread goes on instead: held.json is written as
above, the read is submitted, and the I/O thread that takes it waits on
the FIFO before its store read (readmap.read_verify_map), so the engine
serves other requests -- a fork_begin, a discard -- while the pages are
LOADING and nothing of the load has happened yet. With
USWAP_TEST_HOLD_AT=io_after the I/O thread waits after its read, verify and
map instead: the pages are in the client (a write fault's page writable)
and still LOADING, the engine not told yet.
"""
from __future__ import annotations

import json
import os
import sys

from uswap import cli
from uswap.daemon import swapin
from uswap.daemon.swapin import SwapIn

HOOK_DIR = os.environ.get("USWAP_TEST_HOOKS")
HOLD_PAGE = int(os.environ.get("USWAP_TEST_HOLD_PAGE", "-1"))
HOLD_AT = os.environ.get("USWAP_TEST_HOLD_AT", "engine")
held = []
io_hold = []  # (dst) of the load whose I/O thread waits on the FIFO (HOLD_AT=io), until it has


def _wait_release() -> None:
    with open(os.path.join(HOOK_DIR, "release"), "rb") as f:  # a FIFO: until the test closes it
        f.read()


def install() -> None:
    submit_read = SwapIn._submit_read
    read_verify_map = swapin.read_verify_map

    def _submit_read_hook(self, region, first, n, *args, **kw):
        if not held and first <= HOLD_PAGE < first + n:
            held.append(region.id)
            record = {"region": region.id, "first": first, "n": n, "page": HOLD_PAGE,
                      "view": region.daddr + HOLD_PAGE * 4096}
            tmp = os.path.join(HOOK_DIR, "held.json.tmp")
            with open(tmp, "w") as f:
                f.write(json.dumps(record) + "\n")
            if HOLD_AT in ("io", "io_after"):
                # Set before the read is submitted: its I/O thread finds it.
                io_hold.append(region.addr + first * 4096)
            os.rename(tmp, os.path.join(HOOK_DIR, "held.json"))
            if HOLD_AT == "engine":
                _wait_release()
        return submit_read(self, region, first, n, *args, **kw)

    def _read_verify_map_hook(store, buf, n, slot, uffd_fd, dst, *args, **kw):
        if not (io_hold and io_hold[0] == dst):
            return read_verify_map(store, buf, n, slot, uffd_fd, dst, *args, **kw)
        io_hold.clear()  # once: a forked child's region has the same addresses
        if HOLD_AT == "io":
            _wait_release()
        ret = read_verify_map(store, buf, n, slot, uffd_fd, dst, *args, **kw)
        if HOLD_AT == "io_after":
            _wait_release()
        return ret

    SwapIn._submit_read = _submit_read_hook
    swapin.read_verify_map = _read_verify_map_hook


if __name__ == "__main__":
    if HOOK_DIR:
        install()
    sys.exit(cli.main())
