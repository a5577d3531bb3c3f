"""Swap-in: the loads that read swapped pages back (which pages each one
covers is readahead.py's, and drain.py's), and applying the reads'
completions: verified pages become RESIDENT; a page that failed its
checksum or a failed read is read again after a backoff, each page from
its own slot (the page table's; a stream's window may hold pages of
scattered slots), or past read_deadline (read_failure: sigbus) poisoned
(invariant 6).

Swapped-in pages are mapped write-protected, clean copies of their slots
(swap cache), except where a write is known to come: the page of a write
fault (as the fast path maps it; its read-ahead neighbours come in the same
store read, write-protected), the windows of a stream that writes continue
(readahead.py),
and every page during drain are mapped writable and dirty.

Threads and lock: the engine thread decides and queues loads and applies
their completions (_mapped), page lock held. The I/O threads (C: cpool.py;
Python: iopool.py running readmap.read_verify_map) read, then verify each
page's checksum and map the verified pages into the client themselves with
the one routine of every swap-in (native/readmap.h us_verify_map), and
change no page state: the pages stay LOADING until
_load_done runs on the engine thread. The fast path's C
threads load random single pages of their own; one that fails is taken over
here (take_over_fast_load).
"""
from __future__ import annotations

import logging
import time

import numpy as np

from uswap import native, uffd
from uswap.config import Config
from uswap.daemon import pagetable as pt
from uswap.daemon.budget import Budget
from uswap.daemon.cpool import CPool
from uswap.daemon.dirtying import Dirtying
from uswap.daemon.forget import Forget
from uswap.daemon.iopool import IoPool
from uswap.daemon.ratelimit import RateLimitedLog
from uswap.daemon.readmap import read_verify_map
from uswap.daemon.region import Region
from uswap.daemon.regionset import AGAIN, GONE_, NO_WRITE, PAGE, SHIFT, RegionSet
from uswap.daemon.slots import SlotAllocator
from uswap.store.base import Store

log = logging.getLogger("uswap.engine")

