#!/usr/bin/env python3
"""The demo's workload: a region four times the daemon's budget, written,
read back in order and at random, every page checked; prints what happened."""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

import uswap
from uswap.sizes import format_size, parse_size

PAGE = 4096


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--socket", required=True)
    ap.add_argument("--size", default="1G")
    args = ap.parse_args()
    size = parse_size(args.size, "--size")
    with uswap.connect(args.socket) as client:
        st0 = client.status()
        print(f"daemon: budget {format_size(st0['max_resident_bytes'])}, store {st0['store']['url']}")
        region = client.alloc(size)
        a = np.frombuffer(region.buf, dtype=np.uint64).reshape(-1, PAGE // 8)
        n = a.shape[0]
        ids = np.arange(n, dtype=np.uint64)

        def step(name: str, fn) -> None:
            before = client.status()
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            after = client.status()
            print(f"{name:28} {dt:6.2f} s  {size / dt / 2**20:7.1f} MiB/s   "
                  f"faults {after['faults_total'] - before['faults_total']:>7}  "
                  f"swapped out {after['swapouts_total'] - before['swapouts_total']:>7} pages  "
                  f"in {after['swapins_total'] - before['swapins_total']:>7} pages  "
                  f"resident {format_size(after['resident_bytes'])}")

        def write_all() -> None:
            a[:, 0] = ids * 7 + 1
            a[:, 511] = ids

        def check_all() -> None:
            if not (np.array_equal(a[:, 0], ids * 7 + 1) and np.array_equal(a[:, 511], ids)):
                raise SystemExit("DATA MISMATCH")

        rng = np.random.default_rng(0)
        sample = rng.integers(0, n, n // 4)

        def random_reads() -> None:
            bad = np.count_nonzero(a[sample, 511] != sample.astype(np.uint64))
            if bad:
                raise SystemExit(f"DATA MISMATCH in {bad} pages")

        print(f"workload: {format_size(size)} region, {n} pages, "
              f"{size / st0['max_resident_bytes']:.0f}x the budget")
        step("first touch (write all)", write_all)
        step("sequential read + verify", check_all)
        step("random reads (1/4 of pages)", random_reads)
        step("sequential read + verify", check_all)
        st = client.status()
        print(f"totals: {st['swapouts_total']} pages swapped out, {st['swapins_total']} swapped in, "
              f"{st['faults_total']} faults, write errors {st['write_errors_total']}, "
              f"read errors {st['read_errors_total']}; every page verified")
        del a
        region.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
