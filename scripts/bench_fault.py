#!/usr/bin/env python3
"""Fault latency and swap-in throughput of uswap, next to raw store I/O on the
same store, measured in the same run.

    .venv/bin/python scripts/bench_fault.py [--store file|nfs|both] [--size 256M]

For each store: a daemon with a budget of size/4 serves a region of `size`
that was written once (so about 3/4 of it is swapped out). Then:
  random  — touch N random pages (one 8-byte read each), per-access latency;
  seq     — read one word per page front to back, MiB/s;
and beside them, on the very same store file with the daemon idle:
  raw random 4 KiB reads (O_DIRECT pread for a file, libnfs pread for nfs://),
  raw sequential reads in readahead-sized requests at queue depth 1.
Prints a table with the ratios; --json FILE writes the numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import uswap  # noqa: E402
from uswap import native  # noqa: E402
from uswap.sizes import format_size, parse_size  # noqa: E402
from uswap.store import open_store  # noqa: E402
from tests.daemon_proc import DaemonProc  # noqa: E402

PAGE = 4096


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def bench_uswap(backing: str, size: int, samples: int, workdir: str, readahead: str) -> dict:
    budget = size // 4
    d = DaemonProc(workdir, backing, store_size=str(size * 2), max_resident=str(budget),
                   # A window above the default maximum raises the maximum with it.
                   config={"readahead": readahead,
                           "readahead_max": max(parse_size(readahead, "--readahead"), 512 << 10)})
    try:
        with uswap.connect(d.socket) as c:
            region = c.alloc(size)
            a = np.frombuffer(region.buf, dtype=np.uint64).reshape(-1, PAGE // 8)
            npages = a.shape[0]
            t0 = time.perf_counter()
            a[:, 0] = np.arange(npages)  # first touch: every page written once
            first_touch = size / (time.perf_counter() - t0) / 2**20
            # Warm-up pass so every later fault finds memory already faulted once in this VM.
            int(a[:, 0].sum())
            seq = []
            for _ in range(3):
                st0 = c.status()
                t0 = time.perf_counter()
                total = int(a[:, 0].sum())
                seq.append(size / (time.perf_counter() - t0) / 2**20)
                assert total == npages * (npages - 1) // 2, "data check failed"
            st_before = c.status()
            rng = random.Random(1)
            lat = []
            pc = time.perf_counter_ns
            for _ in range(samples):
                p = rng.randrange(npages)
                t0 = pc()
                v = a[p, 0]
                lat.append((pc() - t0) / 1000)
                if v != p:
                    raise AssertionError(f"page {p} holds {v}")
            st_after = c.status()
            swapins = st_after["swapins_total"] - st_before["swapins_total"]
            faults = st_after["faults_total"] - st_before["faults_total"]
            del a
            region.close()
        return {"random_p50_us": pct(lat, 50), "random_p99_us": pct(lat, 99),
                "random_fault_ratio": faults / samples, "swapins": swapins,
                "seq_mib_s": float(np.median(seq)), "first_touch_mib_s": first_touch}
    finally:
        assert d.stop() == 0, d.log_text()


def bench_raw(backing: str, size: int, samples: int, chunk: int) -> dict:
    """Raw reads of the same store (the daemon is stopped; the file is kept)."""
    store = open_store(backing, size * 2)
    buf = native.AlignedBuffer(max(chunk, PAGE))
    try:
        rng = random.Random(2)
        lat = []
        pc = time.perf_counter_ns
        nslots = size // PAGE
        for _ in range(samples):
            off = (1 + rng.randrange(nslots)) * PAGE
            t0 = pc()
            store.read(buf.addr, PAGE, off)
            lat.append((pc() - t0) / 1000)
        seq = []
        for _ in range(3):
            t0 = time.perf_counter()
            for off in range(PAGE, size, chunk):
                store.read(buf.addr, min(chunk, size - off), off)
            seq.append(size / (time.perf_counter() - t0) / 2**20)
        return {"random_p50_us": pct(lat, 50), "random_p99_us": pct(lat, 99),
                "seq_mib_s": float(np.median(seq))}
    finally:
        buf.free()
        store.close()


def nfs_url() -> str:
    out = subprocess.run([os.path.join(REPO, "scripts", "nfs-server"), "start"], capture_output=True,
                         text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", choices=["file", "nfs", "both"], default="both")
    ap.add_argument("--size", default="256M", help="region size (budget is a quarter)")
    ap.add_argument("--samples", type=int, default=3000)
    ap.add_argument("--readahead", default="32K")
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args()
    size = parse_size(args.size, "--size")
    chunk = parse_size(args.readahead, "--readahead")
    results = {}
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        kinds = ["file", "nfs"] if args.store == "both" else [args.store]
        for kind in kinds:
            if kind == "file":
                backing = os.path.join(tmp, "swapfile")
            else:
                backing = f"{nfs_url()}/bench-fault-{os.getpid()}"
            print(f"[{kind}] uswap over {backing}: region {format_size(size)}, budget {format_size(size // 4)}",
                  flush=True)
            u = bench_uswap(backing, size, args.samples, tmp, args.readahead)
            print(f"[{kind}] raw reads of the same store", flush=True)
            r = bench_raw(backing, size, args.samples, chunk)
            results[kind] = {"uswap": u, "raw": r}
    print()
    print(f"{'store':6} {'metric':24} {'uswap':>10} {'raw':>10} {'ratio':>8}")
    for kind, res in results.items():
        u, r = res["uswap"], res["raw"]
        for metric, unit in (("random_p50_us", "us"), ("random_p99_us", "us"), ("seq_mib_s", "MiB/s")):
            print(f"{kind:6} {metric + ' (' + unit + ')':24} {u[metric]:10.1f} {r[metric]:10.1f} {u[metric] / r[metric]:8.2f}")
        print(f"{kind:6} {'first touch (MiB/s)':24} {u['first_touch_mib_s']:10.1f}")
        print(f"{kind:6} {'faults per random access':24} {u['random_fault_ratio']:10.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
