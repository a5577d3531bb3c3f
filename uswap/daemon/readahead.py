"""Read-ahead: which pages a swap-in fault's load covers, and a
sequential stream's windows queued ahead of it. The loads themselves (the
reads, their completions, retries and poison) are swapin.py's.

A region has several streams (threads streaming through it at once), the
latest used first (Region.ra_streams); a fault belongs to the first with
locality to it (native/policy.h us_ra_find, by the rule us_ra_locality),
and one random to all starts a new stream in place of the least recently
used. A fault away from its stream's last window reads just its page or
the aligned `readahead` window around it; a fault where the last window
ended, or inside the windows ahead of the stream's latest fault, is a
stream, whose windows
double up to `readahead_max`, each one load of every swapped page of its
range whatever their slots (read as runs of adjacent slots, through pages
that are not swapped), kept STREAM_DEPTH ahead of the stream's latest
fault.

Threads and lock: the engine thread, page lock held (faults.py calls in).
"""
from __future__ import annotations

import numpy as np

from uswap.daemon import pagetable as pt
from uswap._fastpath_cffi import ffi, lib
from uswap.daemon import policy
from uswap.daemon.budget import Budget
from uswap.daemon.region import Region
from uswap.daemon.regionset import NO_WRITE, RegionSet
from uswap.daemon.slots import SlotAllocator
from uswap.daemon.swapin import SwapIn

# Windows a sequential stream keeps read ahead of its latest fault. Their
# reads are in flight together, so the store's latency is paid about once
# per STREAM_DEPTH windows instead of once per window, and a store that
# serves requests in parallel (an NFS server, an SSD) is kept busy.
STREAM_DEPTH = 4

# The columns of a row of Region.ra_streams (one stream).
L, E, W, F = policy.RA_LAST, policy.RA_EXPECT, policy.RA_WINDOW, policy.RA_FLAGS


