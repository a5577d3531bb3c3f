"""A client that splits its region's VMA (mprotect, mlock or madvise on part
of it) keeps being served.

A multi-page UFFDIO_COPY across a VMA boundary fails with ENOENT although
every page of it is registered; the daemon used to take that for "client
gone", close the region, and leave the client hanging (or dying of SIGSEGV)
on its next touch. Zero-fill windows, read-ahead windows and write-protect
runs all cross the boundaries here, on the engine's path and on the fast
path's.
"""
from __future__ import annotations

import signal
import textwrap

import pytest

from tests.harness import Workload, assert_audit, assert_no_io_overlap, finish_clean, inject, status, wait_for

# Fills a region (a first-touch stream: zero-fill windows), reads it back in
# order twice (swap-in read-ahead windows), rewrites it (write-protect faults
# and writeback runs), and checks every page. Before any touch, parts of the
# region get VMA flags of their own: MADV_RANDOM on one range, mprotect to
# read-only and back on another (the flags differ, so the VMAs stay split:
# VM_RAND_READ; the mprotect'ed range is split and merged again), and
# MADV_DONTDUMP on a third (every region is DONTFORK already).
SPLITTER = textwrap.dedent("""
    import ctypes, sys
    import numpy as np
    import uswap
    from tests.client_program import finish, out

    sock, npages = sys.argv[1], int(sys.argv[2])
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    MADV_RANDOM, MADV_DONTDUMP = 1, 16
    PROT_READ, PROT_WRITE = 1, 2
    MAGIC = np.uint64(0x5EED_0B0B_0000_0000)
    c = uswap.connect(sock)
    r = c.alloc(npages * 4096)
    P = 4096
    for what, ret in (
        ("madvise", libc.madvise(r.addr + 301 * P, 250 * P, MADV_RANDOM)),
        ("mprotect", libc.mprotect(r.addr + 777 * P, 3 * P, PROT_READ)),
        ("mprotect", libc.mprotect(r.addr + 777 * P, 3 * P, PROT_READ | PROT_WRITE)),
        ("madvise", libc.madvise(r.addr + 1501 * P, 97 * P, MADV_DONTDUMP)),
    ):
        assert ret == 0, (what, ctypes.get_errno())
    with open("/proc/self/maps") as f:
        vmas = sum(1 for line in f if int(line.split("-")[0], 16) >= r.addr
                   and int(line.split("-")[0], 16) < r.addr + npages * P)
    out(region=r.id, vmas=vmas)
    a = np.frombuffer(r.buf, dtype=np.uint64).reshape(-1, 512)
    ids = np.arange(npages, dtype=np.uint64)
    a[:, 0] = ids ^ MAGIC                       # first touch, in order
    out(filled=npages)
    for round in range(2):
        bad = int(np.count_nonzero(a[:, 0] != ids ^ MAGIC))   # sequential swap-in
        out(read=round, bad=bad)
        if bad:
            sys.exit(3)
    a[:, 1] = ids + 7                           # rewrite: WP faults, writeback runs
    bad = int(np.count_nonzero((a[:, 0] != ids ^ MAGIC) | (a[:, 1] != ids + 7)))
    out(verified=npages, bad=bad)
    del a
    finish(c, r, bad)
""")


@pytest.mark.parametrize("fault_threads", [4, 0], ids=["fast-path", "engine-only"])
def test_split_region_is_served_across_vma_boundaries(engine_backing, start_daemon, fault_threads):
    d = start_daemon(engine_backing, store_size="64M", max_resident="1M", config={"fault_threads": fault_threads})
    c = Workload.script(SPLITTER, d.socket, 2048)
    try:
        first = c.next(30)
        # madvise on one range and DONTDUMP on another: 5 VMAs (the mprotect
        # range merged back into its neighbours).
        assert first["vmas"] >= 5, first
        lines = c.finish_done(timeout=120, daemon=d)
    finally:
        c.kill()
    assert all(x.get("bad", 0) == 0 for x in lines), lines
    text = d.log_text()
    assert "closing (UFFDIO" not in text, text[-3000:]
    st = status(d)
    assert st["swapouts_total"] > 2048 and st["readahead_pages_total"] > 0, st
    assert_audit(st)
    finish_clean(d)


