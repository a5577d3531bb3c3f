"""Forgetting pages the client unmapped (munmap, mremap shrink or move of
part of a region it keeps): they become EMPTY, slots freed, resident ones
punched. Pages with I/O in flight are marked F_DISCARD and forgotten by the
stage whose completion returns (invariants 2, 3 and 7).

Thread and lock: engine thread, page lock held.
"""
from __future__ import annotations

import collections
import logging

import numpy as np

from uswap import uffd
from uswap.daemon import pagetable as pt
from uswap.daemon.cow import CopyOnWrite
from uswap.daemon.punch import Puncher
from uswap.daemon.region import Region
from uswap.daemon.regionset import SHIFT, RegionSet
from uswap.daemon.slots import SlotAllocator

log = logging.getLogger("uswap.engine")


class Forget:
    def __init__(self, regions: RegionSet, slots: SlotAllocator, cow: CopyOnWrite, puncher: Puncher) -> None:
        self.regions = regions
        self.slots = slots
        self.cow = cow  # children reading the pages get their copies first
        self.puncher = puncher  # resident pages leave memory by a punch

    def forget_range(self, region: Region, first: int, n: int, cause: str = "unmapped by the client",
                     level: int = logging.INFO) -> None:
        """The client unmapped pages first..first+n-1 of a region it keeps
        (munmap or an mremap shrink or move of part of it): the region lives
        on and only these pages are forgotten. Resident ones are punched from
        the memfd and uncharged, slots are freed, and all become EMPTY, so a
        mapping regrown in place over them (it keeps the uffd registration)
        reads zeros on first touch, as the kernel gives a fresh mapping.

        Invariants 2, 3 and 7: a page with a write, read or punch in flight
        (WRITEBACK, LOADING, PUNCHING) cannot change state now; it is marked
        F_DISCARD and forgotten by the completion (writeback's _write_done, swapin's
        _load_done and _reload_later's retry, punch's _punch_done, or the
        fast path's FP_FORGET record). discard.py forgets a range the client
        keeps mapped the same way (`cause` and `level`: its log line, debug
        there: an allocator discards often)."""
        first = max(0, first)
        n = min(n, region.npages - first)
        if n <= 0 or region.closing:
            return
        table = region.table
        seg = slice(first, first + n)
        busy = ((table.state[seg] == pt.WRITEBACK) | (table.state[seg] == pt.LOADING)
                | (table.state[seg] == pt.PUNCHING))
        # Counted once: a page forgotten again before its I/O returned (its
        # range unmapped, mapped again in place and unmapped again) carries
        # F_DISCARD already, counted here or by forget_pages (its own punch).
        newly = busy & ((table.flags[seg] & pt.F_DISCARD) == 0)
        table.flags[seg] |= np.where(busy, pt.F_DISCARD, 0).astype(np.uint8)
        self.regions.stats["forgotten_after_io"] += int(np.count_nonzero(newly))
        self.forget_pages(region, first + np.flatnonzero(~busy))
        # Faults parked for budget there can never be retried by the client
        # (unmapped), or were woken by forget_pages to fault afresh (discarded).
        self.regions.budget_waiters = collections.deque(
            w for w in self.regions.budget_waiters if not (w[0] == region.id and first <= w[1] < first + n))
        log.log(level, "region %d: pages %d..%d %s, forgotten (%d with I/O in flight)",
                region.id, first, first + n - 1, cause, int(np.count_nonzero(busy)))

    def forget_pages(self, region: Region, pages: np.ndarray) -> None:
        """Make `pages` (sorted, none with I/O in flight) EMPTY, slots freed,
        waiters woken; RESIDENT ones once their punch returns (uncharged then)."""
        if len(pages) == 0:
            return
        table = region.table
        self.cow.before_forget(region, pages)
        resident = table.state[pages] == pt.RESIDENT
        rest = pages[~resident]
        self.slots.free_many(table.slot[rest].copy())
        table.slot[rest] = pt.NO_SLOT
        table.move(rest, pt.EMPTY)
        table.flags[rest] = 0
        # Resident pages are punched as evicted ones are, off the page lock
        # (Puncher.punch's invariant); F_DISCARD makes _punch_done free their slots
        # and leave them EMPTY. They stay charged until then.
        table.flags[pages[resident]] = pt.F_DISCARD
        self.puncher.punch(region, pages[resident], evicted=False)
        self.regions.stats["forgotten_pages"] += len(pages)
        # Threads parked on these pages (for budget, or on the I/O) must not
        # sleep for ever: woken, they retry the access -- SIGSEGV on the
        # unmapped range, as the kernel gives, or a fresh fault if it was
        # mapped again in place meanwhile.
        for first, n in pt.runs(pages, 1 << 30):
            uffd.wake(region.uffd, region.addr + (first << SHIFT), n << SHIFT)
