"""Letting writes through: a clean page's first write (its slot copy goes
stale and is freed), and un-protecting runs whose writers are parked.
Every stage that finds a write parked on a page comes here: faults.py (a
write-protect fault), swapin.py (a write parked while the page loaded),
writeback.py (a write parked during writeback, or a failed write), and the
fast path's records (engine.py).

Invariant 4 (the write is never lost): a run whose un-protect gets AGAIN is
retried on a timer until it goes through or the page leaves RESIDENT; the
retry takes each page as it is then (written back meanwhile: dirtied again
before its write is let through; under writeback: parked until it returns;
evicted or forgotten: its write woken to fault again).

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
        start = 0
        while start < len(pages):
            # One C call un-protects every run up to the first page that fails.
            done, ret = uffd.writeprotect_pages(region.uffd, region.addr, pages[start:], protect=False, wake=True)
            if ret == 0:
                return
            at = start + done
            end = pt.run_end(pages, at)  # the rest of the failing page's run
            outcome = self.regions.ioctl_result(region, ret, "UFFDIO_WRITEPROTECT")
            if outcome == AGAIN:
                self._unprotect_later(region, int(pages[at]), end - at)
            elif outcome == GONE_:
                return
            start = end

    def _unprotect_later(self, region: Region, first: int, n: int) -> None:
        """Un-protect a run whose un-protect got AGAIN: writers are parked on
        it and must be let through (invariant 4: the write is never lost).
        The retry takes each page as its parked write would find it now
        (faults.py fault_wp's rule), not as it was: the run may have been
        written back, or be under writeback, meanwhile."""
        def retry() -> None:
            if region.closing:
                return
            table = region.table
            pages = np.arange(first, first + n)
            st = table.state[pages]
            resident = pages[st == pt.RESIDENT]
            dirty = (table.flags[resident] & pt.F_DIRTY) != 0
            # Under writeback, loading or being punched: parked until that
            # ends, which lets the write through (or refaults it).
            busy = pages[(st == pt.WRITEBACK) | (st == pt.LOADING) | (st == pt.PUNCHING)]
            table.flags[busy] |= pt.F_WAITERS
            # Written back meanwhile and kept, clean, its slot the copy (the
            # background writeback): the parked write dirties it again, as
            # any first write to a clean page. Un-protected as it is, the
            # write would reach the memfd unseen and be lost when the clean
            # page is dropped.
            for page in resident[~dirty].tolist():
                self.make_dirty(region, page)
                if region.closing:
                    return
            # Evicted meanwhile (SWAPPED) or forgotten (EMPTY): nothing to
            # un-protect (a write-protect ioctl on an unmapped page would
            # fail for ever), but the parked write is woken to fault again (a
            # MISSING fault, served from the slot): the punch woke only the
            # faults it knew of (F_WAITERS), and this one would wait for ever.
            for i, k in pt.runs(pages[(st == pt.SWAPPED) | (st == pt.EMPTY)], n):
                uffd.wake(region.uffd, region.addr + (i << SHIFT), k << SHIFT)
            # (A fork may have come between: unprotect_runs copies first.)
            self.unprotect_runs(region, resident[dirty])
        self.regions.after(0.001, retry)