class ReadAhead:
    def __init__(self, regions: RegionSet, slots: SlotAllocator, budget: Budget, swapin: SwapIn) -> None:
        self.regions = regions
        self.slots = slots  # which slots have a write in flight (_window)
        self.budget = budget  # every page a window loads is charged
        self.swapin = swapin  # queues and runs the loads
        # Window sizes, in pages: the loads' own (SwapIn sizes its bounce
        # buffers by the largest), read here, not computed twice.
        self.ra_pages = swapin.ra_pages
        self.ra_max_pages = swapin.ra_max_pages

    def start_load(self, region: Region, page: int, write: bool = False) -> None:
        """Read a swapped page back with its neighbours (a near window: in
        adjacent slots; a stream's: in any slots), budget permitting. The
        faulting page is already charged.

        Read-ahead: a fault away from the last window reads the aligned
        `readahead` window around the page (like kernel swap's cluster). A fault
        where the last window ended is a sequential stream: the window doubles
        up to `readahead_max`, and windows are queued until STREAM_DEPTH of them
        lie ahead of the fault (asynchronous read-ahead, _read_ahead); a fault
        on a page of theirs still loading keeps them that far ahead
        (stream_caught_up). A stream's window loads every swapped page of
        its range whatever its slot, and reads through pages that are not
        swapped (_window): neither scattered slots nor pages left resident
        by random access cut it short. Such a page, evicted before the
        stream gets there, faults inside the stream's windows: that fault is
        the stream's (us_ra_locality), loads the window from it (taking the
        other such pages ahead along) and leaves the windows ahead as they
        are.

        A write fault's page is mapped writable and dirty, its read-ahead
        neighbours write-protected, all from one load (the load's
        write_page); a stream that writes continue has its windows mapped
        writable."""
        table = region.table
        slot = int(table.slot[page])
        # Stream, near or random, against each of the region's streams (a
        # few threads stream through it at once: policy.h us_ra_find; the
        # fast path serves the random ones it can before they get here).
        # The fault's stream becomes the latest used (row 0); a random one
        # starts a new stream there, the least recently used dropped.
        streams = region.ra_streams
        which, locality = policy.ra_find(page, streams, self.ra_pages)
        policy.ra_use(streams, which)
        ra = streams[0]
        sequential = locality == policy.STREAM
        skip = runs = None
        if sequential:
            ra[W] = self._grown(int(ra[W]))
            first = page
            last, skip, runs = self._window(table, page, slot, page + int(ra[W]))
        elif locality == policy.RANDOM:
            # No locality with any stream: read just this page (random
            # access gains nothing from neighbours and pays for their transfer).
            ra[W] = 1
            first = last = page
        else:
            ra[W] = self.ra_pages
            lo = page - page % self.ra_pages
            first = page
            while (first > lo and table.state[first - 1] == pt.SWAPPED
                   and table.slot[first - 1] == slot - (page - first + 1)
                   and self.budget.charge(1)):
                first -= 1
            last = self._extend_forward(table, page, slot, lo + self.ra_pages)
        writes = self._writes_stream(region, page, write, sequential)
        ra[L] = page
        ra[F] = (policy.RA_F_STREAMING if sequential else 0) | (policy.RA_F_WRITING if writes else 0)
        loaded = self.swapin.queue_load(region, first, last - first + 1, slot - (page - first),
                                        page if write else NO_WRITE, skip, runs)
        self.regions.stats["readahead_pages"] += loaded - 1
        # A stream's fault inside its windows (on a page they did not load)
        # leaves the windows ahead of it where they are: they still end at
        # ra_expect.
        ra[E] = max(int(ra[E]), last + 1) if sequential else last + 1
        if sequential:
            self._read_ahead(region, page)
        self.swapin.pump_loads()

    def stream_caught_up(self, region: Region, page: int) -> None:
        """A fault on a LOADING page (faults.py). Inside a sequential
        stream's read-ahead (past its latest fault, before where its windows
        end) it means the client caught up with the reads: the stream moves
        on to `page` and its windows are topped up to STREAM_DEPTH ahead of
        it -- the trigger kernel swap's asynchronous read-ahead gets from its
        marked page, which a userfaultfd client cannot give (a mapped page
        raises no event)."""
        streams = region.ra_streams
        mine = np.flatnonzero((streams[:, F] & policy.RA_F_STREAMING != 0)
                              & (streams[:, L] < page) & (page < streams[:, E]))
        if len(mine):
            policy.ra_use(streams, int(mine[0]))  # the stream's windows are topped up: row 0
            ra = streams[0]
            ra[L] = page
            ra[W] = self._grown(int(ra[W]))
            self._read_ahead(region, page)
            self.swapin.pump_loads()

    @staticmethod
    def _writes_stream(region: Region, page: int, write: bool, sequential: bool) -> bool:
        """Whether the stream's windows from now on are mapped writable
        (region.write_stream), at a swap-in fault of `page` (ra_expect not
        yet moved past its window). A sequential stream that a write
        continues, at its front (where its windows end, or past), is being
        rewritten: its windows are mapped writable (dirty), not
        write-protected, so each page does not take a second fault for its
        first write. A fault behind its front, inside its windows (a page
        they did not load: evicted since, or left out), is not where the
        stream goes on but one page of it -- another writer's record update,
        or a read -- and leaves the stream as it was: taken as a write
        stream, one 4 KiB write inside a read stream's windows mapped the
        next windows writable, every page dirty and written back again on
        eviction (tests/daemon/test_review_ra_inside.py: 256 dirty pages for
        one write). The fault's own page is its load's write_page either
        way."""
        if not sequential:
            return False
        return write if page >= region.ra_streams[0, E] else region.write_stream

    def _grown(self, window: int) -> int:
        """A stream's next window: double the last, at least the `readahead`
        window (a stream found after a random one-page load starts there),
        at most `readahead_max`."""
        return min(max(window * 2, self.ra_pages), self.ra_max_pages)

    def _read_ahead(self, region: Region, page: int) -> None:
        """Queue a stream's windows, from where its last one ended (ra_expect)
        and each from the next SWAPPED page, until they reach STREAM_DEPTH
        windows past `page` (its latest fault), the region's end, or the
        budget. Read-ahead past the faulting window stays within an eighth
        of the budget: on a small budget, pages read much further ahead
        would be reclaimed before the stream reaches them, and the windows
        in flight would keep other faults waiting for room."""
        table, ra = region.table, region.ra_streams[0]
        window = int(ra[W])
        depth = min(STREAM_DEPTH * window, max(window, self.budget.max_pages // 8))
        horizon = min(region.npages, page + depth)
        while ra[E] < horizon:
            expect = int(ra[E])
            ahead = np.flatnonzero(table.state[expect:horizon] == pt.SWAPPED)
            if not len(ahead):
                ra[E] = horizon  # nothing swapped up to there: the stream's next fault is past it
                return
            nxt = expect + int(ahead[0])
            if not self.budget.charge(1):
                return
            nslot = int(table.slot[nxt])
            end, skip, runs = self._window(table, nxt, nslot, nxt + window)
            self.regions.stats["readahead_pages"] += self.swapin.queue_load(region, nxt, end - nxt + 1, nslot,
                                                                            NO_WRITE, skip, runs)
            ra[E] = end + 1

    def _window(self, table: pt.PageTable, page: int, slot: int,
                limit: int) -> tuple[int, np.ndarray | None, np.ndarray | None]:
        """A stream's window from `page` (SWAPPED, charged, in `slot`) to
        below `limit`: it loads every SWAPPED page of that range, in
        whatever slots (after random writes, neighbouring pages' slots are
        scattered: each eviction took the next free ones), as ONE load, up
        to the budget (each page loaded is charged, in order). Every other
        page (resident, perhaps dirty and newer than its slot; loading
        already...) is not the load's: marked in its skip mask, never moved,
        charged or mapped by it (see SwapIn.queue_load).

        The load's I/O reads each run of adjacent slots once, into its place
        in the buffer. A run reads through the pages between two of its own
        whose slots continue the run's (as a window over ordered slots
        always did: one read instead of two), unless one of those slots has
        a write in flight -- invariant 3 (no read of a slot while a write to
        it is in flight; a page read through may have left that slot, which
        went to another page being written now): the run splits there, and
        those slots are not read. The window ends before an own page whose
        slot has a write in flight (none should: the slot holds its copy).

        Returns the window's last page, its skip mask (uint8 per page of the
        window, 1: not the load's; None: every page is), and its runs
        (int64 rows (page index, slot, pages); None: one run from `slot`,
        the plain load of adjacent slots)."""
        end = min(limit, table.npages)
        if end <= page + 1:
            return page, None, None
        firsts, ends = self.slots.write_bounds()
        m = end - page
        skip = np.empty(m, np.uint8)
        runs = np.empty((m, 3), np.int64)
        out = np.zeros(4, np.int64)
        # native/window.h: a dozen numpy calls here were 40-120 us a window,
        # a fifth of the engine's time on the scale row (py-spy).
        buf = ffi.from_buffer  # not ctypes.data: 0.3 us a pointer, not 1.6
        n = lib.us_ra_window(buf("uint8_t[]", table.state), buf("int32_t[]", table.slot), page, end,
                             buf("int64_t[]", firsts), buf("int64_t[]", ends), len(firsts), self.budget.room(),
                             buf("uint8_t[]", skip), buf("int64_t[]", runs), buf("int64_t[]", out))
        if n == 0:
            return page, None, None
        admitted, nruns, any_skip = int(out[1]), int(out[2]), bool(out[3])
        # The budget's rule for a window, on the pages window.h found (it
        # was given the room the budget has: all of them are admitted).
        charged = self.budget.charge_leading(np.ones(admitted, bool))
        assert charged == admitted, (charged, admitted)
        return (page + n - 1, skip[:n].copy() if any_skip else None,
                runs[:nruns].copy() if nruns > 1 else None)

    def _extend_forward(self, table: pt.PageTable, page: int, slot: int, limit: int) -> int:
        """Last page of the run from `page` (charged) onwards, below `limit`,
        of SWAPPED pages in slots adjacent to `slot`; charges each page added.
        (Vectorised: a per-page loop here was 15% of the engine's time on a
        sequential stream, py-spy.)"""
        end = min(limit, table.npages)
        if end <= page + 1:
            return page
        nxt = slice(page + 1, end)
        ok = (table.state[nxt] == pt.SWAPPED) & (table.slot[nxt] == np.arange(slot + 1, slot + end - page))
        return page + self.budget.charge_leading(ok)
