#!/usr/bin/env python3
"""Profile the daemon with py-spy while one client streams through a region.

    .venv/bin/python scripts/profile_daemon.py seq|touch|rwrite|rread [--size 512M]
        [--seconds 6] [--config '{"write_batch": "1M"}'] [--top 25] [--nonblocking]

seq   : the region is written once, then read front to back (one word per
        page) for --seconds while py-spy samples the daemon: sequential swap-in.
touch : a fresh region is written front to back once while py-spy samples:
        first touch with eviction (zero fill, writeback, drop).
rwrite: the region is written once, then one word of a uniformly random page
        is written, page after page, for --seconds: every resident page is
        dirty, and every fault needs a victim (writeback under pressure).
rread : the region is written once, then one word of a uniformly random page
        is read, page after page, for --seconds: random swap-in, each fault
        evicting a clean page.
The budget is size/4 on an O_DIRECT file store under /var/tmp. Prints the
client's MiB/s and the engine thread's hottest frames (inclusive share of its
samples, idle I/O-pool threads left out), then the CPU each kind of daemon
thread used while the client ran, per page swapped in or out (threads by
name: uswap-fault and uswap-io are the C fault and I/O threads, the
process's own name the engine and the Python pools). This is what the
optimisation notes of the benchmark issue quote.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import uswap  # noqa: E402
from uswap.sizes import parse_size  # noqa: E402
from tests.daemon_proc import DaemonProc  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_child import proc_cpu_s  # noqa: E402

PYSPY = os.path.join(os.path.dirname(sys.executable), "py-spy")
if not os.path.exists(PYSPY):
    sys.exit(f"profile_daemon.py: {PYSPY} not found: run scripts/setup (it installs py-spy with the bench extras)")


def hottest(raw_path: str, top: int) -> list[tuple[float, str]]:
    """Inclusive share of each frame in py-spy's raw (collapsed) output."""
    counts: collections.Counter = collections.Counter()
    total = 0
    with open(raw_path) as f:
        for line in f:
            stack, n = line.rsplit(" ", 1)
            if "IoPool._run" in stack:  # idle Python I/O threads
                continue
            total += int(n)
            for frame in set(stack.split(";")):
                counts[frame] += int(n)
    return [(100.0 * n / max(1, total), frame) for frame, n in counts.most_common(top)]


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) of each thread of `pid`, with its name."""
    out = {}
    for tid in map(int, os.listdir(f"/proc/{pid}/task")):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                name = f.read().strip()
            out[tid] = (name, proc_cpu_s(pid, tid))
        except OSError:
            continue  # the thread ended
    return out


def cpu_by_kind(pid: int, before: dict, after: dict, pages: int) -> list[str]:
    """Lines: each thread kind's CPU over the run, in µs per page moved."""
    kinds: collections.Counter = collections.Counter()
    for tid, (name, cpu) in after.items():
        kind = "engine" if tid == pid else name
        kinds[kind] += cpu - before.get(tid, (name, 0.0))[1]
    total = sum(kinds.values())
    lines = [f"daemon CPU {total:.2f} s for {pages} pages swapped in or out: {total / max(1, pages) * 1e6:.1f} µs/page"]
    for kind, cpu in kinds.most_common():
        lines.append(f"  {kind:16s} {cpu:6.2f} s  {cpu / max(1, pages) * 1e6:6.1f} µs/page")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=("seq", "touch", "rwrite", "rread"))
    ap.add_argument("--size", default="512M")
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--config", default="{}", help="daemon settings as a JSON object")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--raw", help="keep py-spy's raw (collapsed) samples in this file")
    ap.add_argument("--nonblocking", action="store_true",
                    help="py-spy --nonblocking: truer thread CPU, but it may plant a zero page in the"
                         " profiled region (README \"Known limits\"); the run's data check then fails")
    args = ap.parse_args()
    size = parse_size(args.size, "--size")
    workdir = tempfile.mkdtemp(prefix="uswap-prof-", dir="/var/tmp")
    raw = os.path.join(workdir, "profile.txt")
    d = DaemonProc(workdir, os.path.join(workdir, "swapfile"), store_size=str(size * 2),
                   max_resident=str(size // 4), config=json.loads(args.config))
    try:
        with uswap.connect(d.socket) as c:
            region = c.alloc(size)
            a = np.frombuffer(region.buf, dtype=np.uint64).reshape(-1, 512)
            n = a.shape[0]
            if args.mode in ("seq", "rwrite", "rread"):
                a[:, 0] = np.arange(n)
                int(a[:, 0].sum())  # warm-up pass
            spy = subprocess.Popen([PYSPY, "record", "-p", str(d.proc.pid), "-d", str(int(args.seconds) + 1),
                                    "-r", "500", "-f", "raw", "-o", raw]
                                   # Without it py-spy stops every thread for each sample (ptrace),
                                   # and the C threads' CPU doubled in perf. With it py-spy follows
                                   # pointers that change under it, and a read through the daemon's
                                   # mapping of a swapped page plants a zero page the client then
                                   # reads (README "Known limits": 1 run in 12 lost a page).
                                   + (["--nonblocking"] if args.nonblocking else []),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)  # py-spy attaches (a profiling script: no result depends on this)
            st0, cpu0 = c.status(), thread_cpu(d.proc.pid)
            t0 = time.perf_counter()
            moved = 0
            if args.mode == "touch":
                a[:, 0] = np.arange(n)
                moved = size
            elif args.mode == "rwrite":
                rng = np.random.default_rng(1)
                while time.perf_counter() - t0 < args.seconds:
                    for page in rng.integers(0, n, 4096).tolist():
                        a[page, 1] = page  # a store alone: a write fault
                    moved += 4096 * 4096
            elif args.mode == "rread":
                rng = np.random.default_rng(1)
                while time.perf_counter() - t0 < args.seconds:
                    for page in rng.integers(0, n, 4096).tolist():
                        if a[page, 0] != page:  # a load alone: a read fault
                            raise AssertionError(f"data check failed at page {page}")
                    moved += 4096 * 4096
            else:
                while time.perf_counter() - t0 < args.seconds:
                    if int(a[:, 0].sum()) != n * (n - 1) // 2:
                        raise AssertionError("data check failed")
                    moved += size
            print(f"{args.mode}: {moved / (time.perf_counter() - t0) / 2**20:.0f} MiB/s")
            cpu1 = thread_cpu(d.proc.pid)
            st = c.status()
            pages = sum(st[k] - st0[k] for k in ("swapins_total", "swapouts_total"))
            print("\n".join(cpu_by_kind(d.proc.pid, cpu0, cpu1, pages)))
            print("status: " + ", ".join(f"{k} {st[k]}" for k in sorted(st) if k.endswith("_total")
                                         and isinstance(st[k], int)))
            spy.wait()
            del a
            region.close()
    finally:
        d.stop()
    try:
        for share, frame in hottest(raw, args.top):
            print(f"{share:5.1f}%  {frame}")
        if args.raw:
            shutil.copyfile(raw, args.raw)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)  # the store file: twice --size
    return 0


if __name__ == "__main__":
    sys.exit(main())
