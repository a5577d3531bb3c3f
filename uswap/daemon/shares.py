"""Per-uid resident shares (max_resident_per_uid): no user keeps more of the
budget resident than its share, whatever room the budget has left, so one
user's working set cannot push every other user's pages to the store.

A share is kept as cgroup v2's memory.high is: a fault is never refused for
it (admission stays the budget's, budget.py and the fast path's us_admit);
the uid's own oldest pages are evicted back down to its share instead, at
most RECLAIM_STEP pages a step, by the rules reclaim keeps (reclaim.py
`evict_from`). A uid is the one SO_PEERCRED reported for the connection
that owns the region (a forked child's regions included).

Thread and lock: engine thread, page lock held (Engine.settle). Counting a
uid's resident pages walks its page tables, so it is done at most every
CHECK_INTERVAL_S, or at once while a uid is still over its share.
"""
from __future__ import annotations

import collections
import time

from uswap.daemon import pagetable as pt
from uswap.daemon.reclaim import RECLAIM_STEP, Reclaim
from uswap.daemon.region import Region
from uswap.daemon.regionset import PAGE, RegionSet

CHECK_INTERVAL_S = 0.1


class Shares:
    def __init__(self, max_resident_per_uid: int, regions: RegionSet, reclaim: Reclaim) -> None:
        self.limit_pages = max_resident_per_uid // PAGE  # 0: no shares
        self.regions = regions
        self.reclaim = reclaim
        self.next_check = 0.0
        self.armed = False  # a timer will wake the loop for the next count

    def set_limit(self, max_resident_per_uid: int) -> None:
        """A new share (SIGHUP): counted at the next settle, so a uid over a
        lowered share is evicted down to it with no fault to prompt it, as
        reclaim reaches a lowered budget. 0: no shares."""
        self.limit_pages = max_resident_per_uid // PAGE
        self.next_check = 0.0

    def _disarm(self) -> None:
        """The timer's turn of the loop: settle runs after it and counts."""
        self.armed = False

    def _by_uid(self) -> dict[int, list[Region]]:
        by_uid: dict[int, list[Region]] = collections.defaultdict(list)
        for region in self.regions.by_id.values():
            uid = getattr(region.owner, "uid", None)
            if uid is not None and not region.closing:
                by_uid[uid].append(region)
        return by_uid

    def trim(self) -> bool:
        """Evict from each uid over its share, a step at a time. True when
        a uid is still over after this step (call again at once)."""
        if not self.limit_pages or self.regions.draining:
            return False
        now = time.monotonic()
        if now < self.next_check:
            # Events came since the last count: count again when it is due,
            # even if no event wakes the loop by then.
            if not self.armed:
                self.armed = True
                self.regions.after(self.next_check - now, self._disarm)
            return False
        self.next_check = now + CHECK_INTERVAL_S
        more = False
        for regions in self._by_uid().values():
            # RESIDENT only: pages already under writeback to be dropped, or
            # being punched, are on their way out and not counted again.
            over = sum(r.table.count(pt.RESIDENT) for r in regions) - self.limit_pages
            if over > 0:
                step = min(over, RECLAIM_STEP)
                evicted = self.reclaim.evict_from(regions, step)
                more = more or (evicted > 0 and over > evicted)
        if more:
            self.next_check = 0.0
        return more