# The head of both unmapping programs (argv: SOCKET NPAGES LO HI): a region
# of NPAGES pages, page p tagged p + 1 in word 0; the hole to unmap is
# [LO, HI), `rest` the pages outside it.
UNMAP_HEAD = """
    import ctypes, sys
    import numpy as np
    import uswap
    from tests.client_program import finish, out

    sock, npages, lo, hi = sys.argv[1], *map(int, sys.argv[2:5])
    P = 4096
    libc = ctypes.CDLL(None, use_errno=True)
    libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    c = uswap.connect(sock)
    r = c.alloc(npages * P)
    a = np.frombuffer(r.buf, dtype=np.uint64).reshape(-1, 512)
    ids = np.arange(npages, dtype=np.uint64)
    rest = np.r_[0:lo, hi:npages]
    a[:, 0] = ids + 1
"""


# Unmaps a middle part of its region while reclaim is busy, then grows the
# first part back over the hole in place (mremap without MREMAP_MAYMOVE: the
# grown VMA keeps the uffd registration). Every page is tagged with its index
# and a generation in word 0 and 1; the pages outside the hole are checked
# after the unmap, the regrown ones must read zeros, then hold what is written.
UNMAPPER = textwrap.dedent(UNMAP_HEAD + """
    import threading
    libc.mremap.restype = ctypes.c_void_p
    libc.mremap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int)
    a[:, 1] = 1
    out(filled=npages)
    sys.stdin.readline()
    # Rewrite the pages either side of the hole while the hole is unmapped,
    # so reclaim writes back and swaps in around it; dirty the hole's pages
    # just before the unmap so some are in writeback when it lands.
    stop = threading.Event()
    def rewrite():
        gen = 2
        while not stop.is_set():
            a[rest, 1] = gen
            gen += 1
    t = threading.Thread(target=rewrite)
    t.start()
    a[lo:hi, 1] = 2
    a[lo:hi:3, 0] = ids[lo:hi:3] + 1                # swap in a third of the hole
    ret = libc.munmap(r.addr + lo * P, (hi - lo) * P)
    assert ret == 0, ctypes.get_errno()
    stop.set()
    t.join()
    bad = int(np.count_nonzero(a[rest, 0] != ids[rest] + 1))
    out(unmapped=hi - lo, bad=bad)
    sys.stdin.readline()
    new = libc.mremap(r.addr, lo * P, hi * P, 0)     # grow the first part back over the hole
    assert new == r.addr, (new, ctypes.get_errno())
    nonzero = int(np.count_nonzero(a[lo:hi].any(axis=1)))
    a[lo:hi, 0] = ids[lo:hi] + 7
    a[lo:hi, 1] = 9
    bad_regrown = int(np.count_nonzero((a[lo:hi, 0] != ids[lo:hi] + 7) | (a[lo:hi, 1] != 9)))
    bad_rest = int(np.count_nonzero(a[rest, 0] != ids[rest] + 1))
    out(regrown=hi - lo, nonzero=nonzero, bad_regrown=bad_regrown, bad_rest=bad_rest)
    del a
    finish(c, r, nonzero + bad_regrown + bad_rest)
""")


def _settled(d):
    st = status(d)
    return st if st["writeback_inflight"] == 0 and st["reads_inflight"] == 0 and st["audit"] else None


