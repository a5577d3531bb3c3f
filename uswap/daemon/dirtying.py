"""Letting writes through: a clean page's first write (its slot copy goes
stale and is freed), and un-protecting runs whose writers are parked.
Every stage that finds a write parked on a page comes here: faults.py (a
write-protect fault), swapin.py (a write parked while the page loaded),
writeback.py (a write parked during writeback, or a failed write), and the
fast path's records (engine.py).

Invariant 4 (the write is never lost): a run whose un-protect gets AGAIN is
retried on a timer until it goes through or the page leaves RESIDENT.

Thread and lock: engine thread, page lock held.
"""
from __future__ import annotations

import numpy as np

from uswap import uffd
from uswap.daemon import pagetable as pt
from uswap.daemon.budget import Budget
from uswap.daemon.cow import CopyOnWrite
from uswap.daemon.region import Region
from uswap.daemon.regionset import AGAIN, GONE_, PAGE, SHIFT, RegionSet
from uswap.daemon.slots import SlotAllocator


class Dirtying:
    def __init__(self, regions: RegionSet, slots: SlotAllocator, budget: Budget, cow: CopyOnWrite) -> None:
        self.regions = regions
        self.slots = slots
        self.budget = budget  # the clock: a dirtied page is stamped
        self.cow = cow  # children reading a page get their copy before it is written

    def make_dirty(self, region: Region, page: int) -> None:
        """First write to a clean page: its slot copy goes stale. (Or a write
        to a dirty page write-protected at a fork: children reading it from
        here get their copy first.)"""
        self.cow.before_write_page(region, page)
        table = region.table
        slot = int(table.slot[page])
        if slot >= 0:
            # No write to this slot is in flight: the page is RESIDENT, not WRITEBACK.
            self.slots.free(slot)
            table.slot[page] = pt.NO_SLOT
        table.flags[page] = (table.flags[page] & pt.F_ACTIVE) | pt.F_DIRTY
        table.stamp[page] = self.budget.advance_clock()
        ret = uffd.writeprotect(region.uffd, region.addr + (page << SHIFT), PAGE, protect=False)
        if self.regions.ioctl_result(region, ret, "UFFDIO_WRITEPROTECT") == AGAIN:
            self._unprotect_later(region, page, 1)

    def unprotect_runs(self, region: Region, pages: np.ndarray) -> None:
        """Let writes through on `pages` (sorted, RESIDENT, parked writers
        woken): children of a fork still reading them from here get their
        copies first (cow.py); a run whose un-protect gets AGAIN is retried
        later (invariant 4: the write is never lost)."""
        self.cow.before_write(region, pages)
        for first, k in pt.runs(pages, max(1, len(pages))):
            ret = uffd.writeprotect(region.uffd, region.addr + (first << SHIFT), k << SHIFT,
                                    protect=False, wake=True)
            outcome = self.regions.ioctl_result(region, ret, "UFFDIO_WRITEPROTECT")
            if outcome == AGAIN:
                self._unprotect_later(region, first, k)
            elif outcome == GONE_:
                return

    def _unprotect_later(self, region: Region, first: int, n: int) -> None:
        """Un-protect a run whose un-protect got AGAIN: writers are parked on
        it and must be let through (invariant 4: the write is never lost)."""
        def retry() -> None:
            if region.closing:
                return
            # Only pages still RESIDENT: an unmapped (forgotten) page is EMPTY,
            # and an ioctl on it would fail for ever.
            still = first + np.flatnonzero(region.table.state[first:first + n] == pt.RESIDENT)
            # (A fork may have come between: unprotect_runs copies first.)
            self.unprotect_runs(region, still)
        self.regions.after(0.001, retry)
