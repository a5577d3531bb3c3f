"""Faults: what each userfaultfd event of a region the engine reads means
for its pages. A MISSING fault fills zeros, starts a swap-in (readahead.py),
copies a forked child's page from its parent (cow.py) or parks (for budget,
or on a page being punched); a write-protect fault lets the write through
(dirtying.py) or parks it on a page with I/O in flight (invariant 4); a
MINOR fault maps again a page that is in the memfd; an UNMAP event forgets
pages (forget.py) or closes the region.

The fast path's C threads serve most faults themselves (native/fastpath.c)
and pass the rest on as records (engine.py); the server reads the uffds of
regions they do not watch. Either way the events are handled here.

Thread and lock: engine thread, page lock held; never waits on I/O.
"""
from __future__ import annotations

import errno
import time

import numpy as np

from uswap import native, uffd
from uswap.daemon import pagetable as pt
from uswap.daemon import policy
from uswap.daemon.budget import Budget
from uswap.daemon.cow import CopyOnWrite
from uswap.daemon.dirtying import Dirtying
from uswap.daemon.forget import Forget
from uswap.daemon.punch import Puncher
from uswap.daemon.readahead import ReadAhead
from uswap.daemon.region import Region
from uswap.daemon.regionset import AGAIN, GONE_, PAGE, SHIFT, RegionSet
from uswap.daemon.slots import SlotAllocator


