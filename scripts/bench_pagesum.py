#!/usr/bin/env python3
"""Cost per page of the page checksum: the CRC32C of native/pagesum.h (with
its all-zero flag, hardware and software paths) against the multiply-xorshift
hash it replaced (cf2b06a), measured in the same run, in C.

    .venv/bin/python scripts/bench_pagesum.py [--pages 64,4096] [--rounds 100]

For each buffer size in --pages, each round checksums the same buffer of
random pages with each function in turn; prints the median and the best
ns/page of each and the ratio of medians to the old hash. 64 pages (256 KiB)
stay in the L2 cache and show the functions' own cost; 4096 pages (16 MiB)
do not, and show the cost when the page comes from memory (both functions
are then bound by memory bandwidth).
"""
from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import tempfile

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
NATIVE = os.path.join(HERE, "..", "native")

SOURCE = r"""
#include <time.h>
#include "pagesum.h"

/* The page checksum before CRC32C, verbatim from cf2b06a's pagesum.h. */
static void old_page_sums(uint64_t addr, uint64_t npages, uint32_t *out)
{
    for (uint64_t p = 0; p < npages; p++) {
        const uint64_t *w = (const uint64_t *)(addr + p * 4096);
        uint64_t h1 = 0x9E3779B97F4A7C15ull, h2 = 0xC2B2AE3D27D4EB4Full;
        for (int i = 0; i < 512; i += 2) {
            h1 = (h1 ^ w[i]) * 0xFF51AFD7ED558CCDull;
            h2 = (h2 ^ w[i + 1]) * 0xC4CEB9FE1A85EC53ull;
            h1 ^= h1 >> 29;
            h2 ^= h2 >> 31;
        }
        uint64_t h = h1 ^ (h2 * 0x9E3779B97F4A7C15ull);
        h ^= h >> 32;
        out[p] = (uint32_t)h | 1u;
    }
}

static double now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e9 + t.tv_nsec;
}

/* ns per page of one pass over npages pages with `which`:
 * 0 old hash, 1 CRC32C + zero flag (as the daemon runs it), 2 the same with
 * the software CRC forced. */
static double bench(int which, uint64_t addr, uint64_t npages, uint32_t *sums, uint8_t *zero)
{
    int hw = us_crc_hw;
    double t0 = now_ns();
    if (which == 0) {
        old_page_sums(addr, npages, sums);
    } else {
        us_crc_hw = which == 1 ? hw : 0;
        us_page_sums(addr, npages, sums, zero);
        us_crc_hw = hw;
    }
    return (now_ns() - t0) / (double)npages;
}
"""

CDEF = """
double bench(int which, uint64_t addr, uint64_t npages, uint32_t *sums, uint8_t *zero);
int us_crc32c_hw_available(void);
"""


def build(tmp: str):
    ffi = FFI()
    ffi.cdef(CDEF)
    ffi.set_source("_bench_pagesum", SOURCE, include_dirs=[NATIVE], extra_compile_args=["-O2", "-Wall"])
    ffi.compile(tmpdir=tmp)
    sys.path.insert(0, tmp)
    return importlib.import_module("_bench_pagesum")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pages", default="64,4096", help="buffer sizes in pages, comma-separated")
    ap.add_argument("--rounds", type=int, default=100)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        mod = build(tmp)
        for npages in (int(x) for x in args.pages.split(",")):
            run(mod.ffi, mod.lib, npages, args.rounds)
    return 0


def run(ffi, lib, npages: int, rounds: int) -> None:
    data = ffi.new("char[]", os.urandom(npages * 4096 + 4096))
    addr = (int(ffi.cast("uintptr_t", data)) + 4095) & ~4095
    sums = ffi.new("uint32_t[]", npages)
    zero = ffi.new("uint8_t[]", npages)
    names = ["old multiply-xorshift", "crc32c+zero (sse4.2)" if lib.us_crc32c_hw_available()
             else "crc32c+zero (software: no sse4.2)", "crc32c+zero (software)"]
    for which in range(3):  # warm up: fault the buffer in, settle the clocks
        lib.bench(which, addr, npages, sums, zero)
    results: list[list[float]] = [[], [], []]
    for _ in range(rounds):
        for which in range(3):
            results[which].append(lib.bench(which, addr, npages, sums, zero))
    base = statistics.median(results[0])
    print(f"{npages} pages x {rounds} rounds, ns/page (median, best), ratio of medians to the old hash")
    for name, r in zip(names, results):
        med = statistics.median(r)
        print(f"  {name:36s} {med:8.1f} {min(r):8.1f}   x{med / base:.2f}")


if __name__ == "__main__":
    sys.exit(main())
