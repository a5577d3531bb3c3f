"""Background writeback: the next victims are written ahead, before reclaim
needs them, so that reclaim finds them clean and drops them at once (a
punch) and no fault parked for budget waits for a store write. This is the
part of the kernel's flusher threads and kswapd watermarks that a swap
daemon needs: a page written ahead is still resident and usable, and costs
only a minor write-protect fault if it is written again before it goes.

The rule (`clean_watermark`, budget.clean_pages): the pages charged above
clean_watermark * max_resident are kept free or clean -- at least: that
reserve grows by feedback (as Hermit's feedback-directed asynchronous
reclaim, NSDI '23), doubling, up to half the budget, whenever a fault still
waited for a dirty write (Reclaim._count_dirty_waits: the store's writes
are slow against the fault rate), and halving back after a budget's worth
of pages brought in with none. When fewer are,
reclaim's next victims in its own order (VictimQueue.peek: the oldest
inactive pages first), as many as are missing, are looked at and the dirty
ones among them written (Writeback.start_writeback with evict=False). A
victim already clean, or being written ahead, counts as ready.

Invariants, enforced here and in the modules named:
- Only RESIDENT dirty pages that reclaim would take are written ahead: never
  a page in a client's mlocked range (peek applies victims.py's rule: pinned
  I/O may write it with no write-protect fault, so a slot copy of it could
  go stale unseen).
- A page written ahead is write-protected before its copy is read and a
  write during the write parks (Writeback invariants 1, 2 and 4); when the
  write returns it stays RESIDENT and clean, dirty again with its waiter let
  through if a write parked meanwhile, and is dropped only if reclaim took it
  meanwhile (F_EVICT, Reclaim._evict).
- Writes ahead use at most half of max_inflight_writes, so reclaim's own
  writes (when it meets a dirty victim anyway) always find room.

Thread and lock: engine thread, page lock held (settle, after reclaim).
"""
from __future__ import annotations

import time

from uswap.config import Config
from uswap.daemon import pagetable as pt
from uswap.daemon.budget import Budget
from uswap.daemon.reclaim import Reclaim
from uswap.daemon.regionset import RegionSet
from uswap.daemon.writeback import Writeback

# Pages brought in (the clock, budget.py) between two looks at the next
# victims: each look reads the clients' mlocked ranges (a /proc read per
# region, VictimQueue.locked_now), too dear to make after every batch of
# events; at the budget a page brought in is a page reclaim takes, so the
# reserve is short of at most this many between looks. One gathered write.
CLEAN_STEP = 64


class Cleaner:
    def __init__(self, cfg: Config, regions: RegionSet, budget: Budget, reclaim: Reclaim,
                 writeback: Writeback) -> None:
        self.regions = regions
        self.budget = budget
        self.victims = reclaim.victims  # reclaim's order: the pages it takes next
        self.write_groups = reclaim.write_groups  # runs and gathers, as reclaim writes them
        self.writeback = writeback
        self.max_writes = max(1, cfg.max_inflight_writes // 2)
        self.looked_at = None  # the clock at the last look, None: look at the next call
        self.extra = 0  # pages the reserve grew past clean_watermark's by feedback
        self.dirty_waits_seen = 0
        self.calm_since = 0  # the clock when the reserve last changed

    def reserve(self) -> int:
        """Pages to keep free or clean: clean_watermark's, and what feedback added."""
        floor = self.budget.max_pages - self.budget.clean_pages
        # Invariant: what feedback added never takes the reserve past half of
        # the budget as it is now -- a budget cut (Budget.set_limits) shrinks
        # it at once, or the cleaner would write ahead every page it holds.
        return floor + min(self.extra, max(0, self.budget.max_pages // 2 - floor))

    def missing(self) -> int:
        """Pages short of the reserve, counting the room free now (<= 0:
        nothing to write ahead)."""
        return self.reserve() - (self.budget.max_pages - self.regions.charged)

    def _feedback(self) -> None:
        """Grow the reserve when a fault waited for a dirty write since the
        last call; shrink it back after a budget's worth of calm."""
        budget, tick = self.budget, self.regions.tick
        waits = self.regions.stats["dirty_waits"]
        floor = budget.max_pages - budget.clean_pages
        self.extra = self.reserve() - floor  # within the budget as it is now (reserve)
        if waits > self.dirty_waits_seen:
            self.dirty_waits_seen = waits
            if floor > 0:  # clean_watermark 1: background writeback is off
                grown = max(2 * (floor + self.extra), floor + CLEAN_STEP)
                self.extra = max(0, min(budget.max_pages // 2, grown) - floor)
            self.calm_since = tick
        elif self.extra and (tick - self.calm_since) & 0xFFFFFFFF >= budget.max_pages:
            self.extra //= 2
            self.calm_since = tick

    def clean_ahead(self) -> None:
        """Write ahead the dirty ones among reclaim's next victims, as many
        victims as the reserve misses (module docstring)."""
        regions, writeback = self.regions, self.writeback
        self._feedback()
        # After a failed write the store is probed as reclaim probes it (one
        # write in flight past write_retry_at): only a write that succeeds
        # clears write_backoff (Writeback._write_done), so waiting for it to
        # clear would stop writing ahead for good whenever the cleaner is the
        # only writer (charge between clean_watermark and the high watermark).
        max_writes = 1 if writeback.write_backoff else self.max_writes
        if (regions.draining or time.monotonic() < writeback.write_retry_at
                or regions.writes_inflight >= max_writes):
            return
        want = self.missing()
        if want <= 0:
            return
        tick = regions.tick
        if self.looked_at is not None and (tick - self.looked_at) & 0xFFFFFFFF < CLEAN_STEP:
            return
        self.looked_at = tick
        for region, pages in self.victims.peek(regions.by_id.values(), want, regions.tick):
            table = region.table
            dirty = pages[(table.state[pages] == pt.RESIDENT) & ((table.flags[pages] & pt.F_DIRTY) != 0)]
            if not len(dirty):
                continue
            for group in self.write_groups(dirty):
                if regions.writes_inflight >= max_writes:
                    return
                if not writeback.start_writeback(region, group, evict=False) or region.closing:
                    return
