"""The swap engine: the page state machine for every region.

The page lock (docs/design.md §3): every page state transition is made by a
thread holding the fast path's mutex. The engine thread holds it whenever it
runs (server.py lets go only while it sleeps in epoll_wait); the fast path's
C fault threads take it to decide and to finish (native/fastpath.c). I/O and
punch threads change no page state: their completions are applied here, on
the engine thread, under the lock. That is how invariant 2 is enforced
without a lock per page.

States and flags are in pagetable.py. The invariants of docs/design.md §5 are named
in comments at the one place each is enforced.
"""
from __future__ import annotations

import collections
import errno
import heapq
import logging
import os
import time
from typing import Callable

import numpy as np

from uswap import native, uffd
from uswap.config import Config
from uswap.daemon import clientmaps, fastpath
from uswap.daemon import pagetable as pt
from uswap.daemon.cpool import CPool
from uswap.daemon.fork import ForkManager
from uswap.daemon.iopool import IoPool
from uswap.daemon.ratelimit import RateLimitedLog
from uswap.daemon.region import Region
from uswap.daemon.slots import SlotAllocator
from uswap.daemon.victims import VictimQueue
from uswap.store.base import Store
from uswap.store.file import FileStore
from uswap.store.nfs import NfsStore

log = logging.getLogger("uswap.engine")
PAGE = 4096
SHIFT = 12
# Pages reclaimed per engine step: small enough that a fault never waits
# behind a long reclaim burst (the kernel's SWAP_CLUSTER_MAX is 32 pages).
RECLAIM_STEP = 256
# Largest write gathered from scattered pages (its bounce buffer's size).
GATHER_PAGES = 64
# Seconds a punch counts as memory about to be freed for a fault waiting for
# budget (Engine._punch_will_free); a punch takes microseconds unless a
# client holds its memfd's inode lock.
PUNCH_PATIENCE = 0.2
PUNCH_THREADS = 2
# ioctl errors that are what the daemon sees when the client's mapping or
# process is gone -- and also, from a live client, after a VMA split
# (ENOENT), a stale MINOR fault (EFAULT)... So they only prompt a check.
MAYBE_GONE = {errno.ENOENT, errno.ESRCH, errno.EINVAL, errno.EBADF, errno.EFAULT}
OK, GONE_, AGAIN = 0, 1, 2  # outcomes of Engine._ioctl_result
# A client found alive is not looked at again for this long: an error
# repeated on every fault costs one smaps read per interval, not per fault.
ALIVE_RECHECK = 0.05


