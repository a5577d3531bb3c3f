#!/usr/bin/env python3
"""CPU cost per page of the access sampler (uswap/daemon/sampling.py
AccessSampler.sample: hold, drop the daemon's mapping, MADV_PAGEOUT of the
client's), on a real memfd that a child process (the client) maps shared and
this process maps read-only, as the daemon does.

    .venv/bin/python scripts/bench_sampling.py [--pages 32768] [--rounds 9]

Each round the client writes every page (back in its page tables) and the
pages are sampled in one call: all of them (runs, as a first-touch stream's
victims are) and every other one (scattered: a run per page). Prints the
median and best of this thread's CPU time (user + system) per sampled page.
"""
from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import statistics
import subprocess
import sys
import time
import types

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from uswap.daemon.sampling import AccessSampler  # noqa: E402

PAGE = 4096

# The client: maps the memfd, and writes every page each time it is asked.
CLIENT = """
import ctypes, mmap, sys
fd, n = int(sys.argv[1]), int(sys.argv[2])
m = mmap.mmap(fd, n * 4096, mmap.MAP_SHARED)
addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
for _ in sys.stdin:
    for at in range(0, n * 4096, 4096):
        m[at] = 1
    print(addr, flush=True)
"""

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pages", type=int, default=32768)
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    n = args.pages
    memfd = os.memfd_create("uswap-bench-sampling", os.MFD_CLOEXEC)
    os.ftruncate(memfd, n * PAGE)
    client = subprocess.Popen([sys.executable, "-c", CLIENT, str(memfd), str(n)], pass_fds=[memfd],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    daddr = libc.mmap(None, n * PAGE, mmap.PROT_READ, mmap.MAP_SHARED, memfd, 0)
    region = types.SimpleNamespace(id=1, owner=types.SimpleNamespace(pid=client.pid), closing=False,
                                   addr=0, daddr=daddr, size=n * PAGE, memfd=memfd)
    sampler = AccessSampler()
    try:
        for name, pages in (("runs", np.arange(n)), ("scattered", np.arange(0, n, 2))):
            per_page = []
            for _ in range(args.rounds):
                client.stdin.write("\n")
                client.stdin.flush()
                region.addr = int(client.stdout.readline())
                t0 = time.thread_time()
                if not sampler.sample(region, pages):
                    sys.exit("bench_sampling.py: the sampler refused the client's pages")
                per_page.append((time.thread_time() - t0) / len(pages) * 1e6)
            print(f"{name:10s} {len(pages):7d} pages: {statistics.median(per_page):.2f} µs CPU/page median,"
                  f" {min(per_page):.2f} best of {args.rounds}")
    finally:
        client.stdin.close()
        client.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
