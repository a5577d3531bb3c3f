"""Compact per-page state: five numpy arrays, 14 bytes per managed page.

No Python object exists per page (docs/design.md §4). The kernel keeps one byte per
swap slot; we keep state, flags, slot number, a use stamp for victim choice
and the checksum of the slot copy (CRC32C, native/pagesum.h: 4 bytes, every
value valid; only pages with a slot are ever checked). The stamp is the tick of the page's last
fault while it is in memory, and of its eviction once it is out.
"""
from __future__ import annotations

import numpy as np

# States (docs/design.md §4).
EMPTY = 0      # never populated (or dropped while a clean zero page): reads as zeros
RESIDENT = 1   # in memory; clean (write-protected, slot copy current) or dirty
WRITEBACK = 2  # resident, write-protected, a store write of it in flight
SWAPPED = 3    # only on the store, in `slot`
LOADING = 4    # a swap-in read in flight
POISONED = 5   # swap-in gave up (read_failure: sigbus); the client gets SIGBUS
AT_PARENT = 6  # a forked child's page whose contents are the same page of the region it
               # was forked from, still resident there and unchanged since the fork
               # (daemon/fork.py); never charged, no slot
PUNCHING = 7   # clean, being punched out of the memfd by an I/O thread (Engine._punch):
               # still charged, slot (if any) current; faults park until the punch returns

STATE_NAMES = ["EMPTY", "RESIDENT", "WRITEBACK", "SWAPPED", "LOADING", "POISONED", "AT_PARENT", "PUNCHING"]


# Flags.
F_DIRTY = 1    # resident and writable: the slot copy, if any, is stale
F_WAITERS = 2  # a write fault is parked on this page until its writeback ends (PUNCHING: any
               # fault parked until the punch returns)
F_EVICT = 4    # drop the page once its writeback succeeds
F_ACTIVE = 8   # refaulted soon after eviction: working set, evicted after inactive pages
F_DISCARD = 16 # the client unmapped the page while its I/O was in flight: forget it when the I/O ends

NO_SLOT = -1


class PageTable:
    """State of every page of one region."""

    def __init__(self, npages: int) -> None:
        self.npages = npages
        self.state = np.zeros(npages, np.uint8)
        self.flags = np.zeros(npages, np.uint8)
        self.slot = np.full(npages, NO_SLOT, np.int32)
        self.stamp = np.zeros(npages, np.uint32)
        self.sum = np.zeros(npages, np.uint32)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.state, self.flags, self.slot, self.stamp, self.sum))

    def count(self, state: int) -> int:
        return int(np.count_nonzero(self.state == state))


def runs(pages: np.ndarray, max_len: int) -> list[tuple[int, int]]:
    """Split sorted page numbers into (first, count) runs of consecutive pages,
    each at most max_len long."""
    if len(pages) == 0:
        return []
    breaks = np.flatnonzero(np.diff(pages) != 1) + 1
    out = []
    for chunk in np.split(pages, breaks):
        first = int(chunk[0])
        n = len(chunk)
        while n > 0:
            k = min(n, max_len)
            out.append((first, k))
            first += k
            n -= k
    return out
