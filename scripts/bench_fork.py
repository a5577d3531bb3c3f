#!/usr/bin/env python3
"""Cost of os.fork() in a process holding a uswap region, next to the
kernel's fork of the same amount of plain shared memory, in the same run.

    .venv/bin/python scripts/bench_fork.py [--size 1G] [--forks 10] [--store file|nfs]

A daemon with a budget of size/4 serves a region of `size` written once, so
about 3/4 of it is swapped out and the resident quarter is dirty. Then, for
`--forks` forks each:
  parent  — os.fork() in the parent, from the call to its return (the
            fork_begin request, the fork, closing the keep-alive fd);
  child   — from the call in the parent to os.fork() returning in the child
            (its hook has mapped and registered its copy: ready to use);
the child exits at once, and the next fork waits until the daemon has
released its snapshot. The same is measured with the resident quarter clean
(after a read pass), and, as the baseline, for a process holding `size` of
plain MAP_SHARED memfd memory, fully populated, with no uswap region.
Prints medians and p90 in milliseconds; --json FILE writes the numbers.
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import uswap  # noqa: E402
from uswap.sizes import parse_size  # noqa: E402
from tests.daemon_proc import DaemonProc  # noqa: E402

PAGE = 4096


def time_forks(n: int, settle) -> dict:
    """Fork n times; each child reports when os.fork returned in it."""
    parent, child = [], []
    for _ in range(n):
        r, w = os.pipe()
        t0 = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            ready = time.perf_counter()
            os.write(w, repr(ready - t0).encode())
            os._exit(0)
        parent.append(time.perf_counter() - t0)
        os.close(w)
        child.append(float(os.read(r, 64)))
        os.close(r)
        os.waitpid(pid, 0)
        settle()
    ms = lambda xs, q: round(float(np.percentile(np.asarray(xs) * 1000, q)), 3)  # noqa: E731
    return {"parent_ms_median": ms(parent, 50), "parent_ms_p90": ms(parent, 90),
            "child_ms_median": ms(child, 50), "child_ms_p90": ms(child, 90)}


def wait_released(c) -> None:
    deadline = time.monotonic() + 60
    while True:
        st = c.status()
        if st["fork"]["fork_pending"] == 0 and len(st["clients"]) == 1:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the child's snapshot was not released: {st['fork']}")
        time.sleep(0.005)


def bench_uswap(backing: str, size: int, forks: int, workdir: str) -> dict:
    d = DaemonProc(workdir, backing, store_size=str(size * 2), max_resident=str(size // 4))
    try:
        with uswap.connect(d.socket) as c:
            region = c.alloc(size)
            a = np.frombuffer(region.buf, dtype=np.uint64).reshape(-1, PAGE // 8)
            a[:, 0] = np.arange(a.shape[0])
            st = c.status()
            out = {"swapped_fraction": round(st["swapped_bytes"] / size, 3)}
            out["dirty_resident"] = time_forks(forks, lambda: wait_released(c))
            assert int(a[:, 0].sum()) == a.shape[0] * (a.shape[0] - 1) // 2  # resident part now clean
            out["clean_resident"] = time_forks(forks, lambda: wait_released(c))
            out["fork_stats"] = c.status()["fork"]
            assert int(a[:, 0].sum()) == a.shape[0] * (a.shape[0] - 1) // 2, "data check failed"
            del a
            region.close()
    finally:
        d.stop()
    return out


def bench_plain(size: int, forks: int) -> dict:
    fd = os.memfd_create("bench-fork-plain")
    os.ftruncate(fd, size)
    m = mmap.mmap(fd, size, mmap.MAP_SHARED)
    a = np.frombuffer(m, dtype=np.uint64).reshape(-1, PAGE // 8)
    a[:, 0] = 1  # populated
    out = time_forks(forks, lambda: None)
    del a
    m.close()
    os.close(fd)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1G")
    ap.add_argument("--forks", type=int, default=10)
    ap.add_argument("--store", choices=("file", "nfs"), default="file")
    ap.add_argument("--nfs-url", help="nfs://host/export (for --store nfs)")
    ap.add_argument("--json")
    args = ap.parse_args()
    size = parse_size(args.size)
    with tempfile.TemporaryDirectory(prefix="uswap-bench-fork-") as work:
        if args.store == "file":
            backing = os.path.join(work, "swapfile")
        else:
            if not args.nfs_url:
                ap.error("--store nfs needs --nfs-url")
            backing = f"{args.nfs_url}/bench-fork-{os.getpid()}"
        plain_before = bench_plain(size, args.forks)
        result = {"size": size, "forks": args.forks, "store": args.store,
                  "uswap": bench_uswap(backing, size, args.forks, work),
                  "plain_memfd": plain_before}
    print(json.dumps(result, indent=2))
    u, p = result["uswap"], result["plain_memfd"]
    for kind in ("dirty_resident", "clean_resident"):
        print(f"{kind:15s} parent {u[kind]['parent_ms_median']:8.2f} ms "
              f"({u[kind]['parent_ms_median'] / p['parent_ms_median']:.1f}x plain)  child ready "
              f"{u[kind]['child_ms_median']:8.2f} ms ({u[kind]['child_ms_median'] / p['child_ms_median']:.1f}x plain)")
    print(f"plain memfd     parent {p['parent_ms_median']:8.2f} ms  child ready {p['child_ms_median']:8.2f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