class SwapIn:
    def __init__(self, cfg: Config, store: Store, regions: RegionSet, slots: SlotAllocator, budget: Budget,
                 forget: Forget, dirtying: Dirtying, io: IoPool, cpool: CPool | None) -> None:
        self.cfg = cfg
        self.store = store
        self.regions = regions
        self.slots = slots
        self.budget = budget
        self.forget = forget  # pages unmapped while they loaded
        self.dirtying = dirtying  # writes parked while they loaded
        self.io = io
        self.cpool = cpool  # the C data path, or None (see engine.py)
        self.ra_pages = max(1, cfg.readahead // PAGE)
        self.ra_max_pages = max(self.ra_pages, cfg.readahead_max // PAGE)
        # Swap-in bounce buffers, preallocated and touched (invariant 8).
        self.free_buffers = [native.AlignedBuffer(self.ra_max_pages * PAGE)
                             for _ in range(max(8, cfg.io_threads * 4))]
        # Poisoned pages are lost data: their lines have a limiter of their
        # own, so retry chatter on errlog cannot hide them.
        self.poisonlog = RateLimitedLog(log, cfg.error_log_interval, cfg.error_log_burst)

    def queue_load(self, region: Region, first: int, n: int, slot: int, write_page: int = NO_WRITE,
                   skip: np.ndarray | None = None, runs: np.ndarray | None = None) -> int:
        """Queue the load of pages first..first+n (charged) from slots slot..;
        write_page: the page of a write fault among them, mapped writable
        (NO_WRITE: none); skip: the pages of the window that are not the
        load's (read through, or not read at all; readahead.py _window;
        None: none); runs: a stream's window over scattered slots, read as
        one store read per run of adjacent slots, rows (page index, slot,
        pages) (readahead.py _window; None: one read from `slot`). Returns
        how many pages it loads. The load is mapped writable or not as the
        region's latest used stream asks now (region.write_stream: the
        stream queuing it, readahead.py), not when it gets a buffer: by
        then another stream of the region may have faulted (a read
        stream's windows came home dirty beside a write stream's,
        tests/daemon/test_review_ra_stream_modes.py).

        Invariant (read-through): a page marked in skip is never moved,
        charged or mapped by this load -- it may be resident, dirty and newer
        than the bytes read for it. Only the load's own pages go LOADING here,
        us_verify_map (native/readmap.h) never maps a skipped page, and
        _load_done settles the own pages only."""
        own = slice(first, first + n) if skip is None else first + np.flatnonzero(skip == 0)
        if region.fault_started:
            # Left by a load that ended without mapping its page (or one the
            # fast path mapped): stale. The fault that starts this load, if
            # any, is recorded after (faults.py _time_fault).
            for page in range(first, first + n) if skip is None else own.tolist():
                region.fault_started.pop(page, None)
        region.table.move(own, pt.LOADING)
        self.regions.load_queue.append((region.id, first, n, slot, time.monotonic(), write_page, skip, runs,
                                        region.write_stream))
        region.inflight += 1
        return n if skip is None else len(own)

    def pump_loads(self) -> None:
        while self.regions.load_queue and self.free_buffers:
            load = self.regions.load_queue.popleft()
            rid, first, n, slot, started, write_page, skip, runs, writable = load
            region = self.regions.by_id.get(rid)
            if region is None:
                continue
            buf = self.free_buffers.pop()
            # With reads in flight, a load the C pool cannot take now (every
            # nfs:// context busy) waits for one of them to finish (its
            # _finish_load pumps again) rather than go to the slower Python
            # pool: a stream keeps several windows queued.
            if not self._submit_read(region, first, n, slot, buf, started, write_page, skip, runs, writable,
                                     may_wait=self.regions.loads_inflight > 0):
                self.free_buffers.append(buf)
                self.regions.load_queue.appendleft(load)
                return
            self.regions.loads_inflight += 1
            # Loads, their store reads (one per run of adjacent slots), the
            # pages read, and those read through (not the load's).
            stats = self.regions.stats
            read = n if runs is None else int(runs[:, 2].sum())
            stats["swapin_loads"] += 1
            stats["swapin_reads"] += 1 if runs is None else len(runs)
            stats["swapin_read_pages"] += read
            stats["readthrough_pages"] += 0 if skip is None else read - (n - int(np.count_nonzero(skip)))
            stats["swapin_reads_peak"] = max(stats["swapin_reads_peak"], self.regions.loads_inflight)

    def _submit_read(self, region: Region, first: int, n: int, slot: int, buf, started: float,
                     write_page: int, skip: np.ndarray | None, runs: np.ndarray | None, writable: bool,
                     may_wait: bool) -> bool:
        """Queue a swap-in read: on the C pool, else (the C pool cannot take
        it) on the Python pool -- or, with `may_wait`, not at all (False).
        The I/O thread reads, verifies each page's
        checksum and maps the pages that pass into the client itself (one
        UFFDIO_COPY per run of them; one for the whole window when every page
        passes), saving the hop back to this thread before the client resumes.
        A page that fails its check is not mapped, and does not hold back the
        rest of its window: _load_done retries it alone. The page state stays
        LOADING until _load_done runs here; faults meanwhile park (see
        faults.py's fault_wp). The uffd stays open meanwhile: region.release() waits for
        region.inflight to drop to 0."""
        store = self.store
        sums = np.zeros(n, np.uint32)
        expected = region.table.sum[first:first + n].copy()
        uffd_fd = region.uffd
        dst = region.addr + (first << SHIFT)
        # The daemon's mapping of the same pages: a page found present in the
        # memfd gets its verified store copy written there (readmap.h), and
        # which pages were mapped, for a COPY that stops part way (_load_done).
        view = region.daddr + (first << SHIFT)
        mapped = np.zeros(n, np.uint8)
        # Swap cache: mapped write-protected so the pages stay clean copies of
        # their slots; during drain they come home for good, writable, and so
        # do the windows of a stream being rewritten and the page of a write
        # fault (readahead.py start_load), in the same read as its neighbours
        # (`writable`: the stream's mode when it queued the load). _load_done
        # goes by the mode used: writable pages are dirty, their slots freed.
        mode = 0 if self.regions.draining or writable else uffd.COPY_MODE_WP
        wp = write_page - first if first <= write_page < first + n else uffd.NO_WRITE_PAGE

        def on_done(res, err):
            self._load_done(region, first, n, slot, buf, started, write_page, skip, res, err, runs)

        if self.cpool is not None:
            if self.cpool.read_copy(buf.addr, n * PAGE, slot * PAGE, uffd_fd, dst, view, mode, wp, expected, sums,
                                    skip, mapped, on_done, runs):
                return True
            if may_wait:
                return False

        def work():
            return sums, read_verify_map(store, buf.addr, n, slot, uffd_fd, dst, view, mode, wp, expected, sums,
                                         skip, mapped, runs), mode, mapped

        self.io.submit(work, on_done)
        return True

    def _load_done(self, region: Region, first: int, n: int, slot: int, buf, started: float, write_page: int,
                   skip: np.ndarray | None, result: tuple | None, err: OSError | None,
                   runs: np.ndarray | None = None) -> None:
        """Apply a load's outcome. A window with pages not its own (skip)
        settles its own pages only (see queue_load). A load that is not one
        plain read of adjacent slots (skip, or runs: a stream's window over
        scattered slots) is read again, on an error, as loads of its own
        pages, each from its own slot (_reload_runs)."""
        self.regions.loads_inflight -= 1
        table = region.table
        own = None if skip is None else np.flatnonzero(skip == 0)  # indices of its own pages
        n_own = n if own is None else len(own)
        plain = own is None and runs is None  # every page its own, in slots slot..slot+n
        if region.closing:
            self.regions.charged -= n_own
            self._finish_load(region, buf)
            return
        if (table.flags[first:first + n] & pt.F_DISCARD)[slice(None) if own is None else own].any():
            # What the I/O thread mapped (`mapped`, us_verify_map), not what
            # the memfd holds: a failed read mapped nothing.
            mode, mapped = (result[2], result[3]) if err is None else (uffd.COPY_MODE_WP, np.zeros(n, np.uint8))
            for a, k in [(0, n)] if own is None else pt.runs(own, n):
                self._settle_discarded_load(region, first + a, k, mode, write_page, mapped[a:a + k] != 0)
            self._finish_load(region, buf)
            return
        bad = np.zeros(0, np.intp)
        if err is None:
            sums, ret, mode, mapped = result
            # Invariant 6, page by page: the I/O thread mapped only the pages
            # whose checksum matched. The others stay LOADING and are read
            # again one by one, so a damaged slot costs its own page only.
            mismatch = sums != table.sum[first:first + n]
            if own is not None:
                mismatch &= skip == 0  # pages read through: not this load's, never checked
            bad = np.flatnonzero(mismatch)
            if len(bad):
                self._retry_bad_pages(region, first, n, bad, started, write_page)
                if len(bad) == n_own:
                    self._finish_load(region, buf)
                    return
                if region.closing:  # a poison found the client gone
                    self.regions.charged -= n_own - len(bad)
                    self._finish_load(region, buf)
                    return
        if err is not None:
            # Invariant 6: a failed read is retried; nothing is mapped from it.
            self.regions.stats["read_errors"] += 1
            self.regions.errlog.error("read error on swap store (offset %d, %d pages): %s", slot * PAGE, n, err)
            region.read_failures += 1
            elapsed = time.monotonic() - started
            if self.cfg.read_failure == "sigbus" and elapsed > self.cfg.read_deadline:
                for a, k in self._slot_runs(table, first, np.arange(n) if own is None else own, n):
                    self._poison(region, first + a, k)
                self._finish_load(region, buf)
                return
            if plain:
                self._reload_later(region, first, n, slot, buf, started, write_page,
                                   self._read_retry_delay(region))
            else:
                self._reload_runs(region, first, np.arange(n) if own is None else own, started, write_page,
                                  self._read_retry_delay(region), n)
                self._finish_load(region, buf)
            return
        if not len(bad):
            region.read_failures = 0
        if own is None:
            good = np.setdiff1d(np.arange(n), bad) if len(bad) else None
        else:
            # Both sorted and unique (pages of the load; the failed ones among
            # them): without assume_unique, setdiff1d sorts both again on every
            # load (2.3% of the engine on a stream, py-spy).
            good = np.setdiff1d(own, bad, assume_unique=True) if len(bad) else own
        outcome = self.regions.ioctl_result(region, ret, "UFFDIO_COPY")
        if outcome == GONE_:
            self.regions.charged -= n_own - len(bad)  # close_region did not count LOADING pages
            self._finish_load(region, buf)
            return
        if outcome == AGAIN:
            # The COPY stopped part way: the pages it had not mapped are
            # mapped again shortly; those it had are in the client (perhaps
            # writable and written since) and settle now, below. A retry
            # never covers them: it would find them present and write their
            # store copies over them (the store copy wins, readmap.h).
            idx = np.arange(n) if good is None else good
            done = mapped[idx] != 0
            if not done.any() and good is None and plain:
                self._reload_later(region, first, n, slot, buf, started, write_page, 0.001)
                return
            self._reload_runs(region, first, idx[~done], started, write_page, 0.001, n)
            if not done.any():
                self._finish_load(region, buf)
                return
            good = idx[done]
        pages = np.arange(first, first + n) if good is None else first + good
        self.regions.swapin_latency.observe(time.monotonic() - started)
        waiters = self._mapped(region, pages, mode, write_page)
        for i in np.flatnonzero(waiters):
            # A write faulted between the COPY and now: it is the page's first
            # write, or (loaded writable, then write-protected by a fork) a
            # write to let through; make_dirty (dirtying.py) does both.
            self.dirtying.make_dirty(region, int(pages[i]))
        self._finish_load(region, buf)

    def _read_retry_delay(self, region: Region) -> float:
        return min(self.cfg.read_retry_max, self.cfg.read_retry_min * (2 ** min(region.read_failures, 16)))

    def _retry_bad_pages(self, region: Region, first: int, n: int, bad: np.ndarray,
                         started: float, write_page: int) -> None:
        """Pages `bad` (indices into the window first..first+n) failed their
        checksum and were not mapped: each is read again on its own, from
        its own slot, after a backoff, or past read_deadline (read_failure:
        sigbus) poisoned -- the damaged pages only, never their window."""
        self.regions.stats["read_errors"] += len(bad)
        slots = region.table.slot[first + bad]
        offsets = ", ".join(str(int(s) * PAGE) for s in slots[:8]) + (", ..." if len(bad) > 8 else "")
        # The window's first page's offset (its pages' slots need not be
        # adjacent: the bad ones' own offsets follow).
        self.regions.errlog.error("read error on swap store (offset %d, %d pages; region %d pages %d..%d):"
                                  " checksum mismatch in %d page(s) at store offset(s) %s; retrying those"
                                  " pages alone", int(region.table.slot[first]) * PAGE, n, region.id, first,
                                  first + n - 1, len(bad), offsets)
        region.read_failures += 1
        if self.cfg.read_failure == "sigbus" and time.monotonic() - started > self.cfg.read_deadline:
            for a, k in self._slot_runs(region.table, first, bad, n):
                self._poison(region, first + a, k)
            return
        self._reload_runs(region, first, bad, started, write_page, self._read_retry_delay(region), 1)

    def _reload_runs(self, region: Region, first: int, idx: np.ndarray, started: float,
                     write_page: int, delay: float, max_len: int) -> None:
        """Read pages first + idx (LOADING, charged) again after `delay`,
        apart from the window they came in, as plain loads of up to max_len
        pages in adjacent slots: each page from its own slot, the one the
        page table names (a LOADING page's slot is the one being read; the
        window's runs were not adjacent, nor are its pages' slots)."""
        for a, k in self._slot_runs(region.table, first, np.asarray(idx), max_len):
            region.inflight += 1  # handed to _reload_later, which counts it out until the retry
            self._reload_later(region, first + a, k, int(region.table.slot[first + a]), None, started,
                               write_page, delay)

    @staticmethod
    def _slot_runs(table: pt.PageTable, first: int, idx: np.ndarray, max_len: int) -> list[tuple[int, int]]:
        """Indices idx (sorted, into the pages from `first`) split into
        (index, count) runs of consecutive pages in adjacent slots (their
        page table's), each at most max_len long."""
        if len(idx) == 0:
            return []
        idx = np.asarray(idx, np.int64)
        base = table.slot[first + idx].astype(np.int64) - idx
        breaks = np.flatnonzero((np.diff(idx) != 1) | (np.diff(base) != 0)) + 1
        out = []
        for chunk in np.split(idx, breaks):
            out.extend(pt.runs(chunk, max_len))
        return [(int(a), int(k)) for a, k in out]

    def _reload_later(self, region: Region, first: int, n: int, slot: int, buf, started: float,
                      write_page: int, delay: float) -> None:
        """Read a LOADING run again after `delay`. Its buffer goes back now; the
        region's in-flight count drops until the retry is queued, so a region
        closed meanwhile is released (and the run uncharged) instead."""
        if buf is not None:  # None: a load the fast path started
            self.free_buffers.append(buf)
        region.inflight -= 1

        def retry() -> None:
            if region.closing:
                self.regions.charged -= n
                self.regions.maybe_release(region)
                return
            if (region.table.flags[first:first + n] & pt.F_DISCARD).any():
                # Unmapped meanwhile: mapping it again would fail for ever.
                # No page of the run is mapped: the attempt that failed mapped
                # none of it (a COPY stopped part way has only its unmapped
                # pages read again, _load_done).
                self._settle_discarded_load(region, first, n, uffd.COPY_MODE_WP, write_page, np.zeros(n, bool))
                return
            region.inflight += 1
            # Pages read again on their own: no stream's window, write-protected
            # (the write fault's page, if any, still mapped writable).
            self.regions.load_queue.append((region.id, first, n, slot, started, write_page, None, None, False))
            self.pump_loads()
        self.regions.after(delay, retry)

    def _settle_discarded_load(self, region: Region, first: int, n: int, mode: int, write_page: int,
                               mapped: np.ndarray) -> None:
        """A LOADING run (its I/O over) with pages the client unmapped
        meanwhile (F_DISCARD): those are forgotten; the others are settled
        by what the load did, `mapped` (us_verify_map's, one bool a page):
        mapped means RESIDENT, clean if mapped write-protected, as `mode` and
        write_page say; not mapped means SWAPPED again, uncharged, its
        threads woken to fault again.

        Invariant (the store copy wins, native/readmap.h): a page is taken as
        loaded only if this load mapped it, never because it is in the memfd.
        A page can be there without the load -- planted by a read of the
        daemon's own mapping of the hole (/proc/PID/mem, a debugger), or
        written there with write(2) -- and taken as mapped it would become a
        clean page holding zeros or junk. Left SWAPPED, the client's next
        touch finds it a stray page and the slot copy wins
        (faults.py _stray_page)."""
        table = region.table
        seg = slice(first, first + n)
        discard = (table.flags[seg] & pt.F_DISCARD) != 0
        # Each page moves once: the unmapped ones to RESIDENT for forget_pages
        # to take from there, the ones not mapped back to SWAPPED, the mapped
        # ones by _mapped below (a second move of those would be RESIDENT ->
        # RESIDENT, which the transition check rejects).
        gone = first + np.flatnonzero(discard)
        table.move(gone, pt.RESIDENT)
        self.forget.forget_pages(region, gone)
        back = first + np.flatnonzero(~discard & ~mapped)
        table.move(back, pt.SWAPPED)
        self.regions.charged -= len(back)
        table.flags[back] &= pt.F_ACTIVE
        for run_first, k in pt.runs(back, n):
            uffd.wake(region.uffd, region.addr + (run_first << SHIFT), k << SHIFT)
        loaded = first + np.flatnonzero(~discard & mapped)
        if len(loaded) == 0:
            return
        waiters = self._mapped(region, loaded, mode, write_page)
        for page in loaded[waiters].tolist():
            if table.flags[page] & pt.F_DIRTY == 0:
                self.dirtying.make_dirty(region, page)

    def _mapped(self, region: Region, pages: np.ndarray, mode: int, write_page: int) -> np.ndarray:
        """Pages a load mapped (us_verify_map, native/readmap.h) with `mode`,
        and `write_page` among them writable, become RESIDENT: clean copies
        of their slots when mapped write-protected; mapped writable (drain, a
        stream being rewritten, a write fault's page), dirty, their slots
        freed as by any first write (dirtying.py). Returns which of them had
        a write parked (F_WAITERS), for the caller to let through."""
        table = region.table
        waiters = (table.flags[pages] & pt.F_WAITERS) != 0
        table.move(pages, pt.RESIDENT)
        table.flags[pages] &= pt.F_ACTIVE
        table.stamp[pages] = self.budget.advance_clock(len(pages))
        self.regions.stats["swapins"] += len(pages)
        if region.fault_started:  # faults waiting for these pages (faults.py _time_fault)
            now = time.monotonic()
            for page in pages.tolist():
                taken = region.fault_started.pop(page, None)
                if taken is not None:
                    self.regions.fault_latency.observe(now - taken)
        writable = pages if not mode & uffd.COPY_MODE_WP else pages[pages == write_page]
        if len(writable):
            table.flags[writable] |= pt.F_DIRTY
            self.slots.free_many(table.slot[writable].copy())
            table.slot[writable] = pt.NO_SLOT
        return waiters

    def _finish_load(self, region: Region, buf) -> None:
        if buf is not None:  # None: a load the fast path started
            self.free_buffers.append(buf)
        region.inflight -= 1
        self.regions.maybe_release(region)
        self.pump_loads()

    def _poison(self, region: Region, first: int, n: int) -> None:
        """read_failure: sigbus — after read_deadline the client gets SIGBUS on
        these pages rather than zeros (invariant 6). The pages are a run in
        adjacent slots (_slot_runs), named by store offset in the log line,
        which is rate-limited like every store error line."""
        self.poisonlog.error("region %d pages %d..%d (store offset %d, %d pages) unreadable past the %gs "
                          "deadline: poisoning (SIGBUS)", region.id, first, first + n - 1,
                          int(region.table.slot[first]) * PAGE, n, self.cfg.read_deadline)
        addr = region.addr + (first << SHIFT)
        # An evicted page's PTE is not empty: it holds the uffd-wp marker left
        # by write-protect-then-punch (start_writeback, Puncher.drop), and
        # UFFDIO_POISON refuses any non-empty PTE with EEXIST -- installing no
        # poison and waking nobody, so the faulting threads slept for ever.
        # Clear the markers first (nothing is mapped there; no wake-up yet).
        uffd.writeprotect(region.uffd, addr, n * PAGE, protect=False, wake=False)
        self.regions.ioctl_failed(region, uffd.poison(region.uffd, addr, n * PAGE), "UFFDIO_POISON")
        table = region.table
        self.slots.free_many(table.slot[first:first + n].copy())
        table.slot[first:first + n] = pt.NO_SLOT
        table.move(slice(first, first + n), pt.POISONED)
        self.regions.charged -= n
        self.regions.stats["poisoned_pages"] += n

    def take_over_fast_load(self, region: Region, page: int, slot: int, err: OSError | None,
                            copied: int, psum: int, started: float) -> None:
        """A one-page load of the fast path failed (the store read, the
        checksum or the COPY): the page is LOADING and charged, as for a load
        of the engine's own, so _load_done's error handling takes it over."""
        self.regions.fp.take_over(region)
        region.inflight += 1
        self.regions.loads_inflight += 1
        sums = np.array([psum], np.uint32)
        # A failed COPY of its one page mapped nothing.
        self._load_done(region, page, 1, slot, None, started, NO_WRITE, None,
                        None if err else (sums, copied, uffd.COPY_MODE_WP, np.zeros(1, np.uint8)), err)
