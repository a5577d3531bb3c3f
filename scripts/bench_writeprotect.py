#!/usr/bin/env python3
"""Time the write-protect of a gathered write's pages, in this process, on a
real userfaultfd-registered memfd mapping (tests/uffd_region.py), every page
mapped, as a client's dirty pages are:

    .venv/bin/python scripts/bench_writeprotect.py [--pages 16384] [--batch 64,256] [--reps 2000]

per-run : one Python call of uffd.writeprotect per run of adjacent pages
          (pagetable.runs), the loop start_writeback ran before
          uffd.writeprotect_pages;
list    : one call of uffd.writeprotect_pages for the whole batch (native/uffd.c
          us_uffd_writeprotect_pages: the same ioctls, issued from C).
Batches are uniformly random distinct pages (random writes: runs of one),
and runs of 8 pages at random places. Prints the median and the 99th
percentile of each batch's time, and the median per page. The pages are
un-protected again (one ioctl, untimed) between batches.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.uffd_region import registered_memfd  # noqa: E402
from uswap import native, uffd  # noqa: E402
from uswap.daemon import pagetable as pt  # noqa: E402

PAGE = 4096


def per_run(fd: int, addr: int, pages: np.ndarray) -> None:
    for first, k in pt.runs(pages, len(pages)):
        if uffd.writeprotect(fd, addr + (first << 12), k << 12, protect=True, wake=False) < 0:
            raise OSError("UFFDIO_WRITEPROTECT failed")


def one_list(fd: int, addr: int, pages: np.ndarray) -> None:
    if uffd.writeprotect_pages(fd, addr, pages, protect=True, wake=False)[1] < 0:
        raise OSError("UFFDIO_WRITEPROTECT failed")


def batches(rng: np.random.Generator, npages: int, batch: int, run: int, reps: int) -> list[np.ndarray]:
    out = []
    for _ in range(reps):
        starts = rng.choice(npages // run, size=batch // run, replace=False) * run
        out.append(np.sort((starts[:, None] + np.arange(run)).ravel()).astype(np.int64))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pages", type=int, default=16384, help="region size in pages (default 16384: 64 MiB)")
    ap.add_argument("--batch", default="64,256", help="pages per batch, a comma list (default 64,256)")
    ap.add_argument("--reps", type=int, default=2000, help="batches timed per case (default 2000)")
    args = ap.parse_args()
    rng = np.random.default_rng(1)
    with registered_memfd(args.pages, "bench-wp") as (fd, _, addr):
        zeros = native.AlignedBuffer(args.pages * PAGE)
        assert uffd.zero_fill(fd, addr, args.pages * PAGE, zeros.addr, False) == args.pages * PAGE
        zeros.free()
        print(f"{'batch':>5} {'runs of':>7} {'how':>8} {'median µs':>10} {'p99 µs':>8} {'µs/page':>8}")
        for batch in map(int, args.batch.split(",")):
            for run in (1, 8):
                work = batches(rng, args.pages, batch, run, args.reps)
                for name, fn in (("per-run", per_run), ("list", one_list)):
                    times = []
                    for pages in work:
                        t0 = time.perf_counter_ns()
                        fn(fd, addr, pages)
                        times.append(time.perf_counter_ns() - t0)
                        uffd.writeprotect(fd, addr, args.pages * PAGE, protect=False, wake=False)
                    med, p99 = np.percentile(times, [50, 99]) / 1000
                    print(f"{batch:5d} {run:7d} {name:>8} {med:10.1f} {p99:8.1f} {med / batch:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