class Faults:
    def __init__(self, regions: RegionSet, slots: SlotAllocator, budget: Budget, cow: CopyOnWrite,
                 puncher: Puncher, forget: Forget, dirtying: Dirtying, readahead: ReadAhead) -> None:
        self.regions = regions
        self.slots = slots
        self.budget = budget
        self.cow = cow
        self.puncher = puncher  # a page that appeared while swapped is punched
        self.forget = forget
        self.dirtying = dirtying
        self.readahead = readahead  # starts swap-ins
        # The zeros a fill copies from: one read-ahead window's worth.
        self.zero_fill = native.AlignedBuffer(readahead.ra_max_pages * PAGE)

    def on_events(self, region: Region, events: list) -> None:
        for kind, flags, addr, end in events:
            if region.closing:
                return
            if kind == uffd.EVENT_PAGEFAULT:
                page = (addr - region.addr) >> SHIFT
                if not 0 <= page < region.npages:
                    uffd.wake(region.uffd, addr & ~(PAGE - 1), PAGE)
                    continue
                self.regions.stats["faults"] += 1
                region.faults += 1
                taken = time.monotonic()
                before = region.table.state[page]
                if flags & uffd.PF_WP:
                    self.fault_wp(region, page)
                elif flags & uffd.PF_MINOR:
                    self.fault_minor(region, page)
                else:
                    self.fault_missing(region, page, bool(flags & uffd.PF_WRITE))
                self._time_fault(region, page, before, taken)
            elif kind == uffd.EVENT_UNMAP:
                self._on_unmap(region, addr, end)
            # EVENT_REMOVE is never delivered: the daemon does not ask for
            # UFFD_FEATURE_EVENT_REMOVE. It would not mean "forget" anyway:
            # the kernel sends it for MADV_DONTNEED too, which on a shared
            # mapping leaves the data in the memfd (README "Known limits"
            # covers MADV_REMOVE).

    def _time_fault(self, region: Region, page: int, before: int, taken: float) -> None:
        """Fault-service latency (latency.py): a fault resolved here is timed
        now; one waiting for its page's store read is timed when the read
        maps the page (SwapIn._mapped), from the first fault that waited.
        A fault parked for budget or behind a write is not timed."""
        after = region.table.state[page]
        if after == pt.RESIDENT:
            self.regions.fault_latency.observe(time.monotonic() - taken)
        elif after == pt.LOADING and not (before == pt.LOADING and page in region.fault_started):
            region.fault_started[page] = taken

    def _on_unmap(self, region: Region, addr: int, end: int) -> None:
        """The client unmapped [addr, end) (munmap, mremap shrink or move).
        The whole region unmapped closes it; part of it forgets only those
        pages."""
        lo, hi = max(addr, region.addr), min(end, region.addr + region.size)
        if lo >= hi:
            return
        if lo == region.addr and hi == region.addr + region.size:
            self.regions.close_region(region, "unmapped by client")
            return
        self.forget.forget_range(region, (lo - region.addr) >> SHIFT, (hi - lo + PAGE - 1) >> SHIFT)

    def fault_missing(self, region: Region, page: int, write: bool, force: bool = False) -> None:
        table = region.table
        state = table.state[page]
        if state == pt.EMPTY:
            if not self.budget.charge(1, force):
                self._park_for_budget(region, page, write)
                return
            self._fill_zero(region, page, write)
        elif state == pt.SWAPPED:
            if not self.budget.charge(1, force):
                self._park_for_budget(region, page, write)
                return
            # Refault distance (policy.h, as Linux's workingset detection): a
            # page back soon after its eviction belongs to the working set; it
            # returns active (see victims.py).
            if policy.refault_active(self.regions.tick, int(table.stamp[page]), self.budget.max_pages):
                table.flags[page] |= pt.F_ACTIVE
                self.regions.stats["activations"] += 1
            self.readahead.start_load(region, page, write)
        elif state == pt.LOADING:
            # The read in flight ends with a COPY, which wakes this fault too;
            # in a stream's read-ahead the client caught up with its reads.
            self.readahead.stream_caught_up(region, page)
        elif state == pt.PUNCHING:
            # Punched, its completion not applied yet: _punch_done wakes it and
            # the retry is served from the slot (or zeros). The punch's
            # completion depends on no fault, so parking cannot deadlock.
            table.flags[page] |= pt.F_WAITERS
        elif state == pt.AT_PARENT:
            # A forked child's page still held by its parent (cow.py).
            if not self.budget.charge(1, force):
                self._park_for_budget(region, page, write)
                return
            self.cow.fault_at_parent(region, page)
        else:
            uffd.wake(region.uffd, region.addr + (page << SHIFT), PAGE)

    def _park_for_budget(self, region: Region, page: int, write: bool) -> None:
        """No room: the fault waits until reclaim makes some (budget.py
        serves it). Counted, and numbered so that reclaim can tell whether
        the room it waits for comes from a clean page or a dirty write."""
        self.regions.budget_waiters.append((region.id, page, write))
        self.regions.stats["budget_waits"] += 1

    def _fill_zero(self, region: Region, page: int, write: bool) -> None:
        """Map never-populated pages as zeros. A fault where the last fill
        ended is a first-touch stream: its window doubles up to readahead_max,
        so writing a fresh region sequentially faults once per window.

        A read maps zeros write-protected: clean, so dropping them later costs
        nothing (they become EMPTY again). A write maps them writable (dirty);
        pages of the window never written are found to be all zeros at
        writeback (an exact test, made with the checksum) and become EMPTY then."""
        table = region.table
        n = 1
        ra = region.ra
        ra.fill_window = policy.fill_window(page, ra.fill_expect, ra.fill_window, self.readahead.ra_max_pages)
        if ra.fill_window > 1:
            # The window's EMPTY pages from `page` on, as far as the budget
            # allows (vectorised: a per-page loop here was 12% of the engine's
            # time on a first-touch stream, py-spy).
            end = min(region.npages, page + ra.fill_window)
            n += self.budget.charge_leading(table.state[page + 1:end] == pt.EMPTY)
        mapped, dirty, err = self._map_zeros(region, page, n, write_protect=not write)
        dirty |= write
        # A COPY that stopped part way (ENOMEM from the client's memory
        # cgroup, a page that vanished...) did map the pages before it: they
        # are RESIDENT and charged, clean zeros write-protected or dirty as
        # mapped -- left EMPTY, a write-protected one would send every write
        # to it round fault_wp for ever. The rest go back to EMPTY,
        # uncharged, and threads faulting on them are woken to fault again.
        seg = slice(page, page + mapped)
        table.move(seg, pt.RESIDENT)
        table.flags[seg] = np.where(dirty[:mapped], pt.F_DIRTY, 0)
        table.stamp[seg] = self.budget.advance_clock(mapped) if mapped else self.regions.tick
        self.regions.charged -= n - mapped
        ra.fill_expect = page + n if mapped == n else -1
        if mapped == n:
            return
        if self.regions.ioctl_result(region, err, "zero fill") == GONE_:
            return
        # Let the threads fault again (for the first unmapped page, once the
        # pending event is read if the error was EAGAIN).
        uffd.wake(region.uffd, region.addr + ((page + mapped) << SHIFT), (n - mapped) << SHIFT)

    def _map_zeros(self, region: Region, page: int, n: int, write_protect: bool) -> tuple[int, np.ndarray, int]:
        """Map n pages of zeros from `page` with one zero fill (uffd.zero_fill,
        the fault threads' rule too; page by page from where it stops). Returns (pages mapped from the front, which of them
        were adopted dirty, -errno where it stopped or 0)."""
        dst = region.addr + (page << SHIFT)
        dirty = np.zeros(n, bool)
        ret = uffd.zero_fill(region.uffd, dst, n << SHIFT, self.zero_fill.addr, write_protect)
        if ret == n << SHIFT:
            return n, dirty, 0
        mapped = max(ret, 0) >> SHIFT
        while mapped < n:
            at = dst + (mapped << SHIFT)
            ret = uffd.zero_fill(region.uffd, at, PAGE, self.zero_fill.addr, write_protect)
            if ret == -errno.EEXIST:
                # The page is in the memfd while EMPTY here: its content
                # appeared over zeros (a write(2) to the memfd, or a forked
                # child's touch). The client owns its memfd, so it is adopted,
                # dirty; all-zero, it is harmless, and it drops back to EMPTY
                # at writeback (README "Known limits").
                ret = uffd.cont(region.uffd, at, PAGE, 0)
                if ret == -errno.EEXIST:
                    ret = PAGE  # mapped in the client already
                dirty[mapped] = True
            if ret < 0:
                return mapped, dirty, ret
            mapped += 1
        return n, dirty, 0

    def fault_wp(self, region: Region, page: int) -> None:
        table = region.table
        state = table.state[page]
        addr = region.addr + (page << SHIFT)
        if state == pt.RESIDENT:
            self.dirtying.make_dirty(region, page)
        elif state in (pt.WRITEBACK, pt.LOADING, pt.PUNCHING):
            # Invariant 4: a write to a page under writeback waits until the
            # writeback ends; it is parked here, never blocked on. (LOADING: an
            # I/O thread mapped the page write-protected before its completion
            # reached us; the write is let through in _load_done. PUNCHING:
            # _punch_done wakes it; it refaults MISSING and is served from the
            # slot, current by invariant 1.)
            table.flags[page] |= pt.F_WAITERS
        elif state in (pt.EMPTY, pt.SWAPPED) and self._page_in_memfd(region, page):
            # Mapped write-protected while the table says it is not in memory:
            # a wake alone would send the write round this fault for ever.
            self._stray_page(region, page, state)
        else:
            # Dropped or being loaded since the fault was raised: the retry
            # after the wake raises a MISSING fault that we serve.
            uffd.wake(region.uffd, addr, PAGE)

    def fault_minor(self, region: Region, page: int) -> None:
        """The page is (or was, when the fault was raised) in the memfd but
        not mapped in the client (e.g. after the client's MADV_DONTNEED): map
        it again, write-protected unless dirty.

        A MINOR event can wait in the queue while reclaim punches its page:
        then the page is no longer in the memfd, and the answer is a wake, so
        the thread faults again (MISSING) and is served from the slot.
        Presence is checked (mincore on the daemon's own mapping: no fault,
        no file lock) before anything is freed or mapped."""
        table = region.table
        state = table.state[page]
        addr = region.addr + (page << SHIFT)
        if state == pt.PUNCHING:
            # Never parked: the punch may be waiting for the memfd's inode lock,
            # held by this very thread (a write(2) to its memfd). Mapped
            # write-protected while still in the memfd; gone already (EFAULT),
            # the retry faults MISSING and parks until the punch returns.
            ret = uffd.cont(region.uffd, addr, PAGE, uffd.CONTINUE_MODE_WP)
            if (ret in (-errno.EEXIST, -errno.EFAULT)
                    or self.regions.ioctl_result(region, ret, "UFFDIO_CONTINUE") == AGAIN):
                uffd.wake(region.uffd, addr, PAGE)
        elif state in (pt.RESIDENT, pt.WRITEBACK):
            # A use: the page was out of the client's page tables (taken out
            # by the access sampler, sampling.py, or by the client's own
            # MADV_DONTNEED), so this touch is the first since; it is stamped
            # as a fault is (victims.py reads stamps as last use) and made
            # active (policy.minor_use, the rule the fault threads' own
            # fp_take_minor follows for a RESIDENT page's MINOR fault: a
            # WRITEBACK one, one whose CONTINUE failed there, or one with no
            # fast path, comes here).
            self.regions.stats["minor_faults"] += 1
            # The clock moves on, as for a first write (dirtying.py): a use
            # stamped with an unchanged clock -- no page brought in since the
            # page was sampled -- would look like no use at all, and the
            # sampler would evict a page in use (victims.py VictimQueue._untouched).
            table.stamp[page] = self.budget.advance_clock()
            table.flags[page] = policy.minor_use(int(table.flags[page]))
            # Writable only if dirty and no forked child still reads it
            # (cow.py): policy.minor_writable, fp_take_minor's rule too.
            writable = policy.minor_writable(state, int(table.flags[page]), self.cow.children_at(region, page))
            ret = uffd.cont(region.uffd, addr, PAGE, 0 if writable else uffd.CONTINUE_MODE_WP)
            if ret == -errno.EFAULT and state == pt.RESIDENT and not self._page_in_memfd(region, page):
                self._vanished(region, page)
            elif ret == -errno.EEXIST or self.regions.ioctl_result(region, ret, "UFFDIO_CONTINUE") == AGAIN:
                uffd.wake(region.uffd, addr, PAGE)  # mapped already, or fault again later
        elif state in (pt.EMPTY, pt.SWAPPED) and self._page_in_memfd(region, page):
            self._stray_page(region, page, state)
        else:
            # Stale (the page was punched since the fault was raised), or a
            # load is in flight: fault again.
            uffd.wake(region.uffd, addr, PAGE)

    def _page_in_memfd(self, region: Region, page: int) -> bool:
        return bool(uffd.resident(region.daddr + (page << SHIFT), PAGE)[0] & 1)

    def _stray_page(self, region: Region, page: int, state: int) -> None:
        """A page is in the memfd although the table has it SWAPPED or EMPTY:
        written to the memfd directly (write(2)), or touched by a forked
        child whose mapping is not registered (a read there allocates a zero
        page in the shared memfd).

        SWAPPED: the slot copy wins, never the intruder on trust: the page is
        punched and the thread woken, to fault MISSING and be served from the
        slot. EMPTY: the content appeared over zeros; the client owns its
        memfd, so it is adopted as dirty (an all-zero page is harmless and
        drops back to EMPTY at writeback). README "Known limits" says both."""
        addr = region.addr + (page << SHIFT)
        table = region.table
        if state == pt.SWAPPED:
            self.regions.clientlog.warning("region %d page %d appeared in memory while swapped; the slot copy"
                                           " wins", region.id, page)
            # Charged while it is punched (it holds memory): _punch_done
            # uncharges it, makes it SWAPPED again and wakes the thread.
            self.budget.charge(1, force=True)
            table.flags[page] |= pt.F_WAITERS
            self.puncher.punch(region, np.array([page]), evicted=False)
            return
        self.regions.clientlog.warning("region %d page %d appeared in memory while empty; adopting it as"
                                       " dirty", region.id, page)
        self.budget.charge(1, force=True)
        table.move(page, pt.RESIDENT)
        table.flags[page] = pt.F_DIRTY
        table.stamp[page] = self.budget.advance_clock()
        # Mapped writable (dirty): CONTINUE if it is not mapped in the client,
        # else just un-protect it (a write-protect fault brought us here).
        ret = uffd.cont(region.uffd, addr, PAGE, 0)
        if ret == -errno.EEXIST:
            ret = uffd.writeprotect(region.uffd, addr, PAGE, protect=False)
        if ret == -errno.EFAULT and not self._page_in_memfd(region, page):
            self._vanished(region, page)  # punched again meanwhile (by the client)
        elif self.regions.ioctl_result(region, ret, "UFFDIO_CONTINUE") == AGAIN:
            uffd.wake(region.uffd, addr, PAGE)

    def _vanished(self, region: Region, page: int) -> None:
        """A RESIDENT page is no longer in the memfd: only the client can do
        that (MADV_REMOVE or fallocate on its region, which README forbids).
        A clean page still has its slot copy and becomes SWAPPED; a dirty one
        is lost and reads as zeros (EMPTY). The thread faults again."""
        table = region.table
        has_slot = table.slot[page] >= 0 and not table.flags[page] & pt.F_DIRTY
        self.regions.clientlog.warning("region %d page %d was removed from memory by the client%s", region.id,
                                       page, "" if has_slot else "; its unsaved content is lost")
        if not has_slot and table.slot[page] >= 0:
            self.slots.free(int(table.slot[page]))
            table.slot[page] = pt.NO_SLOT
        table.move(page, pt.SWAPPED if has_slot else pt.EMPTY)
        table.flags[page] = 0
        self.regions.charged -= 1
        uffd.wake(region.uffd, region.addr + (page << SHIFT), PAGE)
