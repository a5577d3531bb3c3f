"""The I/O thread's half of a swap-in on the Python pool: read a run of
slots with the store's own read, then verify and map it with the routine
every swap-in path shares (native/readmap.h us_verify_map, through the uffd
cffi module): only the pages whose checksum matches are mapped (invariant
6, page by page). The C I/O pool's READ_COPY jobs (native/iopool.c) and the
fast path's one-page loads (native/fastpath.c) call the same routine after
their store reads.

Thread: an I/O thread, no lock: it changes no page state. The pages stay
LOADING until swapin.py applies the result on the engine thread.
"""
from __future__ import annotations

import logging
import threading

import numpy as np

from uswap import uffd
from uswap.store.base import Store

log = logging.getLogger("uswap.engine")
PAGE = 4096
# Pages found present and replaced by their store copies on both I/O pools
# (log_present), for status's present_replaced_total: added by the Python
# pool's threads and the engine thread (the C pool's completions), so under
# a lock. One daemon a process.
_replaced_lock = threading.Lock()
_replaced = 0


def read_verify_map(store: Store, buf: int, n: int, slot: int, uffd_fd: int, dst: int, view: int, mode: int,
                    write_page: int, expected: np.ndarray, sums: np.ndarray, skip: np.ndarray | None,
                    mapped: np.ndarray, runs: np.ndarray | None = None) -> int:
    """Swap-in on an I/O thread: read n pages from `slot` on into `buf`
    (one store read; with `runs`, rows (page index, slot, pages) of a
    stream's window over scattered slots: one read per run of adjacent
    slots into its place in `buf`, as the C pool's job does), checksum each
    into `sums`, and map into the client
    at `dst` only the pages whose checksum matches `expected`: with `mode`,
    the page at index `write_page` (a write fault's; uffd.NO_WRITE_PAGE for
    none) writable, and never a page marked in `skip` (not the load's: read
    through, or between runs and not read; None: none). A page found
    present in the memfd gets its verified copy written over it through
    `view` (the daemon's mapping of the pages at dst) and is mapped: the
    store copy wins. `mapped` (uint8, n) is set to which pages were mapped.
    Bytes mapped, or -errno of a COPY; a failed read raises, and nothing is
    mapped."""
    if runs is None:
        store.read(buf, n * PAGE, slot * PAGE)
    else:
        for index, run_slot, k in runs.tolist():
            store.read(buf + index * PAGE, k * PAGE, run_slot * PAGE)
    present = np.zeros(1, np.int32)
    ret = uffd.verify_map(uffd_fd, dst, view, buf, n, mode, write_page, expected, sums, skip, mapped, present)
    log_present(int(present[0]), dst)
    return ret


def log_present(present: int, dst: int) -> None:
    """Log the pages of a swap-in at dst that us_verify_map found present
    in the memfd (written, or read through the daemon's own mapping, while
    they loaded: never by the client's mapping) and replaced by their
    verified store copies; on either pool. Counted (replaced_total)."""
    global _replaced
    if present:
        with _replaced_lock:
            _replaced += present
        log.warning("%d page(s) of the run at %#x were present in the memfd during swap-in (not written by"
                    " the client's mapping); the store copy wins: replaced by the verified copy", present, dst)


def replaced_total() -> int:
    """Pages the two I/O pools found present and replaced (log_present)."""
    with _replaced_lock:
        return _replaced