class Engine:
    def __init__(self, cfg: Config, store: Store) -> None:
        self.cfg = cfg
        self.store = store
        self.slots = SlotAllocator(store.size_bytes // PAGE)
        self.io = IoPool(cfg.io_threads)
        # Punches (_punch) have threads of their own: one may wait for a
        # client's memfd inode lock while that client's fault waits for a
        # store job, which must never queue behind it on the same threads.
        self.punch_io = IoPool(PUNCH_THREADS, self.io.eventfd, "punch")
        # The file and nfs:// stores' data path runs on C threads that never
        # take the GIL (see native/iopool.c for the measurement that moved it
        # there); other stores (fault injection) run on the Python pool, and
        # so does an nfs:// job when no lent NFS context is idle.
        self.cpool = (CPool(cfg.io_threads, self.io.eventfd, store)
                      if type(store) in (FileStore, NfsStore) else None)
        self.regions: dict[int, Region] = {}
        self.next_region_id = 1
        self.max_pages = cfg.max_resident // PAGE
        self.high_pages = max(1, int(self.max_pages * cfg.high_watermark))
        self.low_pages = max(1, int(self.max_pages * cfg.low_watermark))
        self.ra_pages = max(1, cfg.readahead // PAGE)
        self.ra_max_pages = max(self.ra_pages, cfg.readahead_max // PAGE)
        # Random swap-ins and zero fills are served on the fast path's C threads when the
        # store has a C data path (native/fastpath.c); those threads share
        # `charged`, `tick` and the page tables under the lock that this
        # engine holds whenever it runs (see lock()).
        self.fp = (fastpath.FastPath(cfg.fault_threads, self.io.eventfd, store)
                   if self.cpool is not None and cfg.fault_threads > 0 else None)
        self.shared = self.fp.shared if self.fp is not None else fastpath.plain_shared()
        if self.fp is not None:
            self.fp.configure(self.max_pages, self.high_pages, self.ra_pages, self.ra_max_pages)
            if isinstance(store, NfsStore):
                store.lend(cfg.io_threads + cfg.fault_threads)
        # Pages holding memory or about to: RESIDENT + WRITEBACK + LOADING + PUNCHING.
        self.charged = 0
        self.tick = 1
        self.writes_inflight = 0
        self.loads_inflight = 0
        self.evicting = 0  # pages in WRITEBACK with F_EVICT
        self.punching = 0  # pages in PUNCHING (still charged, memory about to be freed)
        # Punch jobs on the I/O pool: job id -> when submitted (see _must_overcommit).
        self.punch_jobs: dict[int, float] = {}
        self.punch_seq = 0
        self.punch_wake_armed = False
        self.reclaiming = False  # between crossing the high watermark and reaching the low one
        # One scan of the page tables per eighth of the budget evicted.
        self.victims = VictimQueue(max(RECLAIM_STEP, self.max_pages // 8),
                                   lock_key=self._lock_key, read_locked=self._locked_pages)
        # Faults waiting for budget: (region id, page, is_write).
        self.budget_waiters: collections.deque = collections.deque()
        self.batch_pages = max(1, cfg.write_batch // PAGE)
        # Scattered dirty pages are gathered GATHER_PAGES at a time at most, so
        # their bounce buffers stay small whatever write_batch is.
        self.gather_pages = min(self.batch_pages, GATHER_PAGES)
        # Swap-in bounce buffers, preallocated and touched (invariant 8).
        self.free_buffers = [native.AlignedBuffer(self.ra_max_pages * PAGE) for _ in range(max(8, cfg.io_threads * 4))]
        self.load_queue: collections.deque = collections.deque()
        # Write bounce buffers, for scattered dirty pages gathered into one
        # write to adjacent slots (at most one per write in flight).
        self.write_buffers = [native.AlignedBuffer(self.gather_pages * PAGE)
                              for _ in range(min(cfg.max_inflight_writes, 32))]
        self.zero_fill = native.AlignedBuffer(self.ra_max_pages * PAGE)
        self.timers: list = []
        self.timer_seq = 0
        self.write_backoff = 0.0
        self.write_retry_at = 0.0  # no new writes before this (store in error backoff)
        self.store_full = False
        # Slot runs of failed writes that may still land: ([failed at, clock
        # start or None], first slot, count); see _release_failed_slots.
        self.quarantine: list[tuple[list, int, int]] = []
        self.last_write_ok = 0.0
        self.store_no_space = False  # the last write failed with ENOSPC/EDQUOT
        self.probe_inflight = False
        self.probe_at = 0.0
        self.probe_buf = native.AlignedBuffer(PAGE)
        self.draining = False
        self.errlog = RateLimitedLog(log, cfg.error_log_interval, cfg.error_log_burst)
        # Poisoned pages are lost data: their lines have a limiter of their
        # own, so retry chatter on errlog cannot hide them.
        self.poisonlog = RateLimitedLog(log, cfg.error_log_interval, cfg.error_log_burst)
        self.clientlog = RateLimitedLog(log, cfg.error_log_interval, cfg.error_log_burst)  # lines clients cause
        self.stats = collections.Counter()
        # Forked children's copies of regions, copy-on-write (daemon/fork.py).
        self.fork = ForkManager(self)
        # Set by the server: stop watching a region's uffd before its fds close.
        self.on_region_closing: Callable[[Region], None] | None = None

    # ------------------------------------------------------------------ shared state

    @property
    def charged(self) -> int:
        return self.shared.charged

    @charged.setter
    def charged(self, value: int) -> None:
        self.shared.charged = value

    @property
    def tick(self) -> int:
        return self.shared.tick

    @tick.setter
    def tick(self, value: int) -> None:
        self.shared.tick = value

    def lock(self) -> None:
        """Take the page lock from the fast path's threads: the server holds
        it whenever the engine runs, and lets go only in epoll_wait and while
        it reads a client's /proc/PID/smaps between two events."""
        if self.fp is not None:
            self.fp.lock()

    def unlock(self) -> None:
        if self.fp is not None:
            self.fp.unlock()

    def stop_fast_path(self) -> None:
        """After drain, with the lock released: join the fast path's threads;
        the shared counters are copied back into Python first."""
        if self.fp is not None:
            sh = self.shared
            self.shared = fastpath.plain_shared()
            for name in ("charged", "tick", "inflight", "faults", "swapins", "activations"):
                setattr(self.shared, name, getattr(sh, name))
            self.fp.stop()

    # ------------------------------------------------------------------ regions

    def add_region(self, region: Region) -> bool:
        """Take a region on. True when the fast path's threads read its
        uffd; False when the caller (the server's epoll) must."""
        region.id = self.next_region_id
        self.next_region_id += 1
        self.regions[region.id] = region
        return self.fp is not None and self.fp.open(region)

    def close_region(self, region: Region, reason: str) -> None:
        """Stop serving a region. Its slots are freed now for pages with no I/O
        in flight, and by the completion handlers for the rest (invariant 7)."""
        if region.closing:
            return
        region.closing = True
        # Children still reading pages of this region get their copies now,
        # while its pages are resident and its mapping is ours (fork.py).
        self.fork.on_region_closing(region)
        self.clientlog.info("region %d closing (%s)", region.id, reason)
        if self.on_region_closing is not None:
            self.on_region_closing(region)
        if self.fp is not None:
            self.fp.close(region)
        # Threads parked on the region's faults must not sleep forever: woken,
        # they retry the access (on an unmapped range: SIGSEGV, as for any
        # access to unmapped memory).
        uffd.wake(region.uffd, region.addr, region.size)
        table = region.table
        # Slots of pages with a write in flight stay allocated until the write returns.
        # PUNCHING pages stay charged until their punch returns (_punch_done).
        idle = (table.state != pt.WRITEBACK)
        self.slots.free_many(table.slot[idle & (table.slot >= 0)])
        table.slot[idle] = pt.NO_SLOT
        for state in (pt.RESIDENT, pt.WRITEBACK):
            self.charged -= table.count(state)
        self.evicting -= int(np.count_nonzero((table.state == pt.WRITEBACK) & (table.flags & pt.F_EVICT != 0)))
        # LOADING pages are uncharged when their read returns.
        self.budget_waiters = collections.deque(w for w in self.budget_waiters if w[0] != region.id)
        # Queued reads that never started: their pages were charged and counted
        # in region.inflight when queued; undo both here.
        for rid, first, n, slot, started in [j for j in self.load_queue if j[0] == region.id]:
            self.charged -= n
            region.inflight -= 1
        self.load_queue = collections.deque(j for j in self.load_queue if j[0] != region.id)
        self._maybe_release(region)

    def forget_range(self, region: Region, first: int, n: int) -> None:
        """The client unmapped pages first..first+n-1 of a region it keeps
        (munmap or an mremap shrink or move of part of it): the region lives
        on and only these pages are forgotten. Resident ones are punched from
        the memfd and uncharged, slots are freed, and all become EMPTY, so a
        mapping regrown in place over them (it keeps the uffd registration)
        reads zeros on first touch, as the kernel gives a fresh mapping.

        Invariants 2, 3 and 7: a page with a write, read or punch in flight
        (WRITEBACK, LOADING, PUNCHING) cannot change state now; it is marked
        F_DISCARD and forgotten by the completion (_write_done, _load_done,
        _reload_later's retry, _punch_done, or the fast path's FP_FORGET
        record)."""
        first = max(0, first)
        n = min(n, region.npages - first)
        if n <= 0 or region.closing:
            return
        table = region.table
        seg = slice(first, first + n)
        busy = ((table.state[seg] == pt.WRITEBACK) | (table.state[seg] == pt.LOADING)
                | (table.state[seg] == pt.PUNCHING))
        table.flags[seg] |= np.where(busy, pt.F_DISCARD, 0).astype(np.uint8)
        self.stats["forgotten_after_io"] += int(np.count_nonzero(busy))
        self._forget(region, first + np.flatnonzero(~busy))
        # Faults parked for budget there can never be retried by the client.
        self.budget_waiters = collections.deque(
            w for w in self.budget_waiters if not (w[0] == region.id and first <= w[1] < first + n))
        log.info("region %d: pages %d..%d unmapped by the client, forgotten (%d with I/O in flight)",
                 region.id, first, first + n - 1, int(np.count_nonzero(busy)))

    def _forget(self, region: Region, pages: np.ndarray) -> None:
        """Make `pages` (sorted, none with I/O in flight) EMPTY, slots freed,
        waiters woken; RESIDENT ones once their punch returns (uncharged then)."""
        if len(pages) == 0:
            return
        table = region.table
        self.fork.before_forget(region, pages)
        resident = table.state[pages] == pt.RESIDENT
        rest = pages[~resident]
        self.slots.free_many(table.slot[rest].copy())
        table.slot[rest] = pt.NO_SLOT
        table.state[rest] = pt.EMPTY
        table.flags[rest] = 0
        # Resident pages are punched as evicted ones are, off the page lock
        # (_punch's invariant); F_DISCARD makes _punch_done free their slots
        # and leave them EMPTY. They stay charged until then.
        table.flags[pages[resident]] = pt.F_DISCARD
        self._punch(region, pages[resident], evicted=False)
        self.stats["forgotten_pages"] += len(pages)
        # Threads parked on these pages (for budget, or on the I/O) must not
        # sleep for ever: woken, they retry the access -- SIGSEGV on the
        # unmapped range, as the kernel gives, or a fresh fault if it was
        # mapped again in place meanwhile.
        for first, n in pt.runs(pages, 1 << 30):
            uffd.wake(region.uffd, region.addr + (first << SHIFT), n << SHIFT)

    def _maybe_release(self, region: Region) -> None:
        if (region.closing and region.inflight == 0 and region.id in self.regions
                and (self.fp is None or self.fp.inflight(region) == 0)):
            del self.regions[region.id]
            if self.fp is not None:
                self.fp.free(region)
            region.release()

    def _ioctl_result(self, region: Region, ret: int, what: str) -> int:
        """OK, GONE (the client's mapping or process is gone: the region is
        closed) or AGAIN (try later). EAGAIN means the client's address space is
        changing and an event about it waits in the uffd: the engine must go
        and read it before the ioctl can succeed, so nothing here retries in
        place. Other errors (ENOMEM...) are also retried later: the daemon
        must not die for one client's trouble.

        Check, don't infer: an error is GONE only when the kernel's own view
        of the client says so (_client_gone), never from the errno alone: a
        live client's region is never closed on an ioctl error."""
        if ret >= 0 or -ret == errno.EEXIST:
            return OK
        if -ret in MAYBE_GONE and self._client_gone(region):
            self.close_region(region, f"{what}: {os.strerror(-ret)}, and the client's mapping is gone")
            return GONE_
        if -ret != errno.EAGAIN:
            self.errlog.error("%s on region %d failed: %s; retrying", what, region.id, os.strerror(-ret))
        self.stats["ioctl_retries"] += 1
        return AGAIN

    def _client_gone(self, region: Region) -> bool:
        """True when the region's owner process has exited (or exec'd), or
        no part of the region is mapped in place and registered with a uffd
        any more, from /proc/PID/smaps. A region with part of its range still
        registered is not gone: the client unmapped the rest, and the UNMAP
        event waiting in the uffd forgets those pages (forget_range) once it
        is read, so the caller's AGAIN ends. A client found alive is trusted
        for ALIVE_RECHECK."""
        now = time.monotonic()
        if now - getattr(region, "alive_at", -ALIVE_RECHECK) < ALIVE_RECHECK:
            return False
        pid = getattr(region.owner, "pid", None)
        if not pid:
            return False  # no process to look at: keep serving, the session's EOF closes it
        try:
            vmas = clientmaps.memfd_vmas(pid, clientmaps.inode_of(region.memfd))
        except OSError as e:
            log.warning("region %d: cannot read the client's mappings (%s); assuming it is alive", region.id, e)
            return False
        if vmas is None or not clientmaps.any_registered(vmas, region.addr, region.addr, region.addr + region.size):
            return True
        region.alive_at = now
        return False

    def _ioctl_failed(self, region: Region, ret: int, what: str) -> bool:
        """True (and the region is closed) when an ioctl says the client is gone;
        for call sites where a later retry needs nothing special."""
        return self._ioctl_result(region, ret, what) == GONE_

    def _unprotect_later(self, region: Region, first: int, n: int) -> None:
        """Un-protect a run whose un-protect got AGAIN: writers are parked on
        it and must be let through (invariant 4: the write is never lost)."""
        def retry() -> None:
            if region.closing:
                return
            # Only pages still RESIDENT: an unmapped (forgotten) page is EMPTY,
            # and an ioctl on it would fail for ever.
            still = first + np.flatnonzero(region.table.state[first:first + n] == pt.RESIDENT)
            # (A fork may have come between: _unprotect_runs copies first.)
            self._unprotect_runs(region, still)
        self._after(0.001, retry)

    def _unprotect_runs(self, region: Region, pages: np.ndarray) -> None:
        """Let writes through on `pages` (sorted, RESIDENT, parked writers
        woken): children of a fork still reading them from here get their
        copies first (fork.py); a run whose un-protect gets AGAIN is retried
        later (invariant 4: the write is never lost)."""
        self.fork.before_write(region, pages)
        for first, k in pt.runs(pages, max(1, len(pages))):
            ret = uffd.writeprotect(region.uffd, region.addr + (first << SHIFT), k << SHIFT,
                                    protect=False, wake=True)
            outcome = self._ioctl_result(region, ret, "UFFDIO_WRITEPROTECT")
            if outcome == AGAIN:
                self._unprotect_later(region, first, k)
            elif outcome == GONE_:
                return

    # ------------------------------------------------------------------ faults

    def on_events(self, region: Region, events: list) -> None:
        for kind, flags, addr, end in events:
            if region.closing:
                return
            if kind == uffd.EVENT_PAGEFAULT:
                page = (addr - region.addr) >> SHIFT
                if not 0 <= page < region.npages:
                    uffd.wake(region.uffd, addr & ~(PAGE - 1), PAGE)
                    continue
                self.stats["faults"] += 1
                if flags & uffd.PF_WP:
                    self.fault_wp(region, page)
                elif flags & uffd.PF_MINOR:
                    self.fault_minor(region, page)
                else:
                    self.fault_missing(region, page, bool(flags & uffd.PF_WRITE))
            elif kind == uffd.EVENT_UNMAP:
                self._on_unmap(region, addr, end)
            # EVENT_REMOVE is never delivered: the daemon does not ask for
            # UFFD_FEATURE_EVENT_REMOVE. It would not mean "forget" anyway:
            # the kernel sends it for MADV_DONTNEED too, which on a shared
            # mapping leaves the data in the memfd (README "Known limits"
            # covers MADV_REMOVE).

    def _on_unmap(self, region: Region, addr: int, end: int) -> None:
        """The client unmapped [addr, end) (munmap, mremap shrink or move).
        The whole region unmapped closes it; part of it forgets only those
        pages."""
        lo, hi = max(addr, region.addr), min(end, region.addr + region.size)
        if lo >= hi:
            return
        if lo == region.addr and hi == region.addr + region.size:
            self.close_region(region, "unmapped by client")
            return
        self.forget_range(region, (lo - region.addr) >> SHIFT, (hi - lo + PAGE - 1) >> SHIFT)

    def fault_missing(self, region: Region, page: int, write: bool, force: bool = False) -> None:
        table = region.table
        state = table.state[page]
        if state == pt.EMPTY:
            if not self._charge(1, force):
                self.budget_waiters.append((region.id, page, write))
                return
            self._fill_zero(region, page, write)
        elif state == pt.SWAPPED:
            if not self._charge(1, force):
                self.budget_waiters.append((region.id, page, write))
                return
            # Refault distance (as in Linux's workingset detection): a page that
            # comes back within a budget's worth of faults after its eviction
            # belongs to the working set; it returns active (see victims.py).
            if (self.tick - int(table.stamp[page])) & 0xFFFFFFFF <= self.max_pages:
                table.flags[page] |= pt.F_ACTIVE
                self.stats["activations"] += 1
            self._start_load(region, page, write)
        elif state == pt.LOADING:
            pass  # the read in flight ends with a COPY, which wakes this fault too
        elif state == pt.PUNCHING:
            # Punched, its completion not applied yet: _punch_done wakes it and
            # the retry is served from the slot (or zeros). The punch's
            # completion depends on no fault, so parking cannot deadlock.
            table.flags[page] |= pt.F_WAITERS
        elif state == pt.AT_PARENT:
            # A forked child's page still held by its parent (fork.py).
            if not self._charge(1, force):
                self.budget_waiters.append((region.id, page, write))
                return
            self.fork.fault_at_parent(region, page)
        else:
            uffd.wake(region.uffd, region.addr + (page << SHIFT), PAGE)

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
        if page == ra.fill_expect:
            ra.fill_window = min(ra.fill_window * 2, self.ra_max_pages)
            # The window's EMPTY pages from `page` on, as far as the budget
            # allows (vectorised: a per-page loop here was 12% of the engine's
            # time on a first-touch stream, py-spy).
            end = min(region.npages, page + ra.fill_window)
            n += self._charge_leading(table.state[page + 1:end] == pt.EMPTY)
        else:
            ra.fill_window = 1
        mode = 0 if write else uffd.COPY_MODE_WP
        mapped, dirty, err = self._map_zeros(region, page, n, mode)
        dirty |= write
        # A COPY that stopped part way (ENOMEM from the client's memory
        # cgroup, a page that vanished...) did map the pages before it: they
        # are RESIDENT and charged, clean zeros write-protected or dirty as
        # mapped -- left EMPTY, a write-protected one would send every write
        # to it round fault_wp for ever. The rest go back to EMPTY,
        # uncharged, and threads faulting on them are woken to fault again.
        seg = slice(page, page + mapped)
        table.state[seg] = pt.RESIDENT
        table.flags[seg] = np.where(dirty[:mapped], pt.F_DIRTY, 0)
        table.stamp[seg] = self._tick(mapped) if mapped else self.tick
        self.charged -= n - mapped
        ra.fill_expect = page + n if mapped == n else -1
        if mapped == n:
            return
        if self._ioctl_result(region, err, "UFFDIO_COPY") == GONE_:
            return
        # Let the threads fault again (for the first unmapped page, once the
        # pending event is read if the error was EAGAIN).
        uffd.wake(region.uffd, region.addr + ((page + mapped) << SHIFT), (n - mapped) << SHIFT)

    def _map_zeros(self, region: Region, page: int, n: int, mode: int) -> tuple[int, np.ndarray, int]:
        """Map n pages of zeros from `page` with one COPY (page by page from
        where it stops). Returns (pages mapped from the front, which of them
        were adopted dirty, -errno where it stopped or 0)."""
        dst = region.addr + (page << SHIFT)
        dirty = np.zeros(n, bool)
        ret = uffd.copy(region.uffd, dst, self.zero_fill.addr, n << SHIFT, mode)
        if ret == n << SHIFT:
            return n, dirty, 0
        mapped = max(ret, 0) >> SHIFT
        while mapped < n:
            at = dst + (mapped << SHIFT)
            ret = uffd.copy(region.uffd, at, self.zero_fill.addr, PAGE, mode)
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
            self._make_dirty(region, page)
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

    def _make_dirty(self, region: Region, page: int) -> None:
        """First write to a clean page: its slot copy goes stale. (Or a write
        to a dirty page write-protected at a fork: children reading it from
        here get their copy first.)"""
        self.fork.before_write_page(region, page)
        table = region.table
        slot = int(table.slot[page])
        if slot >= 0:
            # No write to this slot is in flight: the page is RESIDENT, not WRITEBACK.
            self.slots.free(slot)
            table.slot[page] = pt.NO_SLOT
        table.flags[page] = (table.flags[page] & pt.F_ACTIVE) | pt.F_DIRTY
        table.stamp[page] = self._tick()
        ret = uffd.writeprotect(region.uffd, region.addr + (page << SHIFT), PAGE, protect=False)
        if self._ioctl_result(region, ret, "UFFDIO_WRITEPROTECT") == AGAIN:
            self._unprotect_later(region, page, 1)

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
            if ret in (-errno.EEXIST, -errno.EFAULT) or self._ioctl_result(region, ret, "UFFDIO_CONTINUE") == AGAIN:
                uffd.wake(region.uffd, addr, PAGE)
        elif state in (pt.RESIDENT, pt.WRITEBACK):
            # A dirty page a forked child still reads stays write-protected (fork.py).
            dirty = (state == pt.RESIDENT and table.flags[page] & pt.F_DIRTY
                     and not self.fork.is_shared(region, page))
            ret = uffd.cont(region.uffd, addr, PAGE, 0 if dirty else uffd.CONTINUE_MODE_WP)
            if ret == -errno.EFAULT and state == pt.RESIDENT and not self._page_in_memfd(region, page):
                self._vanished(region, page)
            elif ret == -errno.EEXIST or self._ioctl_result(region, ret, "UFFDIO_CONTINUE") == AGAIN:
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
            self.clientlog.warning("region %d page %d appeared in memory while swapped; the slot copy wins",
                                   region.id, page)
            self.stats["stray_pages_punched"] += 1
            # Charged while it is punched (it holds memory): _punch_done
            # uncharges it, makes it SWAPPED again and wakes the thread.
            self._charge(1, force=True)
            table.flags[page] |= pt.F_WAITERS
            self._punch(region, np.array([page]), evicted=False)
            return
        self.clientlog.warning("region %d page %d appeared in memory while empty; adopting it as dirty",
                               region.id, page)
        self.stats["stray_pages_adopted"] += 1
        self._charge(1, force=True)
        table.state[page] = pt.RESIDENT
        table.flags[page] = pt.F_DIRTY
        table.stamp[page] = self._tick()
        # Mapped writable (dirty): CONTINUE if it is not mapped in the client,
        # else just un-protect it (a write-protect fault brought us here).
        ret = uffd.cont(region.uffd, addr, PAGE, 0)
        if ret == -errno.EEXIST:
            ret = uffd.writeprotect(region.uffd, addr, PAGE, protect=False)
        if ret == -errno.EFAULT and not self._page_in_memfd(region, page):
            self._vanished(region, page)  # punched again meanwhile (by the client)
        elif self._ioctl_result(region, ret, "UFFDIO_CONTINUE") == AGAIN:
            uffd.wake(region.uffd, addr, PAGE)

    def _vanished(self, region: Region, page: int) -> None:
        """A RESIDENT page is no longer in the memfd: only the client can do
        that (MADV_REMOVE or fallocate on its region, which README forbids).
        A clean page still has its slot copy and becomes SWAPPED; a dirty one
        is lost and reads as zeros (EMPTY). The thread faults again."""
        table = region.table
        has_slot = table.slot[page] >= 0 and not table.flags[page] & pt.F_DIRTY
        self.clientlog.warning("region %d page %d was removed from memory by the client%s", region.id, page,
                    "" if has_slot else "; its unsaved content is lost")
        if not has_slot and table.slot[page] >= 0:
            self.slots.free(int(table.slot[page]))
            table.slot[page] = pt.NO_SLOT
        table.state[page] = pt.SWAPPED if has_slot else pt.EMPTY
        table.flags[page] = 0
        self.charged -= 1
        uffd.wake(region.uffd, region.addr + (page << SHIFT), PAGE)

    # ------------------------------------------------------------------ budget

    def _tick(self, pages: int = 1) -> int:
        """Advance the clock by the pages just brought in: stamps and refault
        distances are measured in pages, as the kernel's workingset code does."""
        self.tick = (self.tick + pages) & 0xFFFFFFFF
        return self.tick

    def _charge(self, n: int, force: bool = False) -> bool:
        if force or self.draining or self.charged + n <= self.max_pages:
            self.charged += n
            return True
        return False

    def _charge_leading(self, ok: np.ndarray) -> int:
        """Charge the pages of the leading True run of `ok` (the pages after
        one already charged), as far as the budget allows: _charge's rule for
        a window at once. Returns how many were charged."""
        room = len(ok) if self.draining else max(0, self.max_pages - self.charged)
        stop = np.flatnonzero(~ok[:room])
        n = int(stop[0]) if len(stop) else min(len(ok), room)
        self.charged += n
        return n

    def serve_budget_waiters(self) -> None:
        while self.budget_waiters:
            rid, page, write = self.budget_waiters[0]
            region = self.regions.get(rid)
            if region is None or region.closing:
                self.budget_waiters.popleft()
                continue
            over = self.charged + 1 > self.max_pages and not self.draining
            if over and not self._must_overcommit():
                return
            self.budget_waiters.popleft()
            if over:
                self.stats["overcommit_pages"] += 1
            self.fault_missing(region, page, write, force=over)

    def _must_overcommit(self) -> bool:
        """Reclaim cannot make room: nothing is being written or read that
        would free or settle memory, and nothing clean is left to drop. This is
        the store-unavailable case (full, or failing writes in backoff): pages
        stay resident over budget rather than stall the client forever."""
        return (self.writes_inflight == 0 and self.loads_inflight == 0 and not self.load_queue
                and self.shared.inflight == 0 and not self._punch_will_free())

    def _punch_will_free(self) -> bool:
        """A punch submitted less than PUNCH_PATIENCE ago is about to free
        memory. An older one may be waiting for a client's memfd inode lock,
        held by a thread whose fault may be this very budget waiter: counting
        it for ever could deadlock, so past that time the waiter overcommits.
        Arms one timer so the loop looks again when the patience runs out."""
        now = time.monotonic()
        young = [t for t in self.punch_jobs.values() if now - t < PUNCH_PATIENCE]
        if young and not self.punch_wake_armed:
            self.punch_wake_armed = True

            def disarm() -> None:
                self.punch_wake_armed = False

            self._after(min(young) + PUNCH_PATIENCE - now, disarm)
        return bool(young)

    # ------------------------------------------------------------------ swap-in

    def _start_load(self, region: Region, page: int, write: bool = False) -> None:
        """Read a swapped page back with its neighbours in adjacent slots,
        budget permitting. The faulting page is already charged.

        Read-ahead: a fault away from the last window reads the aligned
        `readahead` window around the page (like kernel swap's cluster). A fault
        exactly where the last window ended is a sequential stream: the window
        doubles up to `readahead_max` and the next window is started at once
        (asynchronous read-ahead), so the stream faults once per two windows."""
        table = region.table
        ra = region.ra
        slot = int(table.slot[page])
        # A stream's next fault lands where its windows ended, inside the last
        # window when the budget cut that window short, or a little past its
        # end when pages there were still resident (a window stops at them).
        sequential = (ra.ra_expect > 0
                      and ra.ra_expect - ra.ra_window <= page <= ra.ra_expect + self.ra_pages)
        if sequential:
            ra.ra_window = min(ra.ra_window * 2, self.ra_max_pages)
            first, last = page, self._extend_forward(table, page, slot, page + ra.ra_window)
        elif abs(page - ra.last_fault) > self.ra_pages:
            # No locality with the previous fault: read just this page (random
            # access gains nothing from neighbours and pays for their transfer).
            ra.ra_window = 1
            first = last = page
        else:
            ra.ra_window = self.ra_pages
            lo = page - page % self.ra_pages
            first = page
            while (first > lo and table.state[first - 1] == pt.SWAPPED
                   and table.slot[first - 1] == slot - (page - first + 1)
                   and self._charge(1)):
                first -= 1
            last = self._extend_forward(table, page, slot, lo + self.ra_pages)
        ra.last_fault = page
        # A sequential stream that a write continues is being rewritten: its
        # windows are mapped writable (dirty), not write-protected, so each
        # page does not take a second fault for its first write.
        region.write_stream = write and sequential
        self._queue_load(region, first, last - first + 1, slot - (page - first))
        self.stats["readahead_pages"] += last - first
        ra.ra_expect = last + 1
        if sequential and last + 1 < region.npages and table.state[last + 1] == pt.SWAPPED and self._charge(1):
            nxt = last + 1
            nslot = int(table.slot[nxt])
            end = self._extend_forward(table, nxt, nslot, nxt + ra.ra_window)
            self._queue_load(region, nxt, end - nxt + 1, nslot)
            self.stats["readahead_pages"] += end - nxt + 1
            ra.ra_expect = end + 1
        self._pump_loads()

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
        return page + self._charge_leading(ok)

    def _queue_load(self, region: Region, first: int, n: int, slot: int) -> None:
        region.table.state[first:first + n] = pt.LOADING
        self.load_queue.append((region.id, first, n, slot, time.monotonic()))
        region.inflight += 1

    def _pump_loads(self) -> None:
        while self.load_queue and self.free_buffers:
            rid, first, n, slot, started = self.load_queue.popleft()
            region = self.regions.get(rid)
            if region is None:
                continue
            buf = self.free_buffers.pop()
            self.loads_inflight += 1
            self._submit_read(region, first, n, slot, buf, started)

    def _submit_read(self, region: Region, first: int, n: int, slot: int, buf, started: float) -> None:
        """Queue a swap-in read. The I/O thread reads, verifies each page's
        checksum and maps the pages that pass into the client itself (one
        UFFDIO_COPY per run of them; one for the whole window when every page
        passes), saving the hop back to this thread before the client resumes.
        A page that fails its check is not mapped, and does not hold back the
        rest of its window: _load_done retries it alone. The page state stays
        LOADING until _load_done runs here; faults meanwhile park (see
        fault_wp). The uffd stays open meanwhile: region.release() waits for
        region.inflight to drop to 0."""
        store = self.store
        sums = np.zeros(n, np.uint32)
        expected = region.table.sum[first:first + n].copy()
        uffd_fd = region.uffd
        dst = region.addr + (first << SHIFT)
        # Swap cache: mapped write-protected so the pages stay clean copies of
        # their slots; during drain they come home for good, writable, and so
        # do the windows of a stream being rewritten (_start_load). _load_done
        # goes by the mode used: writable pages are dirty, their slots freed.
        mode = 0 if self.draining or region.write_stream else uffd.COPY_MODE_WP

        def on_done(res, err):
            self._load_done(region, first, n, slot, buf, started, res, err)

        if self.cpool is not None and self.cpool.read_copy(buf.addr, n * PAGE, slot * PAGE, uffd_fd, dst,
                                                           mode, expected, sums, on_done):
            return

        def work():
            store.read(buf.addr, n * PAGE, slot * PAGE)
            ret = uffd.verify_and_copy(buf.addr, n, expected, sums, uffd_fd, dst, mode)
            if ret == -errno.EBADMSG:
                # A page failed its check and nothing was mapped: map the
                # pages that passed (invariant 6 holds page by page).
                ret = self._map_passing(uffd_fd, dst, buf.addr, sums == expected, mode)
            elif ret == -errno.EEXIST or 0 <= ret < n * PAGE:
                ret = _copy_pagewise(uffd_fd, dst, buf.addr, n, mode, start=ret)
            return sums, ret, mode

        self.io.submit(work, on_done)

    @staticmethod
    def _map_passing(uffd_fd: int, dst: int, src: int, passed: np.ndarray, mode: int) -> int:
        """Map the runs of a window's pages that passed their check, one COPY
        per run (page by page where a page is present already), and nothing
        of the others. Runs on an I/O thread. Bytes mapped, or -errno."""
        mapped = 0
        for a, k in pt.runs(np.flatnonzero(passed), len(passed)):
            ret = uffd.copy(uffd_fd, dst + a * PAGE, src + a * PAGE, k * PAGE, mode)
            if ret == -errno.EEXIST or 0 <= ret < k * PAGE:
                ret = _copy_pagewise(uffd_fd, dst + a * PAGE, src + a * PAGE, k, mode, start=ret)
            if ret < 0:
                return ret
            mapped += ret
        return mapped

    def _load_done(self, region: Region, first: int, n: int, slot: int, buf, started: float,
                   result: tuple | None, err: OSError | None) -> None:
        self.loads_inflight -= 1
        table = region.table
        if region.closing:
            self.charged -= n
            self._finish_load(region, buf)
            return
        if (table.flags[first:first + n] & pt.F_DISCARD).any():
            self._settle_discarded_load(region, first, n, result[2] if result else uffd.COPY_MODE_WP)
            self._finish_load(region, buf)
            return
        bad = np.zeros(0, np.intp)
        if err is None:
            sums, ret, mode = result
            # Invariant 6, page by page: the I/O thread mapped only the pages
            # whose checksum matched. The others stay LOADING and are read
            # again one by one, so a damaged slot costs its own page only.
            bad = np.flatnonzero(sums != table.sum[first:first + n])
            if len(bad):
                self._retry_bad_pages(region, first, n, slot, bad, started)
                if len(bad) == n:
                    self._finish_load(region, buf)
                    return
                if region.closing:  # a poison found the client gone
                    self.charged -= n - len(bad)
                    self._finish_load(region, buf)
                    return
        if err is not None:
            # Invariant 6: a failed read is retried; nothing is mapped from it.
            self.stats["read_errors"] += 1
            self.errlog.error("read error on swap store (offset %d, %d pages): %s", slot * PAGE, n, err)
            region.read_failures += 1
            elapsed = time.monotonic() - started
            if self.cfg.read_failure == "sigbus" and elapsed > self.cfg.read_deadline:
                self._poison(region, first, n)
                self._finish_load(region, buf)
                return
            self._reload_later(region, first, n, slot, buf, started, self._read_retry_delay(region))
            return
        if not len(bad):
            region.read_failures = 0
        good = np.setdiff1d(np.arange(n), bad) if len(bad) else None
        outcome = self._ioctl_result(region, ret, "UFFDIO_COPY")
        if outcome == GONE_:
            self.charged -= n - len(bad)  # close_region did not count LOADING pages
            self._finish_load(region, buf)
            return
        if outcome == AGAIN:
            # Map it again shortly (pages a partial copy mapped give EEXIST and are kept).
            if good is None:
                self._reload_later(region, first, n, slot, buf, started, 0.001)
            else:
                self._reload_runs(region, first, slot, good, started, 0.001, n)
                self._finish_load(region, buf)
            return
        seg = slice(first, first + n) if good is None else first + good
        waiters = (table.flags[seg] & pt.F_WAITERS) != 0
        table.state[seg] = pt.RESIDENT
        table.flags[seg] = (table.flags[seg] & pt.F_ACTIVE) | (0 if mode & uffd.COPY_MODE_WP else pt.F_DIRTY)
        table.stamp[seg] = self._tick(n - len(bad))
        self.stats["swapins"] += n - len(bad)
        if not mode & uffd.COPY_MODE_WP:
            # Drain, or a stream being rewritten: the pages are writable and
            # dirty; their slot copies are released.
            self.slots.free_many(table.slot[seg].copy())
            table.slot[seg] = pt.NO_SLOT
        pages = np.arange(first, first + n) if good is None else first + good
        for i in np.flatnonzero(waiters):
            # A write faulted between the COPY and now: it is the page's first
            # write, or (loaded writable, then write-protected by a fork) a
            # write to let through; _make_dirty does both.
            self._make_dirty(region, int(pages[i]))
        self._finish_load(region, buf)

    def _read_retry_delay(self, region: Region) -> float:
        return min(self.cfg.read_retry_max, self.cfg.read_retry_min * (2 ** min(region.read_failures, 16)))

    def _retry_bad_pages(self, region: Region, first: int, n: int, slot: int, bad: np.ndarray,
                         started: float) -> None:
        """Pages `bad` (indices into the window first..first+n, in slots
        slot..) failed their checksum and were not mapped: each is read again
        on its own after a backoff, or past read_deadline (read_failure:
        sigbus) poisoned -- the damaged pages only, never their window."""
        self.stats["read_errors"] += len(bad)
        offsets = ", ".join(str((slot + int(i)) * PAGE) for i in bad[:8]) + (", ..." if len(bad) > 8 else "")
        self.errlog.error("read error on swap store (offset %d, %d pages): checksum mismatch in %d page(s) "
                          "at store offset(s) %s; retrying those pages alone",
                          slot * PAGE, n, len(bad), offsets)
        region.read_failures += 1
        if self.cfg.read_failure == "sigbus" and time.monotonic() - started > self.cfg.read_deadline:
            for a, k in pt.runs(first + bad, n):
                self._poison(region, a, k)
            return
        self._reload_runs(region, first, slot, bad, started, self._read_retry_delay(region), 1)

    def _reload_runs(self, region: Region, first: int, slot: int, idx: np.ndarray, started: float,
                     delay: float, max_len: int) -> None:
        """Read pages first + idx (LOADING, charged; slots slot + idx) again
        after `delay`, as loads of up to max_len adjacent pages, apart from
        the window they came in."""
        for a, k in pt.runs(np.asarray(idx), max_len):
            region.inflight += 1  # handed to _reload_later, which counts it out until the retry
            self._reload_later(region, first + a, k, slot + a, None, started, delay)

    def _reload_later(self, region: Region, first: int, n: int, slot: int, buf, started: float,
                      delay: float) -> None:
        """Read a LOADING run again after `delay`. Its buffer goes back now; the
        region's in-flight count drops until the retry is queued, so a region
        closed meanwhile is released (and the run uncharged) instead."""
        if buf is not None:  # None: a load the fast path started
            self.free_buffers.append(buf)
        region.inflight -= 1

        def retry() -> None:
            if region.closing:
                self.charged -= n
                self._maybe_release(region)
                return
            if (region.table.flags[first:first + n] & pt.F_DISCARD).any():
                # Unmapped meanwhile: mapping it again would fail for ever.
                self._settle_discarded_load(region, first, n, uffd.COPY_MODE_WP)
                return
            region.inflight += 1
            self.load_queue.append((region.id, first, n, slot, started))
            self._pump_loads()
        self._after(delay, retry)

    def _settle_discarded_load(self, region: Region, first: int, n: int, mode: int) -> None:
        """A LOADING run (its I/O over) with pages the client unmapped
        meanwhile (F_DISCARD): those are forgotten; the others are settled
        by what the memfd holds, whatever the read or COPY did -- present
        means the COPY mapped it (RESIDENT, clean if mapped write-protected),
        absent means it was not (SWAPPED again, uncharged; its threads are
        woken to fault again)."""
        table = region.table
        seg = slice(first, first + n)
        discard = (table.flags[seg] & pt.F_DISCARD) != 0
        present = (np.frombuffer(uffd.resident(region.daddr + (first << SHIFT), n << SHIFT), np.uint8) & 1) != 0
        table.state[seg] = np.where(discard | present, pt.RESIDENT, pt.SWAPPED)
        self._forget(region, first + np.flatnonzero(discard))
        back = first + np.flatnonzero(~discard & ~present)
        self.charged -= len(back)
        table.flags[back] &= pt.F_ACTIVE
        for run_first, k in pt.runs(back, n):
            uffd.wake(region.uffd, region.addr + (run_first << SHIFT), k << SHIFT)
        mapped = first + np.flatnonzero(~discard & present)
        if len(mapped) == 0:
            return
        waiters = (table.flags[mapped] & pt.F_WAITERS) != 0
        table.flags[mapped] &= pt.F_ACTIVE
        table.stamp[mapped] = self._tick(len(mapped))
        self.stats["swapins"] += len(mapped)
        if not mode & uffd.COPY_MODE_WP:
            table.flags[mapped] |= pt.F_DIRTY
            self.slots.free_many(table.slot[mapped].copy())
            table.slot[mapped] = pt.NO_SLOT
        for page in mapped[waiters].tolist():
            if table.flags[page] & pt.F_DIRTY == 0:
                self._make_dirty(region, page)

    def _finish_load(self, region: Region, buf) -> None:
        if buf is not None:  # None: a load the fast path started
            self.free_buffers.append(buf)
        region.inflight -= 1
        self._maybe_release(region)
        self._pump_loads()

    def _poison(self, region: Region, first: int, n: int) -> None:
        """read_failure: sigbus — after read_deadline the client gets SIGBUS on
        these pages rather than zeros (invariant 6). The pages are a run in
        adjacent slots (a load's), named by store offset in the log line,
        which is rate-limited like every store error line."""
        self.poisonlog.error("region %d pages %d..%d (store offset %d, %d pages) unreadable past the %gs "
                          "deadline: poisoning (SIGBUS)", region.id, first, first + n - 1,
                          int(region.table.slot[first]) * PAGE, n, self.cfg.read_deadline)
        addr = region.addr + (first << SHIFT)
        # An evicted page's PTE is not empty: it holds the uffd-wp marker left
        # by write-protect-then-punch (_start_writeback, _drop), and
        # UFFDIO_POISON refuses any non-empty PTE with EEXIST -- installing no
        # poison and waking nobody, so the faulting threads slept for ever.
        # Clear the markers first (nothing is mapped there; no wake-up yet).
        uffd.writeprotect(region.uffd, addr, n * PAGE, protect=False, wake=False)
        self._ioctl_failed(region, uffd.poison(region.uffd, addr, n * PAGE), "UFFDIO_POISON")
        table = region.table
        self.slots.free_many(table.slot[first:first + n].copy())
        table.slot[first:first + n] = pt.NO_SLOT
        table.state[first:first + n] = pt.POISONED
        self.charged -= n
        self.stats["poisoned_pages"] += n

    # ------------------------------------------------------------------ reclaim

    def reclaim(self) -> bool:
        """Keep charged pages under the budget: past the high watermark (or when
        a fault waits for room) evict down to the low watermark, at most
        RECLAIM_STEP pages per call so faults are served in between. Returns
        True when a step made progress and more is due at once."""
        if self.draining:
            return False
        if self.reclaiming and self.charged <= self.low_pages and not self.budget_waiters:
            self.reclaiming = False
        if not self.reclaiming:
            if self.charged <= self.high_pages and not self.budget_waiters:
                return False
            self.reclaiming = True
        want = self.charged - self.low_pages - self.evicting - self.punching + len(self.budget_waiters)
        if want <= 0:
            return False
        step = min(want, RECLAIM_STEP)
        progress = 0
        can_write = time.monotonic() >= self.write_retry_at
        for region, pages in self.victims.take(self.regions.values(), step, self.tick, clean_only=not can_write):
            table = region.table
            clean = pages[(table.flags[pages] & pt.F_DIRTY) == 0]
            dirty = pages[(table.flags[pages] & pt.F_DIRTY) != 0]
            if len(clean):
                self._drop(region, clean)
                progress += len(clean)
            if len(dirty) and can_write:
                # After a failure, probe with one write at a time until one
                # succeeds, instead of burning a round of slots on a dead store.
                max_writes = 1 if self.write_backoff else self.cfg.max_inflight_writes
                # Runs of adjacent dirty pages go out batch_pages at a time;
                # scattered ones are gathered, gather_pages at a time, into one
                # write to adjacent slots (random writes had cost one 4 KiB
                # write per page).
                for group in self._write_groups(dirty):
                    if self.writes_inflight >= max_writes:
                        break
                    if not self._start_writeback(region, group):
                        can_write = False
                        break
                    progress += len(group)
                    if region.closing:
                        break
        if self.charged - self.evicting - self.punching <= self.low_pages:
            self.reclaiming = False  # the low watermark is reached (or will be, as writes land)
        return progress > 0 and want > progress

    def _lock_key(self, region: Region) -> object:
        """Cheap reads that change when the region owner's mlocked ranges
        do (victims.py): 0 when it has no locked memory (VmLck 0, or
        unknown), else its VmLck with where it maps the region (VMA
        boundaries). VmLck alone is not enough: an mlock of one range and
        an munlock of another of the same size leave it the same, while
        moving VMA boundaries."""
        pid = getattr(region.owner, "pid", None)
        if not pid or region.closing:
            return 0
        kb = clientmaps.locked_kb(pid)
        if not kb:
            return 0
        try:
            inode = clientmaps.inode_of(region.memfd)
        except OSError:
            return kb
        return (kb, clientmaps.memfd_layout(pid, inode))

    def _locked_pages(self, region: Region) -> np.ndarray | None:
        """The region's pages in the client's mlocked VMAs (never evicted:
        see victims.py), from /proc/PID/smaps; None when there are none or
        the mappings cannot be read (a client that is gone)."""
        pid = getattr(region.owner, "pid", None)
        if not pid or region.closing:
            return None
        try:
            vmas = clientmaps.memfd_vmas(pid, clientmaps.inode_of(region.memfd))
        except OSError:
            return None
        return clientmaps.locked_pages(vmas, region.addr, region.npages) if vmas else None

    def _write_groups(self, dirty: np.ndarray) -> list[np.ndarray]:
        """Sorted dirty pages cut into store writes: each a run of up to
        batch_pages adjacent pages, or up to gather_pages scattered ones."""
        groups: list[np.ndarray] = []
        scattered: list[int] = []
        for first, n in pt.runs(dirty, self.batch_pages):
            if n >= self.gather_pages:
                groups.append(np.arange(first, first + n))
                continue
            if len(scattered) + n > self.gather_pages:
                groups.append(np.asarray(scattered))
                scattered = []
            scattered.extend(range(first, first + n))
        if scattered:
            groups.append(np.asarray(scattered))
        return groups

    def _drop(self, region: Region, pages: np.ndarray) -> None:
        """Drop clean resident pages from memory with one punch per run
        (made on an I/O thread: see _punch).

        Invariant 1: only pages that are RESIDENT and clean get here; clean
        means write-protected since the slot copy was taken (or a zero page
        never written), and a write since would have made them dirty."""
        table = region.table
        assert (table.state[pages] == pt.RESIDENT).all() and not (table.flags[pages] & pt.F_DIRTY).any()
        self._punch(region, pages, evicted=True)

    def _punch(self, region: Region, pages: np.ndarray, evicted: bool) -> None:
        """Punch clean pages (sorted) out of the memfd, one job per run on the
        punch threads (Python, their own: see __init__).

        Invariant (punch outside the page lock): fallocate(PUNCH_HOLE) takes
        the memfd's inode lock, which a client write(2)ing its memfd holds
        while its fault on a page of its region waits for us. So the punch is
        never made on the engine thread nor under the page lock: the pages
        become PUNCHING here (still charged, slots kept), which the fast path
        never serves and the engine parks on (fault_missing, fault_wp) or
        maps write-protected (fault_minor); _punch_done applies the result.
        One job per run: a job ends with its one punch, so a fault parked on
        a punched page never waits behind a later punch that may need a lock
        its own thread holds."""
        region.table.state[pages] = pt.PUNCHING
        self.punching += len(pages)
        stamp = self.tick  # eviction time, for the refault distance
        memfd = region.memfd
        for first, n in pt.runs(pages, 1 << 30):
            self.punch_seq += 1
            job = self.punch_seq
            self.punch_jobs[job] = time.monotonic()
            region.inflight += 1  # the memfd stays open until the punch returns (_maybe_release)

            def work(first=first, n=n):
                native.punch_hole(memfd, first << SHIFT, n << SHIFT)

            def on_done(result, err, first=first, n=n, job=job):
                self._punch_done(region, first, n, job, stamp, evicted, err)

            self.punch_io.submit(work, on_done)

    def _punch_done(self, region: Region, first: int, n: int, job: int, stamp: int,
                    evicted: bool, err: OSError | None) -> None:
        """A punch returned: its PUNCHING pages become SWAPPED (slot) or EMPTY,
        uncharged, and the faults parked on them retry."""
        del self.punch_jobs[job]
        region.inflight -= 1
        self.punching -= n
        self.charged -= n
        table = region.table
        seg = slice(first, first + n)
        if err is not None and not region.closing:
            table.state[seg] = pt.EMPTY  # uncharged above; close_region must not count them
            self.close_region(region, f"punch hole failed: {err}")
        if region.closing:
            # close_region freed their slots (no write to them is in flight).
            table.state[seg] = pt.EMPTY
            table.slot[seg] = pt.NO_SLOT
            self._maybe_release(region)
            return
        # Unmapped by the client while being punched (forget_range): their
        # slots go too, and they read as zeros if the range is mapped again.
        discard = first + np.flatnonzero(table.flags[seg] & pt.F_DISCARD)
        if len(discard):
            self.slots.free_many(table.slot[discard].copy())
            table.slot[discard] = pt.NO_SLOT
            if evicted:  # unmapped while an eviction punched them (a forget's own punch counted them)
                self.stats["forgotten_pages"] += len(discard)
        has_slot = table.slot[seg] >= 0
        parked = (table.flags[seg] & pt.F_WAITERS) != 0
        table.state[seg] = np.where(has_slot, pt.SWAPPED, pt.EMPTY)
        table.flags[seg] = 0
        if evicted:
            table.stamp[seg] = stamp
            self.stats["swapouts"] += int(np.count_nonzero(has_slot))
            self.stats["zero_drops"] += int(n - np.count_nonzero(has_slot) - len(discard))
        # Parked faults retry: a write refaults MISSING and is served from the
        # slot, current by invariant 1 (the page was write-protected and clean).
        for i, k in pt.runs(np.flatnonzero(parked), n):
            uffd.wake(region.uffd, region.addr + ((first + i) << SHIFT), k << SHIFT)

    def _start_writeback(self, region: Region, pages: np.ndarray) -> bool:
        """Write dirty pages (sorted; a run, or scattered) to adjacent slots
        and drop them when the write returns. Returns False when the store is full."""
        done = 0
        n = len(pages)
        while done < n:
            got = self.slots.alloc(n - done)
            if got is None:
                if not self.store_full:  # log the change of state, not every attempt
                    self.errlog.error("swap store %s is full: pages stay resident until slots free up",
                                      self.store.url)
                self.store_full = True
                return False
            slot, count = got
            self.store_full = False
            part = pages[done:done + count]
            contiguous = int(part[-1]) - int(part[0]) == count - 1
            if not contiguous and not self.write_buffers:
                self.slots.free(slot, count)  # no gather buffer free: wait for a write to return
                return True
            # Invariant 1 (first half): write-protect BEFORE the copy is read,
            # so any write after this point faults and parks (invariant 4).
            # (Should a later run's ioctl fail, the runs already protected
            # stay dirty and un-protect on their next write fault.)
            for first, k in pt.runs(part, count):
                ret = uffd.writeprotect(region.uffd, region.addr + (first << SHIFT), k << SHIFT,
                                        protect=True, wake=False)
                if self._ioctl_result(region, ret, "UFFDIO_WRITEPROTECT") != OK:
                    self.slots.free(slot, count)  # nothing was queued: the pages stay dirty, tried later
                    return True
            # Invariant 2: the writeback bit is set here, on the engine thread
            # (the page lock), before the write is queued; only _write_done
            # clears it, when the write has returned.
            table = region.table
            table.state[part] = pt.WRITEBACK
            table.flags[part] = pt.F_EVICT
            table.slot[part] = np.arange(slot, slot + count, dtype=np.int32)
            self.evicting += count
            self.writes_inflight += 1
            region.inflight += 1
            self._submit_write(region, part, slot, None if contiguous else self.write_buffers.pop())
            done += count
        return True

    def _submit_write(self, region: Region, pages: np.ndarray, slot: int, gather_buf) -> None:
        """Queue the store write of `pages` to slots slot.. : straight from the
        daemon's mapping for a run, or gathered into gather_buf first."""
        store = self.store
        n = len(pages)
        # Each page's checksum, and whether it is all zeros (an exact test
        # made in the same pass: a page whose checksum merely equals the zero
        # page's is data, and must keep its slot).
        sums = np.zeros(n, np.uint32)
        zero = np.zeros(n, np.uint8)
        gather = None
        if gather_buf is None:
            src = region.daddr + (int(pages[0]) << SHIFT)
        else:
            src = gather_buf.addr
            gather = (region.daddr + (pages.astype(np.uint64) << np.uint64(SHIFT))).astype(np.uint64)

        def on_done(res, err):
            if gather_buf is not None:
                self.write_buffers.append(gather_buf)
            self._write_done(region, pages, slot, res, err)

        if self.cpool is not None and self.cpool.sum_write(src, n * PAGE, slot * PAGE, sums, zero, on_done, gather):
            return

        def work():
            # The pages are write-protected in the client and the daemon never
            # writes them, so the checksum and the write see the same bytes.
            if gather is not None:
                for i, addr in enumerate(gather.tolist()):
                    native.ffi.memmove(native.ffi.cast("char *", src + i * PAGE),
                                       native.ffi.cast("char *", addr), PAGE)
            native.page_sums_into(src, n, native.ffi.cast("uint32_t *", sums.ctypes.data),
                                  native.ffi.cast("uint8_t *", zero.ctypes.data))
            store.write(src, n * PAGE, slot * PAGE)
            return sums, zero

        self.io.submit(work, on_done)

    def _write_done(self, region: Region, pages: np.ndarray, slot: int,
                    result: tuple | None, err: OSError | None) -> None:
        self.writes_inflight -= 1
        region.inflight -= 1
        table = region.table
        seg = pages
        n = len(pages)
        if region.closing:
            # Invariant 7: a closed region's slots are freed only now that the
            # write returned (and, for a failed write that may land late, after quarantine).
            if err is None:
                self.slots.free(slot, n)
            else:
                self._release_failed_slots(slot, n, err)
            table.slot[seg] = pt.NO_SLOT
            table.state[seg] = pt.EMPTY
            self._maybe_release(region)
            return
        self.evicting -= n
        discard = (table.flags[pages] & pt.F_DISCARD) != 0
        if discard.any():
            # Unmapped by the client while being written: now that the write
            # has returned (invariant 3) these pages are forgotten. A failed
            # write's slots are released as a run below.
            gone = pages[discard]
            if err is not None:
                table.slot[gone] = pt.NO_SLOT
            table.state[gone] = pt.RESIDENT
            self._forget(region, gone)
            if region.closing:
                return
            if err is None:
                sums, all_zero = result
                result = (sums[~discard], all_zero[~discard])
            pages = seg = pages[~discard]
        waiters = (table.flags[seg] & pt.F_WAITERS) != 0
        if err is not None:
            # Invariant 5: a failed write leaves the pages resident, dirty and
            # writable, with no error state; they are retried after a backoff.
            self.stats["write_errors"] += 1
            self.errlog.error("write error on swap store (offset %d, %d pages): %s", slot * PAGE, n, err)
            self._release_failed_slots(slot, n, err)
            n = len(pages)
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                self.store_no_space = True  # the server's disk is full (a sparse file on NFS)
            table.slot[seg] = pt.NO_SLOT
            table.state[seg] = pt.RESIDENT
            table.flags[seg] = pt.F_DIRTY
            self._unprotect_runs(region, pages)
            self.write_backoff = min(self.cfg.write_retry_max, max(self.cfg.write_retry_min, self.write_backoff * 2))
            self.write_retry_at = time.monotonic() + self.write_backoff
            self._after(self.write_backoff, lambda: None)  # wake the loop to retry reclaim
            return
        self.write_backoff = 0.0
        self.store_no_space = False
        self.last_write_ok = time.monotonic()
        self.stats["pages_written"] += len(pages)
        sums, all_zero = result
        table.sum[seg] = sums
        # The writeback bit is cleared: the pages are clean copies of their slots.
        table.state[seg] = pt.RESIDENT
        table.flags[seg] = 0
        for i in np.flatnonzero(waiters):
            # A write was parked during writeback: let it through now.
            self._make_dirty(region, int(pages[i]))
            if region.closing:
                return
        drop = pages[~waiters]
        zero = drop[all_zero[~waiters] != 0]
        if len(zero):
            # All-zero pages need no slot: they drop to EMPTY and read back as zeros.
            self.slots.free_many(table.slot[zero].copy())
            table.slot[zero] = pt.NO_SLOT
        # Forked children reading these pages from here now share their slots.
        self.fork.parent_clean(region, drop)
        if len(drop):
            # Invariant 1 (second half): these pages were write-protected before
            # the copy was read and no write reached them (it would have parked
            # as F_WAITERS), so the copy on the store is current: drop them.
            self._drop(region, drop)

    def _release_failed_slots(self, slot: int, n: int, err: OSError) -> None:
        """Invariant 3 after a failed write: the call has returned, but on a
        store where a failed write may still be executed later (NFS: a request
        that timed out or lost its connection can sit in the server's queue,
        and a soft mount's EIO says as little), its slots must not take new
        data that the late write could overwrite. The store decides from the
        error (Store.write_may_land_late): such slots are quarantined; a
        refusal (no space, read-only...) or a store where nothing outlives
        the call frees them at once."""
        if not self.store.write_may_land_late(err):
            self.slots.free(slot, n)
            return
        self.quarantine.append(([time.monotonic(), None], slot, n))
        self.stats["quarantined_slots"] += n

    def _expire_quarantine(self) -> None:
        """A quarantined run's clock starts at the first write the store
        accepted after the failure (a late write cannot be expected before
        the store takes writes again: a server frozen for an hour executes
        its queue when it thaws), and the run is freed slot_quarantine after
        that. The clock start is taken as last_write_ok when first seen here
        (settle runs after every batch of completions), never earlier than
        the success itself. While some run still waits for a success, the
        store is probed."""
        now = time.monotonic()
        keep = []
        waiting = False
        for clock, slot, n in self.quarantine:
            failed_at, since = clock
            if since is None and self.last_write_ok > failed_at:
                clock[1] = since = self.last_write_ok
                self._after(max(0.0, since + self.cfg.slot_quarantine - now), lambda: None)  # wake to free it
            if since is not None and now - since >= self.cfg.slot_quarantine:
                self.slots.free(slot, n)
            else:
                keep.append((clock, slot, n))
                waiting = waiting or since is None
        self.quarantine = keep
        if waiting:
            self._probe_store(now)

    def _probe_store(self, now: float) -> None:
        """No write has succeeded since some quarantined ones failed, and with
        slots scarce none may be attempted: rewrite the header page (slot 0,
        never allocated) to learn when the store takes writes again (its
        success starts the quarantine clock, see _expire_quarantine)."""
        if self.probe_inflight or now < self.probe_at:
            return
        self.probe_inflight = True
        store, buf = self.store, self.probe_buf

        def work():
            store.read(buf.addr, PAGE, 0)
            store.write(buf.addr, PAGE, 0)

        def done(result, err):
            self.probe_inflight = False
            if err is None:
                self.last_write_ok = time.monotonic()
            else:
                self.stats["write_errors"] += 1  # a store write that failed, like any other
                self.probe_at = time.monotonic() + self.cfg.write_retry_max
                self._after(self.cfg.write_retry_max, lambda: None)

        self.io.submit(work, done)

    # ------------------------------------------------------------------ drain

    def start_drain(self) -> None:
        """Swapoff: bring every page home, wait for every write, then release."""
        if self.draining:
            return
        self.draining = True
        self.shared.enabled = 0  # every fault now goes through the engine
        self.fork.resolve_all()  # children's pages come home like the rest
        log.info("draining: bringing every page home")
        for region in list(self.regions.values()):
            self._drain_region(region)

    def _drain_region(self, region: Region) -> None:
        if region.closing:
            return
        table = region.table
        for first, n in pt.runs(np.flatnonzero(table.state == pt.SWAPPED), self.ra_max_pages):
            # Split further where slots are not adjacent.
            slots = table.slot[first:first + n]
            breaks = np.flatnonzero(np.diff(slots) != 1) + 1
            starts = [0] + [int(b) for b in breaks] + [n]
            for a, b in zip(starts, starts[1:]):
                self.charged += b - a
                table.state[first + a:first + b] = pt.LOADING
                region.inflight += 1
                self.load_queue.append((region.id, first + a, b - a, int(slots[a]), time.monotonic()))
        self._pump_loads()

    def drain_done(self) -> bool:
        if not self.draining:
            return False
        if (self.writes_inflight or self.loads_inflight or self.load_queue or self.shared.inflight
                or self.punch_jobs):
            return False  # a punched page comes home once SWAPPED (_punch_done)
        for region in list(self.regions.values()):
            if region.closing:
                if region.inflight:
                    return False
                continue
            if np.count_nonzero(region.table.state == pt.SWAPPED):
                self._drain_region(region)
                return False
            if np.count_nonzero(region.table.state == pt.LOADING):
                # A failed read waits for its retry (_reload_later): counted
                # in no in-flight figure above, but its page is not home yet.
                return False
        return True

    def hand_back_all(self) -> None:
        """After drain: every page is resident. Unprotect and unregister each
        region so the client keeps plain shared memory once we exit."""
        for region in list(self.regions.values()):
            if region.closing:
                continue
            uffd.writeprotect(region.uffd, region.addr, region.size, protect=False, wake=True)
            try:
                uffd.unregister(region.uffd, region.addr, region.size)
            except OSError as e:
                log.warning("region %d: unregister failed: %s", region.id, e)
            self.close_region(region, "drained")

    # ------------------------------------------------------------------ timers & loop glue

    def _after(self, delay: float, fn: Callable[[], None]) -> None:
        self.timer_seq += 1
        heapq.heappush(self.timers, (time.monotonic() + delay, self.timer_seq, fn))

    def run_timers(self) -> float | None:
        """Run due timers; return seconds until the next one (None if none)."""
        now = time.monotonic()
        while self.timers and self.timers[0][0] <= now:
            _, _, fn = heapq.heappop(self.timers)
            fn()
        if self.timers:
            return max(0.0, self.timers[0][0] - time.monotonic())
        return None

    def on_completions(self) -> None:
        done = self.io.completions() + self.punch_io.completions()
        if self.cpool is not None:
            done += self.cpool.completions()
        for on_done, result, error in done:
            on_done(result, error)
        if self.fp is not None:
            self._on_fast_records()
            self.fp.top_up()

    def _on_fast_records(self) -> None:
        """What the fast path's threads passed on, in the order they read it."""
        for (kind, rid, conn, ev, flags, addr, end, page, slot, result, copied, psum,
             started) in self.fp.records():
            region = self.regions.get(rid)
            if kind == fastpath.FP_LOAD_FAILED:
                err = self.fp.read_error(conn, result, slot) if result < 0 else None
                if region is not None and page >= 0:
                    self._fast_load_failed(region, page, slot, err, copied, psum, started)
            elif region is None:
                continue
            elif kind == fastpath.FP_EVENT:
                self.on_events(region, [(ev, flags, addr, end)])
                if ev in (uffd.EVENT_UNMAP, uffd.EVENT_REMOVE):
                    self.fp.unmap_applied(region)  # its pages are forgotten now
            elif kind == fastpath.FP_WAITERS:
                # A write parked on the page while the fast path loaded it:
                # it is the page's first write (as in _load_done), or, on a
                # page loaded writable that a fork write-protected, a write
                # to let through (fork.py).
                if not region.closing and region.table.state[page] == pt.RESIDENT:
                    self._make_dirty(region, page)
            elif kind == fastpath.FP_DIRTIED:
                # Mapped writable for a write fault: the slot copy is stale.
                # Records are taken before reclaim runs (on_completions, then
                # settle, under the lock), so the page still holds that slot.
                table = region.table
                if not region.closing and table.slot[page] == slot:
                    self.slots.free(slot)
                    table.slot[page] = pt.NO_SLOT
            elif kind == fastpath.FP_FORGET:
                # The page was unmapped while the fast path mapped it (F_DISCARD).
                if not region.closing:
                    self.forget_range(region, page, 1)
            elif kind == fastpath.FP_RELEASABLE:
                self._maybe_release(region)
            elif kind == fastpath.FP_READ_ERROR:
                self.close_region(region, f"reading its userfaultfd failed: {uffd.read_error_text(-result)}")

    def _fast_load_failed(self, region: Region, page: int, slot: int, err: OSError | None,
                          copied: int, psum: int, started: float) -> None:
        """A one-page load of the fast path failed (the store read, the
        checksum or the COPY): the page is LOADING and charged, as for a load
        of the engine's own, so _load_done's error handling takes it over."""
        self.fp.take_over(region)
        region.inflight += 1
        self.loads_inflight += 1
        sums = np.array([psum], np.uint32)
        self._load_done(region, page, 1, slot, None, started,
                        None if err else (sums, copied, uffd.COPY_MODE_WP), err)

    def settle(self) -> bool:
        """After any batch of events: reclaim, then admit faults waiting for room.
        Returns True when reclaim has more to do at once (poll, don't sleep)."""
        if self.quarantine:
            self._expire_quarantine()
        more = self.reclaim()
        self.serve_budget_waiters()
        self._pump_loads()
        return more

    # ------------------------------------------------------------------ status

    def is_store_full(self) -> bool:
        """Now, not as of the last allocation: no free slot, or the server's
        disk refused the last write for lack of space."""
        return self.slots.used >= self.slots.capacity or self.store_no_space

    def audit(self) -> dict | None:
        """Recount what the engine tracks incrementally: charged pages and used
        slots, from the page tables. None while a region is closing (its
        in-flight I/O is counted in neither place). Tests assert on this."""
        if any(r.closing for r in self.regions.values()):
            return None
        charged = slots = 0
        # Regions of a fork not yet attached by the child hold slot references
        # and pages copied in for them.
        for region in list(self.regions.values()) + self.fork.pending_regions():
            st = region.table.state
            charged += int(np.count_nonzero((st == pt.RESIDENT) | (st == pt.WRITEBACK) | (st == pt.LOADING)
                                            | (st == pt.PUNCHING)))
            slots += int(np.count_nonzero(region.table.slot >= 0))
        slots += sum(n for _, _, n in self.quarantine)
        # A slot shared by forked children is counted once per page table
        # naming it: the recount is of references (slots.py).
        return {"charged_ok": charged == self.charged, "slots_ok": slots == self.slots.references,
                "charged": self.charged, "charged_recount": charged,
                "slots_used": self.slots.used, "slot_references": self.slots.references,
                "slots_recount": slots}

    def status(self) -> dict:
        swapped = resident = 0
        for region in self.regions.values():
            if region.closing:
                continue
            swapped += region.table.count(pt.SWAPPED) + region.table.count(pt.LOADING)
        resident = self.charged
        return {
            "resident_bytes": resident * PAGE,
            "max_resident_bytes": self.max_pages * PAGE,
            "swapped_bytes": swapped * PAGE,
            "swapouts_total": self.stats["swapouts"],
            "swapins_total": self.stats["swapins"] + self.shared.swapins,
            "pages_written_total": self.stats["pages_written"],
            "faults_total": self.stats["faults"] + self.shared.faults,
            "fast_path_faults_total": self.shared.faults,
            "readahead_pages_total": self.stats["readahead_pages"],
            "zero_drops_total": self.stats["zero_drops"],
            "writeback_inflight": self.writes_inflight,
            "reads_inflight": self.loads_inflight + self.shared.inflight,
            "write_errors_total": self.stats["write_errors"],
            "read_errors_total": self.stats["read_errors"],
            "overcommit_pages_total": self.stats["overcommit_pages"],
            "poisoned_pages_total": self.stats["poisoned_pages"],
            # Pages of ranges the client unmapped (forget_range), and of those
            # the ones forgotten only when their I/O in flight returned.
            "forgotten_pages_total": self.stats["forgotten_pages"],
            "forgotten_after_io_total": self.stats["forgotten_after_io"],
            "budget_waiters": len(self.budget_waiters),
            "write_backoff_s": round(max(0.0, self.write_retry_at - time.monotonic()), 3),
            "store_full": self.is_store_full(),
            "draining": self.draining,
            "metadata_bytes_per_page": 14,
            "audit": self.audit(),
            "fork": self.fork.status(),
            "store": dict(self.store.describe(), used_bytes=self.slots.used * PAGE,
                          full=self.is_store_full(),
                          quarantined_bytes=sum(n for _, _, n in self.quarantine) * PAGE),
        }


def _copy_pagewise(uffd_fd: int, dst: int, src: int, n: int, mode: int, start: int = 0) -> int:
    """Fallback when a run's COPY stopped part way (`start` bytes mapped) or
    met a page already present: copy the rest page by page and keep a
    present page. Returns n pages' bytes, or the -errno of the page that
    failed (the caller maps the run again later; the pages mapped so far
    are then present and kept). Runs on an I/O thread. (A run across a VMA boundary never gets here: uffd.copy
    does those page by page itself.)"""
    for i in range(max(0, start) >> SHIFT, n):
        ret = uffd.copy(uffd_fd, dst + i * PAGE, src + i * PAGE, PAGE, mode)
        if ret == -errno.EEXIST:
            log.warning("page at %#x was present during swap-in; keeping it", dst + i * PAGE)
            uffd.wake(uffd_fd, dst + i * PAGE, PAGE)
        elif ret < 0:
            return ret
    return n * PAGE
