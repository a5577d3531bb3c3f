"""Reclaim: keeping charged pages under the budget. Past the high watermark
(or while a fault waits for room) it evicts down to the low one, a step at
a time: clean victims are punched (punch.py), dirty ones written back first
(writeback.py). Victims come from victims.py; pages in a client's mlocked
ranges are never chosen.

Thread and lock: engine thread, page lock held (settle, after every batch
of events). It reads a client's /proc/PID/status and smaps for its locked
ranges, only when they changed (victims.py).
"""
from __future__ import annotations

import time

import numpy as np

from uswap.config import Config
from uswap.daemon import clientmaps
from uswap.daemon import pagetable as pt
from uswap.daemon.budget import Budget
from uswap.daemon.punch import Puncher
from uswap.daemon.region import Region
from uswap.daemon.regionset import RegionSet
from uswap.daemon.sampling import AccessSampler
from uswap.daemon.victims import VictimQueue, choose_victims
from uswap.daemon.writeback import Writeback

# Pages reclaimed per engine step: small enough that a fault never waits
# behind a long reclaim burst (the kernel's SWAP_CLUSTER_MAX is 32 pages).
RECLAIM_STEP = 256


def scan_pages(max_pages: int) -> int:
    """Victims chosen per scan of the page tables: one scan per eighth of
    the budget evicted, never fewer than a reclaim step."""
    return max(RECLAIM_STEP, max_pages // 8)


class Reclaim:
    def __init__(self, cfg: Config, regions: RegionSet, budget: Budget, puncher: Puncher,
                 writeback: Writeback) -> None:
        self.cfg = cfg
        self.regions = regions
        self.budget = budget
        self.puncher = puncher  # clean victims
        self.writeback = writeback  # dirty victims
        self.reclaiming = False  # between crossing the high watermark and reaching the low one
        # Resident pages are sampled before they are evicted, so that a page
        # in use without faulting is seen (sampling.py, victims.py).
        self.sampler = AccessSampler()
        self.victims = VictimQueue(scan_pages(budget.max_pages),
                                   lock_key=self._lock_key, read_locked=self._locked_pages,
                                   sampler=self.sampler)
        # A victim's write may still be in flight when its client mlocks it:
        # writeback asks again before it drops the page (writeback.py).
        writeback.locked_pages = self.victims.locked_now
        self.waits_seen = 0  # budget waits (faults.py's count) already told apart, see _count_dirty_waits

    def budget_changed(self) -> None:
        """The budget was changed at runtime (SIGHUP): scan in batches that fit
        it. A batch sized for a larger budget would be taken in any order
        (victims.py), so a budget cut from 1 GiB to 1 MiB left LRU order
        with a granularity of the whole working set."""
        self.victims.batch = scan_pages(self.budget.max_pages)
        self.victims.clear()

    def reclaim(self) -> bool:
        """Keep charged pages under the budget: past the high watermark (or when
        a fault waits for room) evict down to the low watermark, at most
        RECLAIM_STEP pages per call so faults are served in between. Returns
        True when a step made progress and more is due at once."""
        more = self._reclaim_step()
        self._count_dirty_waits()
        return more

    def _count_dirty_waits(self) -> None:
        """Tell apart, once each, the faults parked for budget since the last
        call: those the clean pages leaving memory (punches in flight) and the
        room free now cover wait microseconds; the rest wait for a dirty page's
        store write (stats "dirty_waits": what background writeback, cleaner.py,
        is there to keep at 0)."""
        regions = self.regions
        parked = regions.stats["budget_waits"]
        new = parked - self.waits_seen
        if new <= 0:
            return
        self.waits_seen = parked
        room = max(0, self.budget.max_pages - regions.charged)
        short = len(regions.budget_waiters) - self.puncher.punching - room
        if short > 0:
            regions.stats["dirty_waits"] += min(new, short)

    def _reclaim_step(self) -> bool:
        if self.regions.draining:
            return False
        regions, budget = self.regions, self.budget
        if self.reclaiming and regions.charged <= budget.low_pages and not regions.budget_waiters:
            self.reclaiming = False
        if not self.reclaiming:
            if regions.charged <= budget.high_pages and not regions.budget_waiters:
                return False
            self.reclaiming = True
        want = (regions.charged - budget.low_pages - regions.evicting - self.puncher.punching
                + len(regions.budget_waiters))
        if want <= 0:
            return False
        step = min(want, RECLAIM_STEP)
        can_write = time.monotonic() >= self.writeback.write_retry_at
        progress = self._evict(self.victims.take(regions.by_id.values(), step, regions.tick,
                                                 clean_only=not can_write), can_write)
        if regions.charged - regions.evicting - self.puncher.punching <= budget.low_pages:
            self.reclaiming = False  # the low watermark is reached (or will be, as writes land)
        return progress > 0 and want > progress

    def evict_from(self, regions: list[Region], want: int) -> int:
        """Evict up to `want` of the oldest resident pages of `regions` alone
        (a uid over its share, shares.py), by the same rules as reclaim:
        never a page in a client's mlocked range, only clean ones while the
        store cannot take writes. Returns the pages on their way out."""
        can_write = time.monotonic() >= self.writeback.write_retry_at
        locked = {}
        for region in regions:
            if self._lock_key(region) != 0:
                mask = self._locked_pages(region)
                if mask is not None:
                    locked[region.id] = mask
        return self._evict(choose_victims(regions, want, self.regions.tick, clean_only=not can_write,
                                          locked=locked), can_write)

    def _evict(self, victims: list[tuple[Region, np.ndarray]], can_write: bool) -> int:
        """Punch the clean victims, write back the dirty ones (dropped when
        their write returns). Returns the pages on their way out."""
        regions = self.regions
        progress = 0
        for region, pages in victims:
            table = region.table
            ahead = table.state[pages] == pt.WRITEBACK
            if ahead.any():
                # Being written ahead (cleaner.py): dropped when the write
                # returns, as a dirty victim is (F_EVICT; Writeback._write_done
                # keeps it if a write parked on it meanwhile).
                table.flags[pages[ahead]] |= pt.F_EVICT
                regions.evicting += int(np.count_nonzero(ahead))
                progress += int(np.count_nonzero(ahead))
                pages = pages[~ahead]
            clean = pages[(table.flags[pages] & pt.F_DIRTY) == 0]
            dirty = pages[(table.flags[pages] & pt.F_DIRTY) != 0]
            if len(clean):
                self.puncher.drop(region, clean)
                progress += len(clean)
            if len(dirty) and can_write:
                # After a failure, probe with one write at a time until one
                # succeeds, instead of burning a round of slots on a dead store.
                max_writes = 1 if self.writeback.write_backoff else self.cfg.max_inflight_writes
                # Runs of adjacent dirty pages go out batch_pages at a time;
                # scattered ones are gathered, gather_pages at a time, into one
                # write to adjacent slots (random writes had cost one 4 KiB
                # write per page).
                for group in self.write_groups(dirty):
                    if regions.writes_inflight >= max_writes:
                        break
                    if not self.writeback.start_writeback(region, group):
                        can_write = False
                        break
                    progress += len(group)
                    if region.closing:
                        break
        return progress

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
        status = getattr(region.owner, "proc_status", None)   # a session's, kept open
        kb = status.locked_kb() if status is not None else clientmaps.locked_kb(pid)
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

    def write_groups(self, dirty: np.ndarray) -> list[np.ndarray]:
        """Sorted dirty pages cut into store writes: each a run of up to
        batch_pages adjacent pages, or up to gather_pages scattered ones."""
        groups: list[np.ndarray] = []
        scattered: list[int] = []
        for first, n in pt.runs(dirty, self.writeback.batch_pages):
            if n >= self.writeback.gather_pages:
                groups.append(np.arange(first, first + n))
                continue
            if len(scattered) + n > self.writeback.gather_pages:
                groups.append(np.asarray(scattered))
                scattered = []
            scattered.extend(range(first, first + n))
        if scattered:
            groups.append(np.asarray(scattered))
        return groups