@pytest.mark.parametrize("fault_threads", [4, 0], ids=["fast-path", "engine-only"])
def test_unmapping_part_forgets_only_that_part(engine_backing, start_daemon, fault_threads):
    """munmap of a middle part under reclaim: the region stays served (the
    daemon used to close it, and the client hung on its evicted pages), the
    unmapped pages' slots are freed, accounting stays exact, and a mapping
    grown back in place over the hole reads zeros, then holds new writes."""
    npages, lo, hi = 2048, 512, 1536
    d = start_daemon(engine_backing, store_size="64M", max_resident="1M", config={"fault_threads": fault_threads})
    c = Workload.script(UNMAPPER, d.socket, npages, lo, hi)
    try:
        c.next(60)
        before = wait_for("writes settled", lambda: _settled(d), 30)
        # 2048 pages through a 256-page budget: most of them hold a slot.
        assert before["store"]["used_bytes"] > (npages - (hi - lo)) * 4096, before
        c.send()
        unmapped = c.next(120)
        assert unmapped == {"unmapped": hi - lo, "bad": 0}, unmapped
        after = wait_for("writes settled", lambda: _settled(d), 30)
        assert_audit(after)
        # Only the pages outside the hole can still hold a slot.
        assert after["store"]["used_bytes"] <= (npages - (hi - lo)) * 4096, after
        c.send()
        regrown = c.next(120)
        assert regrown == {"regrown": hi - lo, "nonzero": 0, "bad_regrown": 0, "bad_rest": 0}, regrown
        c.finish_done(timeout=60, daemon=d)
    finally:
        c.kill()
    text = finish_clean(d)
    assert "closing (unmapped" not in text and "closing (UFFDIO" not in text, text[-3000:]


# Fills its region, dirties the pages of a middle part, and unmaps that
# part when told (while the parent has their writeback in flight, slowed
# down); then checks the rest.
SLOW_UNMAPPER = textwrap.dedent(UNMAP_HEAD + """
    out(filled=npages)
    sys.stdin.readline()
    a[lo:hi, 1] = 5                                  # dirty the part
    out(dirtied=hi - lo)
    sys.stdin.readline()
    assert libc.munmap(r.addr + lo * P, (hi - lo) * P) == 0, ctypes.get_errno()
    bad = int(np.count_nonzero(a[rest, 0] != ids[rest] + 1))
    out(unmapped=hi - lo, bad=bad)
    sys.stdin.readline()
    del a
    finish(c, r, bad)
""")


def test_unmapping_pages_under_writeback_forgets_them_when_the_write_returns(backing, start_daemon):
    """Pages unmapped while their store write is in flight (every write
    slowed down to 4 s) cannot change state until it returns; then they
    are forgotten: accounting exact, their slots freed, the rest intact.

    The writes are caused, not waited for: after the dirty pass the
    charged pages sit between the watermarks and nothing is written (the
    test used to hope the dirty pass's last write was still in flight,
    and under load it was not: CI timed out). Lowering the budget by
    SIGHUP makes reclaim write the dirty part, slowly."""
    npages, lo, hi = 1024, 256, 768
    d = start_daemon(backing, store_size="64M", max_resident=None, config={"max_resident": "1M"}, inject={})
    c = Workload.script(SLOW_UNMAPPER, d.socket, npages, lo, hi)
    try:
        c.next(60)
        wait_for("writes settled", lambda: _settled(d), 30)
        c.send()
        c.next(60)  # the part is dirty; about a budget's worth of it resident
        inject(d, {"write_delay": 4.0})
        d.write_config({"max_resident": "256K"})
        d.proc.send_signal(signal.SIGHUP)
        wait_for("the part's pages under writeback", lambda: status(d)["writeback_inflight"] > 0, 30)
        c.send()
        unmapped = c.next(60)
        assert unmapped == {"unmapped": hi - lo, "bad": 0}, unmapped
        during = status(d)
        inject(d, {"write_delay": 0})
        after = wait_for("writes settled", lambda: _settled(d), 30)
        c.send()  # now it may close its region
        c.finish_done(timeout=60, daemon=d)
    finally:
        c.kill()
    assert during["forgotten_after_io_total"] > 0, during
    assert after["forgotten_pages_total"] >= hi - lo, after
    assert after["store"]["used_bytes"] <= (npages - (hi - lo)) * 4096, after
    assert_audit(after)
    assert_no_io_overlap(after)
    text = finish_clean(d)
    assert "closing (unmapped" not in text, text[-3000:]
