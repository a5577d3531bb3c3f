"""A real `uswap run` with test-only hooks around `Writeback._write_done`'s
branch for pages the client unmapped or discarded while their write was in
flight (F_DISCARD), for tests/daemon/test_writeback_failed_discard.py:

    python -m tests.writeback_hooks run ARGS...   (as `python -m uswap.cli run ARGS...`)

DaemonProc(module="tests.writeback_hooks") starts it. The production code is
not changed; the hooks wrap methods of its classes before `uswap.cli.main`
runs, and only with USWAP_TEST_HOOKS=DIR in the environment:

- every store write the engine queues is recorded as a line
  {"region", "slot", "pages"} of DIR/writes.jsonl (Writeback._submit_write);
- store writes through the fault injector (InjectingStore.write, on an I/O
  thread) wait until a forget has marked a WRITEBACK page F_DISCARD
  (Forget.forget_range): a discard of part of a recorded write is then sure
  to reach the engine while that write is in flight -- no timing involved;
- USWAP_TEST_HOOK_AT_FORGET says what happens when _write_done calls
  Forget.forget_pages:
  "kill": for a failed write, DIR/killed.json gets {"slot", "n",
  "discarded"} (the run and the pages forgotten) and the daemon SIGKILLs
  itself: the moment the old code had cleared the discarded pages' slots
  and not yet quarantined the run;
  "close": the real forget, then the real RegionSet.close_region on the
  region, as anything forget_pages calls may close it (an ioctl finding the
  client gone); DIR/closed.json gets {"slot", "n", "discarded", "failed"}.

With USWAP_TEST_HOOK_HOLD_WRITE=1 instead (for
tests/daemon/test_writeback_protect_first.py), store writes are not held
for a discard: the first such store write the engine queues is done, then its
I/O thread writes DIR/held.json {"region", "slot", "pages"} and waits on
the FIFO DIR/release (until the test opens it for writing and closes it)
before the write's completion reaches the engine: its pages stay WRITEBACK,
their copy on the store already. Only a write with a page still in the
client's page tables is held ("mapped": those pages; a page the sampler
took out would fault on a write without any write-protect). Every write fault the engine takes on a
WRITEBACK page (Faults.fault_wp) is recorded as a line {"page"} of
DIR/parked.jsonl once it is parked.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading

import numpy as np

from uswap import cli
from uswap.daemon import clientmaps
from uswap.daemon import pagetable as pt
from uswap.daemon.faults import Faults
from uswap.daemon.forget import Forget
from uswap.daemon.writeback import Writeback
from uswap.store.inject import InjectingStore

HOOK_DIR = os.environ.get("USWAP_TEST_HOOKS")
AT_FORGET = os.environ.get("USWAP_TEST_HOOK_AT_FORGET", "")
HOLD_WRITE = os.environ.get("USWAP_TEST_HOOK_HOLD_WRITE") == "1"

# Set once a forget has marked a page under writeback F_DISCARD.
discarded = threading.Event()
# The runs whose _write_done is running (engine thread): (slot, n, err).
returning: list[tuple[int, int, OSError | None]] = []
# HOLD_WRITE: first slot -> (region id, pages) of each write queued; the
# first store write done (its first slot), once one is.
queued: dict[int, tuple[int, list[int]]] = {}
held_write: list[int] = []
hold_lock = threading.Lock()


def _record(name: str, obj: dict, mode: str = "w") -> None:
    with open(os.path.join(HOOK_DIR, name), mode) as f:
        f.write(json.dumps(obj) + "\n")


def install() -> None:
    submit_write, write_done = Writeback._submit_write, Writeback._write_done
    forget_range, forget_pages = Forget.forget_range, Forget.forget_pages
    store_write = InjectingStore.write

    def _submit_write_hook(self, region, pages, slot, gather_buf):
        _record("writes.jsonl", {"region": region.id, "slot": slot, "pages": pages.tolist()}, "a")
        queued[slot] = (region, pages.copy())
        return submit_write(self, region, pages, slot, gather_buf)

    def _write_done_hook(self, region, pages, slot, result, err):
        returning.append((slot, len(pages), err))
        try:
            return write_done(self, region, pages, slot, result, err)
        finally:
            returning.pop()

    def forget_range_hook(self, region, first, n, *args, **kw):
        forget_range(self, region, first, n, *args, **kw)
        table = region.table
        seg = slice(max(0, first), first + n)
        if ((table.state[seg] == pt.WRITEBACK) & ((table.flags[seg] & pt.F_DISCARD) != 0)).any():
            discarded.set()

    def forget_pages_hook(self, region, pages):
        if not returning or len(pages) == 0:
            return forget_pages(self, region, pages)
        slot, n, err = returning[-1]
        record = {"slot": slot, "n": n, "discarded": np.asarray(pages).tolist()}
        if AT_FORGET == "kill" and err is not None:
            _record("killed.json", record)
            os.kill(os.getpid(), signal.SIGKILL)
        forget_pages(self, region, pages)
        if AT_FORGET == "close" and not region.closing:
            self.regions.close_region(region, "closed by the test hook inside _write_done's forget")
            _record("closed.json", dict(record, failed=err is not None))

    def store_write_hook(self, addr, length, offset):
        discarded.wait()
        return store_write(self, addr, length, offset)

    def hold_write_hook(self, addr, length, offset):
        ret = store_write(self, addr, length, offset)
        slot = offset // 4096
        if slot not in queued:
            return ret  # not a page write (a store probe)
        region, pages = queued[slot]
        # Held: the first write with a page still in the client's page
        # tables (not sampled out: only the write-protect makes its write fault).
        mapped = pages[clientmaps.in_page_tables(region.owner.pid, region.addr, pages)]
        with hold_lock:
            first = not held_write and len(mapped)
            if first:
                held_write.append(slot)
        if first:
            _record("held.json", {"region": region.id, "slot": slot, "pages": pages.tolist(),
                                  "mapped": mapped.tolist()})
            with open(os.path.join(HOOK_DIR, "release"), "rb") as f:  # a FIFO: until the test closes it
                f.read()
        return ret

    fault_wp = Faults.fault_wp

    def fault_wp_hook(self, region, page):
        fault_wp(self, region, page)
        table = region.table
        if table.state[page] == pt.WRITEBACK and table.flags[page] & pt.F_WAITERS:
            _record("parked.jsonl", {"page": int(page)}, "a")

    if HOLD_WRITE:
        Writeback._submit_write = _submit_write_hook
        InjectingStore.write = hold_write_hook
        Faults.fault_wp = fault_wp_hook
        return
    Writeback._submit_write = _submit_write_hook
    Writeback._write_done = _write_done_hook
    Forget.forget_range = forget_range_hook
    Forget.forget_pages = forget_pages_hook
    InjectingStore.write = store_write_hook


if __name__ == "__main__":
    if HOOK_DIR:
        install()
    sys.exit(cli.main())
