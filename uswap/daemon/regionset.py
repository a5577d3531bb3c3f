"""The regions the engine serves, and what every stage of the engine shares.

Shared by every stage (faults, swapin, punch, writeback, reclaim, drain):
the regions by id, the counters several stages move (`charged` and `tick`
live in the fast path's shared struct; pages in flight, waiters for budget,
queued loads), the daemon-wide `draining` mode, the timers, stats and log
limiters, and what any ioctl's failure means (`ioctl_result`): a client that
is gone closes its region (`close_region`), which any stage may do.

Thread and lock: everything here runs on the engine thread holding the page
lock (docs/design.md section 3); the fast path's C threads read and write
`charged`, `tick` and the page tables only under that lock.
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

from uswap import uffd
from uswap.config import Config
from uswap.daemon import clientmaps
from uswap.daemon import pagetable as pt
from uswap.daemon.latency import Histogram
from uswap.daemon.ratelimit import RateLimitedLog
from uswap.daemon.region import Region
from uswap.daemon.slots import SlotAllocator

# Every stage logs as the engine did before the split: the log lines stay the same.
log = logging.getLogger("uswap.engine")
PAGE = 4096
SHIFT = 12
NO_WRITE = -1  # a queued load's write_page when no write fault is among its pages
# ioctl errors that are what the daemon sees when the client's mapping or
# process is gone -- and also, from a live client, after a VMA split
# (ENOENT), a stale MINOR fault (EFAULT)... So they only prompt a check.
MAYBE_GONE = {errno.ENOENT, errno.ESRCH, errno.EINVAL, errno.EBADF, errno.EFAULT}
OK, GONE_, AGAIN = 0, 1, 2  # outcomes of RegionSet.ioctl_result
# A client found alive is not looked at again for this long: an error
# repeated on every fault costs one smaps read per interval, not per fault.
ALIVE_RECHECK = 0.05


class RegionSet:
    def __init__(self, cfg: Config, slots: SlotAllocator, fp, shared) -> None:
        """`fp`: the fast path (fastpath.FastPath) or None; `shared`: its
        shared counters (or fastpath.plain_shared() without one)."""
        self.slots = slots
        self.fp = fp
        self.shared = shared
        self.by_id: dict[int, Region] = {}
        self.next_region_id = 1
        self.draining = False  # set once by drain.py: every page comes home
        self.handing_over = False  # set once by the server's handover: no new region
        # Pages in flight, moved by the stage named and read by others
        # (budget.py's overcommit test, reclaim, drain, status):
        self.loads_inflight = 0  # swapin.py: reads submitted
        self.writes_inflight = 0  # writeback.py: writes submitted
        self.evicting = 0  # writeback.py: pages in WRITEBACK with F_EVICT
        # Faults waiting for budget: (region id, page, is_write); faults.py
        # parks them, budget.py serves them.
        self.budget_waiters: collections.deque = collections.deque()
        # Swap-in reads not submitted yet (swapin.py, drain.py):
        # (region id, first page, pages, first slot, when first started,
        # write_page: the page of a write fault among them, mapped writable,
        # or NO_WRITE).
        self.load_queue: collections.deque = collections.deque()
        self.timers: list = []
        self.timer_seq = 0
        self.stats = collections.Counter()
        # The engine's own observations (latency.py); the fast path's are in `shared`.
        self.swapin_latency = Histogram()
        self.fault_latency = Histogram()
        self.errlog = RateLimitedLog(log, cfg.error_log_interval, cfg.error_log_burst)
        self.clientlog = RateLimitedLog(log, cfg.error_log_interval, cfg.error_log_burst)  # lines clients cause
        # Called first when a region starts closing: the copy-on-write hook (its
        # children take their copies while the pages are resident). Set by
        # the composition (engine.py): cow.py sits above this module.
        self.before_close: Callable[[Region], None] | None = None
        # Set by the server: stop watching a region's uffd before its fds close.
        self.on_region_closing: Callable[[Region], None] | None = None
        # Where live regions' tables and metadata are kept for a successor
        # (statedir.py); None: nothing outlives the daemon.
        self.statedir = None

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

    def add_region(self, region: Region) -> bool:
        """Take a region on. True when the fast path's threads read its
        uffd; False when the caller (the server's epoll) must."""
        if not region.id:  # an adopted region (adoption.py) keeps the id its client knows
            region.id = self.next_region_id
            self.next_region_id += 1
        if self.statedir is not None:
            # Before the fast path holds pointers to the table: from here its
            # arrays live in the state directory (statedir.py). An OSError
            # here (EMFILE: the table's file takes an fd) leaves the region
            # unknown to the engine, for the caller to refuse.
            fresh = region.table.path is None  # not an adopted region's table
            try:
                self.statedir.record(region, getattr(region.owner, "pid", 0), getattr(region.owner, "uid", 0))
            except OSError:
                if fresh:
                    self.statedir.forget(region)
                raise
        self.by_id[region.id] = region
        return self.fp is not None and self.fp.open(region)

    def close_region(self, region: Region, reason: str) -> None:
        """Stop serving a region. Its slots are freed now for pages with no I/O
        in flight, and by the completion handlers for the rest (invariant 7)."""
        if region.closing:
            return
        region.closing = True
        if self.statedir is not None:
            self.statedir.closing(region)  # before any answer says it is freed
        # Children still reading pages of this region get their copies now,
        # while its pages are resident and its mapping is ours (cow.py).
        # Set once by engine.py before any region exists; never skipped: a
        # child reading this region's pages must get them before they go.
        assert self.before_close is not None, "RegionSet.before_close (cow.py) not wired"
        self.before_close(region)
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
        # PUNCHING pages stay charged until their punch returns (Puncher._punch_done, punch.py).
        idle = (table.state != pt.WRITEBACK)
        self.slots.free_many(table.slot[idle & (table.slot >= 0)])
        table.slot[idle] = pt.NO_SLOT
        for state in (pt.RESIDENT, pt.WRITEBACK):
            self.charged -= table.count(state)
        self.evicting -= int(np.count_nonzero((table.state == pt.WRITEBACK) & (table.flags & pt.F_EVICT != 0)))
        # LOADING pages are uncharged when their read returns.
        self.budget_waiters = collections.deque(w for w in self.budget_waiters if w[0] != region.id)
        # Queued reads that never started: their pages were charged and counted
        # in region.inflight when queued; undo both here (the pages a window
        # reads through, marked in its skip, are not its own: not charged).
        for rid, first, n, _, _, _, skip, *_ in [j for j in self.load_queue if j[0] == region.id]:
            self.charged -= n if skip is None else n - int(np.count_nonzero(skip))
            region.inflight -= 1
        self.load_queue = collections.deque(j for j in self.load_queue if j[0] != region.id)
        self.maybe_release(region)

    def maybe_release(self, region: Region) -> None:
        if (region.closing and region.inflight == 0 and region.id in self.by_id
                and (self.fp is None or self.fp.inflight(region) == 0)):
            del self.by_id[region.id]
            if self.fp is not None:
                self.fp.free(region)
            if self.statedir is not None:
                self.statedir.forget(region)  # nothing of it is left to adopt
            region.release()

    def ioctl_result(self, region: Region, ret: int, what: str) -> int:
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

    def ioctl_failed(self, region: Region, ret: int, what: str) -> bool:
        """True (and the region is closed) when an ioctl says the client is gone;
        for call sites where a later retry needs nothing special."""
        return self.ioctl_result(region, ret, what) == GONE_

    def after(self, delay: float, fn: Callable[[], None]) -> None:
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
