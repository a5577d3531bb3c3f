"""Resolving a dead daemon's transient states (docs/design.md section 9):
when an orphan is reclaimed (adoption.py), every page the dead daemon left
between two states is settled from what the memfd really holds, and the
slots its writes in flight may still be reached by are quarantined.

Thread and lock: engine thread, page lock held.
"""
from __future__ import annotations

import errno
import logging
import os
import time

import numpy as np

from uswap import native, uffd
from uswap.daemon import clientmaps
from uswap.daemon import pagetable as pt
from uswap.daemon.region import Region
from uswap.daemon.regionset import PAGE, SHIFT, RegionSet
from uswap.daemon.slots import SlotAllocator
from uswap.daemon.writeback import Writeback

log = logging.getLogger("uswap.engine")

# Flags of the dead daemon's life that mean nothing to its successor: no
# write of it is parked here (the threads are woken, they fault again), no
# eviction of it is pending, no I/O of it will return. (F_DISCARD is cleared
# too, but its pages are returned by resolve: the discard it stood for is
# finished once the region is live, Adoption.after_live.)
STALE_FLAGS = pt.F_WAITERS | pt.F_EVICT | pt.F_DISCARD

def memfd_pages(fd: int, npages: int) -> np.ndarray:
    """Which pages of the memfd hold data (are in its page cache, or in the
    kernel's swap): SEEK_DATA/SEEK_HOLE, one pair of calls per extent. The
    daemon's own mapping is never touched for this (invariant 8)."""
    present = np.zeros(npages, bool)
    pos, end = 0, npages * PAGE
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                break
            raise
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        present[data // PAGE:(hole + PAGE - 1) // PAGE] = True
        pos = hole
    return present


class Resolver:
    def __init__(self, regions: RegionSet, slots: SlotAllocator, writeback: Writeback) -> None:
        self.regions = regions
        self.slots = slots
        self.writeback = writeback  # quarantine of slots a dead write may still reach

    def quarantine_writes(self, table: pt.PageTable) -> None:
        """Each slot of a WRITEBACK page of `table` (a write of the dead
        daemon may still land in it: nfs://) is held from new data by the
        quarantine: the table's reference (claimed) goes to it, and the
        table names the slot no more."""
        wb = np.flatnonzero((table.state == pt.WRITEBACK) & (table.slot >= 0))
        self.writeback.quarantine_runs([(s, 1) for s in table.slot[wb].tolist()])
        table.slot[wb] = pt.NO_SLOT

    def resolve(self, region: Region) -> tuple[np.ndarray, np.ndarray]:
        """Every page the dead daemon left between two states is settled from
        what the memfd holds (docs/design.md section 9 has the table):

        - WRITEBACK: its write may be torn: RESIDENT dirty, the slot
          quarantined (a write to it may still land) then freed;
        - LOADING, PUNCHING: the read or punch may or may not have happened:
          not in the memfd -> SWAPPED on its slot (the read is redone at the
          next fault), EMPTY without one; in the memfd: a read -> RESIDENT
          (verified below) -- unless its bytes are not the slot copy's and
          the client's page tables do not hold it (_not_loaded: no load
          mapped it; planted): SWAPPED, the store copy wins -- a punch ->
          made again (SWAPPED, then PUNCHING once live; a zero page stays
          RESIDENT dirty);
        - RESIDENT gone from the memfd (the client punched it): clean with a
          slot -> SWAPPED, else EMPTY, as Faults._vanished does;
        - RESIDENT with a slot and not dirty (also from the two above): it is
          write-protected, then its checksum compared with the slot copy's:
          equal -> clean; different (a write got through before the dead
          daemon recorded it) -> dirty, slot freed;
        - AT_PARENT: the dead daemon's link to the parent page is not kept:
          POISONED (the client gets SIGBUS there, never stale data);
        - flags of pages parked or evicting in the dead daemon are cleared;
          F_DISCARD too, but a page carrying it (the client discarded or
          unmapped it while the dead daemon's read, write or punch was in
          flight, and that completion would have forgotten it) is resolved
          as above and returned, to be forgotten by this daemon's forget
          (forget.py) once the region is live: EMPTY, its slot freed, its
          memfd range punched. Cleared and kept, the successor served the
          page's old data where the client had discarded it.
        Charged: every RESIDENT page, and the pages whose punch is made again.
        Returns (the pages whose punch is made again, the discarded pages),
        both for Adoption.after_live once the region is live; the counts by
        case are logged."""
        started = time.monotonic()
        t = region.table
        st, fl, slot = t.state, t.flags, t.slot
        present = memfd_pages(region.memfd, region.npages)
        counts = {}

        def count(name: str, pages: np.ndarray) -> np.ndarray:
            if len(pages):
                counts[name] = counts.get(name, 0) + len(pages)
            return pages

        discarded = count("discarded", np.flatnonzero(fl & pt.F_DISCARD))
        fl &= ~np.uint8(STALE_FLAGS)

        writeback = count("torn_writes", np.flatnonzero(st == pt.WRITEBACK))
        # (A WRITEBACK page with no slot: the daemon died between the two
        # stores of start_writeback, state then slot; no write was queued.)
        self.quarantine_writes(t)
        t.move(writeback, pt.RESIDENT)
        fl[writeback] |= pt.F_DIRTY

        repunch = np.zeros(0, np.int64)
        for state, name in ((pt.LOADING, "reads"), (pt.PUNCHING, "punches")):
            pages = np.flatnonzero(st == state)
            undone = count(f"{name}_undone", pages[~present[pages]])
            t.move(undone[slot[undone] >= 0], pt.SWAPPED)
            t.move(undone[slot[undone] < 0], pt.EMPTY)
            done = count(f"{name}_done", pages[present[pages]])
            if state == pt.LOADING:
                planted = count("reads_planted", self._not_loaded(region, done[slot[done] >= 0]))
                t.move(planted, pt.SWAPPED)
                done = np.setdiff1d(done, planted)
                t.move(done, pt.RESIDENT)  # verified as clean below when it has a slot
                fl[done[slot[done] < 0]] |= pt.F_DIRTY  # a zero fill: no copy anywhere
                continue
            # A punch not made yet: the page is clean (write-protected since
            # its copy was taken: invariant 1), so it is made again, after
            # the region is live (Adoption.after_live), from SWAPPED as for a stray
            # page; it is charged until that punch returns. A zero page
            # (no slot) whose drop did not happen stays: RESIDENT dirty.
            again = done[slot[done] >= 0]
            t.move(again, pt.SWAPPED)
            repunch = again
            self.regions.charged += len(again)
            zero = done[slot[done] < 0]
            t.move(zero, pt.EMPTY)
            t.move(zero, pt.RESIDENT)
            fl[zero] |= pt.F_DIRTY

        resident = np.flatnonzero(st == pt.RESIDENT)
        gone = count("vanished", resident[~present[resident]])
        clean_gone = gone[(slot[gone] >= 0) & ((fl[gone] & pt.F_DIRTY) == 0)]
        t.move(clean_gone, pt.SWAPPED)
        lost = gone[(slot[gone] < 0) | ((fl[gone] & pt.F_DIRTY) != 0)]
        self.slots.free_many(slot[lost])
        slot[lost] = pt.NO_SLOT
        t.move(lost, pt.EMPTY)

        self._verify_clean(region, counts)
        # A dirty page's slot copy is stale (section 4): any slot still named
        # by one (a load mapped writable for a write, not yet recorded) is freed.
        stale = np.flatnonzero((st == pt.RESIDENT) & ((fl & pt.F_DIRTY) != 0) & (slot >= 0))
        self.slots.free_many(slot[stale])
        slot[stale] = pt.NO_SLOT

        at_parent = count("at_parent_poisoned", np.flatnonzero(st == pt.AT_PARENT))
        if len(at_parent):
            t.move(at_parent, pt.POISONED)
            for first, n in pt.runs(at_parent, 1 << 30):
                uffd.poison(region.uffd, region.addr + (first << SHIFT), n << SHIFT)
        self.regions.charged += t.count(pt.RESIDENT)
        log.info("adoption: region %d reclaimed (%d pages: %d resident, %d swapped; resolved in %.1f ms)%s",
                 region.id, region.npages, t.count(pt.RESIDENT), t.count(pt.SWAPPED),
                 (time.monotonic() - started) * 1000,
                 "; resolved " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) if counts else "")
        return repunch, discarded

    @staticmethod
    def _not_loaded(region: Region, pages: np.ndarray) -> np.ndarray:
        """Of `pages` (LOADING, in the memfd, with a slot), those that are
        not their load's doing: they are all zeros, which the slot copy is
        not, and the client's page tables do not hold them.

        Invariant (the store copy wins, native/readmap.h): a LOADING page
        in the memfd is data only if the dead daemon's load mapped it into
        the client -- then a write of the client may have got through (a
        write fault's page is mapped writable) and _verify_clean keeps it
        dirty. A page in the memfd that no load mapped is a zero page
        planted by a read of the dead daemon's mapping of the hole (a
        debugger, /proc/PID/mem), never data. Not caught: a store copy the
        dead daemon died writing over a planted page (torn: not zeros), kept
        as data -- telling it from a client's write that left the page tables
        (see the loop) is not possible here, and losing that write is worse;
        a client that wrote zeros over the whole page and then unmapped it
        gets the slot copy. Such a page becomes SWAPPED on
        its slot and stays in the memfd as a stray page, which the client's
        next touch punches before it reads the slot (faults.py
        _stray_page). Stable as read here: the dead daemon's threads are
        gone, and only a COPY or CONTINUE of this daemon puts the page in
        the client's page tables. The client's pagemap unreadable (see
        clientmaps.in_page_tables): every such page is kept as data, dirty,
        as before pagemap was read."""
        if not len(pages):
            return pages
        t = region.table
        differ = []
        for first, n in pt.runs(pages, 1 << 16):
            # Invariant 8: in the memfd (resolve checked): nothing is allocated.
            sums, zero = native.page_sums(region.daddr + (first << SHIFT), n)
            # Only a page of zeros: a page the load mapped and the client
            # wrote can have left the client's page tables since (its own
            # madvise(MADV_DONTNEED or MADV_PAGEOUT) of its MAP_SHARED
            # mapping, kernel swap), its data still in the memfd: absent from
            # pagemap, it is still the client's write and must be kept
            # (tests/daemon/test_resolve_present.py ..._unmapped_by_the_client).
            # A planted page the dead daemon did not write over is zeros.
            odd = (np.array(sums, np.uint32) != t.sum[first:first + n]) & np.array(zero, bool)
            differ.extend((first + np.flatnonzero(odd)).tolist())
        differ = np.array(differ, np.int64)
        mapped = clientmaps.in_page_tables(getattr(region.owner, "pid", 0), region.addr, differ)
        return differ[:0] if mapped is None else differ[~mapped]

    def _verify_clean(self, region: Region, counts: dict) -> None:
        """Clean RESIDENT pages: write-protect them (so nothing changes them
        from here), then check them against what clean claims -- a page
        with a slot against its copy's checksum, a zero page (no slot) for
        zeros. A page the kernel will not protect is taken as dirty too
        (safe: it is written back again; counted apart, as not_protected).

        A run that fails ENOENT is protected again page by page: it reaches
        into a part the client unmapped whose UNMAP event the dead daemon
        read but did not apply (forgotten once the region is live,
        Adoption.after_live), and the run's mapped pages are checked as any
        other (taken as dirty with it, each was written to the store again).
        Any other failure (EAGAIN: an UNMAP event still unread, which fails
        every protect of the uffd) takes the whole run as dirty."""
        t = region.table
        clean = np.flatnonzero((t.state == pt.RESIDENT) & ((t.flags & pt.F_DIRTY) == 0))
        dirty, unprotected = [], []
        for first, n in pt.runs(clean, 1 << 16):
            protected = [(first, n)]
            ret = uffd.writeprotect(region.uffd, region.addr + (first << SHIFT), n << SHIFT, protect=True)
            if ret == -errno.ENOENT:
                pages = np.arange(first, first + n)
                ok = np.array([uffd.writeprotect(region.uffd, region.addr + (p << SHIFT), PAGE, protect=True) == 0
                               for p in pages.tolist()], bool)
                unprotected.extend(pages[~ok].tolist())
                protected = pt.runs(pages[ok], 1 << 16)
            elif ret < 0:
                unprotected.extend(range(first, first + n))
                continue
            for first, n in protected:
                # Invariant 8: these pages are in the memfd (resolve checked), so
                # reading them through the daemon's mapping allocates nothing.
                sums, zero = native.page_sums(region.daddr + (first << SHIFT), n)
                has_slot = t.slot[first:first + n] >= 0
                changed = np.where(has_slot, np.array(sums, np.uint32) != t.sum[first:first + n],
                                   ~np.array(zero, bool))
                dirty.extend((first + np.flatnonzero(changed)).tolist())
        for name, pages in (("written_unrecorded", dirty), ("not_protected", unprotected)):
            if pages:
                pages = np.array(pages, np.int64)
                counts[name] = len(pages)
                self.slots.free_many(t.slot[pages])
                t.slot[pages] = pt.NO_SLOT
                t.flags[pages] |= pt.F_DIRTY

