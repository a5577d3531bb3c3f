#!/usr/bin/env python3
"""The daemon's victim policy replayed on scripts/bench.py's zipf-read trace,
against exact LRU: a model to try a policy change in a second, with no
daemon and no noise.

    .venv/bin/python scripts/sim_victims.py [--reserve-extra PAGES] [--no-cleaner]
        [--seed N] [--repeat 9]

The real VictimQueue (victims.py), policy rules (policy.h through policy.py)
and page table are driven as the daemon drives them on that workload: the
fill (every page written once, front to back), the warm-up pass and the
measured passes, read-only, over a region of 64 Ki pages with a quarter of
them resident. Each miss is a swap-in (refault distance checked, the fault
clock advanced, the page stamped); past the high watermark reclaim takes
victims (VictimQueue.take, RECLAIM_STEP at a time) down to the low one;
every CLEAN_STEP pages brought in above clean_watermark the cleaner looks
at the next victims (VictimQueue.peek: on a read-only load it writes
nothing, but its scans sample and judge). Sampling is modelled: a sampled
page is unmapped, and its next read is a MINOR fault (stamped, made active
by policy.minor_use).

--reserve-extra: pages the cleaner's reserve has grown by (cleaner.py's
feedback, after faults waited for dirty writes: during the fill, in bench
runs); it makes the peek ask for more.

Not modelled: threads and timing (reclaim is synchronous here), read-ahead
(a zipf trace over scattered pages has almost none), writes.
"""
from __future__ import annotations

import argparse
import os
import sys
import types

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_sim  # noqa: E402
import bench_workloads as wl  # noqa: E402
from uswap.config import DEFAULTS  # noqa: E402
from uswap.daemon import pagetable as pt  # noqa: E402
from uswap.daemon import policy  # noqa: E402
from uswap.daemon.cleaner import CLEAN_STEP  # noqa: E402
from uswap.daemon.reclaim import RECLAIM_STEP, scan_pages  # noqa: E402
from uswap.daemon.victims import VictimQueue  # noqa: E402

NPAGES = 65536   # scripts/bench.py --quick: 256 MiB
PARAMS = {"zipf_n": 60000, "seed": 20240601, "zipf_a": 1.2}   # bench.py's quick parameters


class ModelSampler:
    """AccessSampler's effect: the pages leave the client's page tables."""

    def __init__(self, mapped: np.ndarray) -> None:
        self.mapped = mapped
        self.sampled = 0

    def sample(self, region, pages: np.ndarray) -> bool:
        self.mapped[pages] = False
        self.sampled += len(pages)
        return True


class Model:
    def __init__(self, npages: int, cleaner: bool, reserve_extra: int) -> None:
        self.max_pages = npages // 4
        self.high = int(self.max_pages * DEFAULTS["high_watermark"][0])
        self.low = int(self.max_pages * DEFAULTS["low_watermark"][0])
        self.clean = int(self.max_pages * DEFAULTS["clean_watermark"][0])
        self.cleaner = cleaner
        self.extra = reserve_extra
        self.table = pt.PageTable(npages)
        self.region = types.SimpleNamespace(id=1, closing=False, table=self.table)
        self.mapped = np.zeros(npages, bool)
        self.sampler = ModelSampler(self.mapped)
        self.victims = VictimQueue(scan_pages(self.max_pages), sampler=self.sampler, step=RECLAIM_STEP)
        self.tick = self.charged = self.looked = 0
        self.major = self.minor = 0

    def _clock(self) -> int:
        self.tick = (self.tick + 1) & 0xFFFFFFFF
        return self.tick

    def access(self, p: int) -> None:
        table = self.table
        if table.state[p] == pt.RESIDENT:
            if not self.mapped[p]:          # sampled: a MINOR fault (Faults.fault_minor)
                self.minor += 1
                table.stamp[p] = self._clock()
                table.flags[p] = policy.minor_use(int(table.flags[p]))
                self.mapped[p] = True
            return
        self.major += 1                     # a swap-in (fastpath.c fp_take_missing, fp_finish)
        if table.state[p] == pt.SWAPPED and policy.refault_active(self.tick, int(table.stamp[p]), self.max_pages):
            table.flags[p] |= pt.F_ACTIVE
        table.state[p] = pt.RESIDENT
        table.stamp[p] = self._clock()
        self.mapped[p] = True
        self.charged += 1
        self._reclaim()
        if self.cleaner and self.charged + self.extra > self.clean and self.tick - self.looked >= CLEAN_STEP:
            self.looked = self.tick
            self.victims.peek([self.region], self.charged - self.clean + self.extra, self.tick)

    def _reclaim(self) -> None:
        if self.charged <= self.high:
            return
        while self.charged > self.low:
            got = self.victims.take([self.region], min(RECLAIM_STEP, self.charged - self.low), self.tick)
            n = 0
            for _, pages in got:
                self.table.state[pages] = pt.SWAPPED
                self.table.flags[pages] = 0
                self.table.stamp[pages] = self.tick    # the eviction tick (punch.py)
                self.mapped[pages] = False
                n += len(pages)
            self.charged -= n
            if not n:
                return


def run(seed: int, repeat: int, cleaner: bool = True, reserve_extra: int = 0,
        npages: int = NPAGES) -> tuple[list[int], list[int], list[int]]:
    """(faults per measured pass, minor faults per pass, exact LRU's faults per pass)."""
    m = Model(npages, cleaner, reserve_extra)
    for p in range(npages):
        m.access(p)
    passes = wl.zipf_passes(npages, dict(PARAMS, seed=seed), repeat)
    faults, minors = [], []
    for k, trace in enumerate(passes):
        f0, m0 = m.major, m.minor
        for p in trace.tolist():
            m.access(p)
        if k:
            faults.append(m.major - f0)
            minors.append(m.minor - m0)
    return faults, minors, bench_sim.simulate("lru", npages, m.max_pages, passes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=PARAMS["seed"])
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--reserve-extra", type=int, default=0)
    ap.add_argument("--no-cleaner", action="store_true")
    args = ap.parse_args()
    faults, minors, lru = run(args.seed, args.repeat, not args.no_cleaner, args.reserve_extra)
    ratios = [f / l for f, l in zip(faults, lru)]
    print("faults      ", faults)
    print("minor faults", minors)
    print("exact LRU   ", lru)
    print("ratio       ", " ".join(f"{r:.3f}" for r in ratios))
    print(f"zipf-read faults / exact LRU: median {np.median(ratios):.3f}, range {min(ratios):.3f}-{max(ratios):.3f}")


if __name__ == "__main__":
    main()
