"""Punching clean pages out of their memfd: eviction's last step, and how
pages the client unmapped or that appeared while swapped leave memory.

A punch runs on the punch threads (an I/O pool of their own), never under
the page lock (see Puncher.punch for why); pages are PUNCHING meanwhile and
_punch_done applies the result on the engine thread, under the page lock.
"""
from __future__ import annotations

import time

import numpy as np

from uswap import native, uffd
from uswap.daemon import pagetable as pt
from uswap.daemon.iopool import IoPool
from uswap.daemon.region import Region
from uswap.daemon.regionset import SHIFT, RegionSet
from uswap.daemon.slots import SlotAllocator


class Puncher:
    def __init__(self, regions: RegionSet, slots: SlotAllocator, io: IoPool) -> None:
        self.regions = regions
        self.slots = slots
        # Punches have threads of their own: one may wait for a client's
        # memfd inode lock while that client's fault waits for a store job,
        # which must never queue behind it on the same threads.
        self.io = io
        self.punching = 0  # pages in PUNCHING (still charged, memory about to be freed)
        # Punch jobs in flight: job id -> when submitted (read by budget.py, which counts young ones as memory about to be freed, and by drain.py).
        self.jobs: dict[int, float] = {}
        self.seq = 0
        # Punches returned and not applied yet, in the order they returned:
        # (region, first, n, job, stamp, evicted, err). Applied together by
        # apply_done, which the engine calls once it has taken every
        # completion of its turn (Engine.on_completions).
        self.done: list[tuple] = []

    def drop(self, region: Region, pages: np.ndarray) -> None:
        """Drop clean resident pages from memory with one punch per run
        (made on a punch thread: see punch).

        Invariant 1: only pages that are RESIDENT and clean get here; clean
        means write-protected since the slot copy was taken (or a zero page
        never written), and a write since would have made them dirty."""
        table = region.table
        assert (table.state[pages] == pt.RESIDENT).all() and not (table.flags[pages] & pt.F_DIRTY).any()
        self.punch(region, pages, evicted=True)

    def punch(self, region: Region, pages: np.ndarray, evicted: bool) -> None:
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
        region.table.move(pages, pt.PUNCHING)
        self.punching += len(pages)
        stamp = self.regions.tick  # eviction time, for the refault distance
        memfd = region.memfd
        for first, n in pt.runs(pages, 1 << 30):
            self.seq += 1
            job = self.seq
            self.jobs[job] = time.monotonic()
            region.inflight += 1  # the memfd stays open until the punch returns (RegionSet.maybe_release)

            def work(first=first, n=n):
                native.punch_hole(memfd, first << SHIFT, n << SHIFT)

            def on_done(result, err, first=first, n=n, job=job):
                self.done.append((region, first, n, job, stamp, evicted, err))

            self.io.submit(work, on_done)

    def apply_done(self) -> None:
        """Apply the punches returned since the last call (engine thread,
        page lock held), in one vectorised pass per region.

        Why: a reclaim step evicts up to 256 scattered clean pages, one punch
        job each (punch's invariant), and applying them one at a time cost
        ~12 us of Python each under the page lock, which every fault thread
        of the fast path waits for: turns of 3-7 ms applying 250-450 of them
        were the largest single cause of mt-mix's p99 (issue 14).

        Same result as _punch_done for each in the order they returned: a
        punch that failed, or of a region closing, goes through _punch_done
        on its own, after the batch of the punches before it is applied
        (a failure closes the region, and the ones after it then take the
        closing path)."""
        done, self.done = self.done, []
        batch: dict[int, tuple[Region, list]] = {}
        for entry in done:
            region, first, n, job, stamp, evicted, err = entry
            if err is not None or region.closing:
                for r, runs in batch.values():
                    self._punched(r, runs)
                batch = {}
                self._punch_done(region, first, n, job, stamp, evicted, err)
                continue
            batch.setdefault(id(region), (region, []))[1].append(entry)
        for r, runs in batch.values():
            self._punched(r, runs)

    def _punched(self, region: Region, runs: list[tuple]) -> None:
        """_punch_done's work for punches of one open region that succeeded
        (each page in at most one of them), all at once."""
        if region.closing:  # closed by a completion applied before the batch
            for _, first, n, job, stamp, evicted, err in runs:
                self._punch_done(region, first, n, job, stamp, evicted, err)
            return
        firsts = np.array([r[1] for r in runs], np.int64)
        ns = np.array([r[2] for r in runs], np.int64)
        total = int(ns.sum())
        # Every page of every run, run after run.
        idx = np.repeat(firsts - (np.cumsum(ns) - ns), ns) + np.arange(total)
        evicted = np.repeat(np.array([r[5] for r in runs], bool), ns)
        stamps = np.repeat(np.array([r[4] for r in runs], np.uint32), ns)
        for r in runs:
            del self.jobs[r[3]]
        region.inflight -= len(runs)
        self.punching -= total
        self.regions.charged -= total
        table = region.table
        # Unmapped by the client while being punched (forget_range): their
        # slots go too, and they read as zeros if the range is mapped again.
        discarded = (table.flags[idx] & pt.F_DISCARD) != 0
        if discarded.any():
            discard = idx[discarded]
            self.slots.free_many(table.slot[discard].copy())
            table.slot[discard] = pt.NO_SLOT
            # unmapped while an eviction punched them (a forget's own punch counted them)
            self.regions.stats["forgotten_pages"] += int(np.count_nonzero(discarded & evicted))
        has_slot = table.slot[idx] >= 0
        parked = idx[(table.flags[idx] & pt.F_WAITERS) != 0]
        table.move(idx, np.where(has_slot, pt.SWAPPED, pt.EMPTY))
        table.flags[idx] = 0
        table.stamp[idx[evicted]] = stamps[evicted]
        self.regions.stats["swapouts"] += int(np.count_nonzero(has_slot & evicted))
        self.regions.stats["zero_drops"] += int(np.count_nonzero(evicted & ~has_slot & ~discarded))
        # Parked faults retry: a write refaults MISSING and is served from the
        # slot, current by invariant 1 (the page was write-protected and clean).
        for i, k in pt.runs(np.sort(parked), region.npages):
            uffd.wake(region.uffd, region.addr + (i << SHIFT), k << SHIFT)

    def _punch_done(self, region: Region, first: int, n: int, job: int, stamp: int,
                    evicted: bool, err: OSError | None) -> None:
        """A punch returned: its PUNCHING pages become SWAPPED (slot) or EMPTY,
        uncharged, and the faults parked on them retry. One that succeeded on
        an open region is _punched's work (apply_done gives it several at
        once); here, one that failed (the region is closed) or whose region
        is closing."""
        if err is None and not region.closing:
            self._punched(region, [(region, first, n, job, stamp, evicted, err)])
            return
        del self.jobs[job]
        region.inflight -= 1
        self.punching -= n
        self.regions.charged -= n
        table = region.table
        seg = slice(first, first + n)
        if not region.closing:
            table.move(seg, pt.EMPTY)  # uncharged above; close_region must not count them
            self.regions.close_region(region, f"punch hole failed: {err}")
        # close_region freed their slots (no write to them is in flight).
        table.move(seg, pt.EMPTY)
        table.slot[seg] = pt.NO_SLOT
        self.regions.maybe_release(region)
