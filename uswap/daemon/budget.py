"""The memory budget: which pages may be charged, and the clock.

`charged` counts pages holding memory or about to (RESIDENT, WRITEBACK,
LOADING, PUNCHING); `tick` is the clock: pages brought in, plus one for each
first use of a page in memory (a first write, a MINOR fault), so that every
use changes the stamp it leaves (victims.py reads a changed stamp as a use).
Both are fields
of the fast path's shared struct (regionset.py), which the C fault threads
charge by the same rule: admission and overcommit are native/policy.h's
functions (uswap/daemon/policy.py), called from both sides. A fault that
finds no room parks in `budget_waiters` and is served here once reclaim made
room, or over budget when reclaim cannot make any (the store is full or
failing).

Thread and lock: engine thread, page lock held.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np

from uswap.config import Config
from uswap.daemon import policy
from uswap.daemon.punch import Puncher
from uswap.daemon.region import Region
from uswap.daemon.regionset import PAGE, RegionSet

# Seconds a punch counts as memory about to be freed for a fault waiting for
# budget (Budget._young_punches); a punch takes microseconds unless a
# client holds its memfd's inode lock.
PUNCH_PATIENCE = 0.2


class Budget:
    def __init__(self, cfg: Config, regions: RegionSet, puncher: Puncher) -> None:
        self.regions = regions
        self.puncher = puncher  # its jobs in flight are memory about to be freed
        self.set_limits(cfg)
        self.punch_wake_armed = False

    def set_limits(self, cfg: Config) -> None:
        """The budget and its watermarks in pages, from `cfg` (at start, and
        on a reload: a lower budget is reached by the next reclaim steps, a
        higher one admits the faults parked for budget at the next settle)."""
        self.max_pages = cfg.max_resident // PAGE
        self.high_pages = max(1, int(self.max_pages * cfg.high_watermark))
        self.low_pages = max(1, int(self.max_pages * cfg.low_watermark))
        # Pages charged above this are kept free or clean (cleaner.py).
        self.clean_pages = int(self.max_pages * cfg.clean_watermark)

    def advance_clock(self, pages: int = 1) -> int:
        """Advance the clock by the pages just brought in (or by one for a use
        of a page in memory): stamps and refault distances are measured in
        pages, as the kernel's workingset code does, the uses of resident
        pages counting one each."""
        self.regions.tick = (self.regions.tick + pages) & 0xFFFFFFFF
        return self.regions.tick

    def charge(self, n: int, force: bool = False) -> bool:
        """Charge n pages if the budget admits them all (policy.admit), or
        `force` (a page that must be in memory now: a fault reclaim cannot
        make room for, a fork child's copy of a source page about to change,
        a stray page): then the pages the budget did not admit are counted
        as overcommitted.

        Invariant: charged pages <= max_pages + the overcommitted pages
        counted (status overcommit_pages_total), drain aside (it admits every
        page). It holds because every charge of memory new to the budget is
        made here or by charge_leading (or the fast path's us_admit), and
        only here may one pass admission, counted where it does."""
        admitted = policy.admit(self.regions.charged, self.max_pages, n, self.regions.draining)
        if admitted < n and not force:
            return False
        self.regions.stats["overcommit_pages"] += n - admitted
        self.regions.charged += n
        return True

    def room(self) -> int:
        """How many pages the budget would admit now (policy.admit's rule;
        while draining, more than any window)."""
        return policy.admit(self.regions.charged, self.max_pages, 1 << 62, self.regions.draining)

    def charge_leading(self, ok: np.ndarray) -> int:
        """Charge the pages of the leading True run of `ok` (the pages after
        one already charged), as far as the budget allows: charge's rule for
        a window at once. Returns how many were charged."""
        room = policy.admit(self.regions.charged, self.max_pages, len(ok), self.regions.draining)
        stop = np.flatnonzero(~ok[:room])
        n = int(stop[0]) if len(stop) else min(len(ok), room)
        self.regions.charged += n
        return n

    def serve_budget_waiters(self, serve: Callable[[Region, int, bool, bool], None]) -> None:
        """Admit the faults parked for budget, oldest first, while there is
        room (or reclaim cannot make any): `serve(region, page, write, force)`
        is faults.py's fault_missing, passed by the composition (faults.py
        sits above this module)."""
        while self.regions.budget_waiters:
            rid, page, write = self.regions.budget_waiters[0]
            region = self.regions.by_id.get(rid)
            if region is None or region.closing:
                self.regions.budget_waiters.popleft()
                continue
            over = policy.admit(self.regions.charged, self.max_pages, 1, self.regions.draining) < 1
            if over and not self._must_overcommit():
                return
            self.regions.budget_waiters.popleft()
            serve(region, page, write, over)  # its forced charge counts the overcommit

    def _must_overcommit(self) -> bool:
        """Reclaim cannot make room (policy.must_overcommit): nothing is being
        written or read that would free or settle memory, and nothing clean is
        left to drop. This is
        the store-unavailable case (full, or failing writes in backoff): pages
        stay resident over budget rather than stall the client forever."""
        regions = self.regions
        return policy.must_overcommit(regions.writes_inflight, regions.loads_inflight, len(regions.load_queue),
                                      regions.shared.inflight, self._young_punches())

    def _young_punches(self) -> int:
        """Punches submitted less than PUNCH_PATIENCE ago: memory about to be
        freed. An older one may be waiting for a client's memfd inode lock,
        held by a thread whose fault may be this very budget waiter: counting
        it for ever could deadlock, so past that time the waiter overcommits.
        Arms one timer so the loop looks again when the patience runs out."""
        now = time.monotonic()
        young = [t for t in self.puncher.jobs.values() if now - t < PUNCH_PATIENCE]
        if young and not self.punch_wake_armed:
            self.punch_wake_armed = True

            def disarm() -> None:
                self.punch_wake_armed = False

            self.regions.after(min(young) + PUNCH_PATIENCE - now, disarm)
        return len(young)
