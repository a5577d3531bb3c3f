"""`writeback.py` `start_writeback` on a region the client split into many
VMAs: random writes under a budget a quarter of the region make every
write a gathered one of scattered dirty pages, whose write-protect (one C
call for the whole write, `uffd.writeprotect_pages`, one ioctl per run)
crosses VMA boundaries; every page is written while others are under
writeback, and every value reads back. (The page-list routine itself, and
its ENOENT rule, are tests/daemon/test_writeprotect_pages.py's.)
"""
from __future__ import annotations

import textwrap

import pytest

from tests.harness import Workload, assert_audit, finish_clean, status

# Splits its region into VMAs of 3, 5 and 7 pages (MADV_RANDOM on every
# other block: the flags differ, so they stay split), fills it, then writes
# a random eighth of its pages, from its first three eighths (a budget and a
# half), round after round, each round's values tagged with the round, and
# checks every page after each round.
SPLIT_WRITER = textwrap.dedent("""
    import ctypes, sys
    import numpy as np
    import uswap
    from tests.client_program import finish, out

    sock, npages, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    P = 4096
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    MADV_RANDOM = 1
    c = uswap.connect(sock)
    r = c.alloc(npages * P)
    at, k = 0, 0
    while at < npages:
        n = (3, 5, 7)[k % 3]
        if k % 2 and libc.madvise(r.addr + at * P, min(n, npages - at) * P, MADV_RANDOM) != 0:
            raise OSError(ctypes.get_errno(), "madvise")
        at, k = at + n, k + 1
    with open("/proc/self/maps") as f:
        starts = [int(line.split("-")[0], 16) for line in f]
    out(vmas=sum(1 for s in starts if r.addr <= s < r.addr + npages * P))
    a = np.frombuffer(r.buf, dtype=np.uint64).reshape(-1, 512)
    expected = np.arange(npages, dtype=np.uint64) + 1
    a[:, 0] = expected
    rng = np.random.default_rng(7)
    hot = npages * 3 // 8  # 1.5 budgets: its pages are written while under writeback or written ahead
    bad = 0
    for gen in range(1, rounds + 1):
        pick = np.sort(rng.choice(hot, size=npages // 8, replace=False))
        for p in pick.tolist():                 # one store each: a write fault each
            a[p, 0] = expected[p] = (p << 20) | gen
        bad += int(np.count_nonzero(a[:, 0] != expected))
    out(rounds=rounds, bad=bad)
    del a
    finish(c, r, bad)
""")


@pytest.mark.parametrize("fault_threads", [4, 0], ids=["fast-path", "engine-only"])
def test_gathered_writes_across_vma_splits_lose_nothing(engine_backing, start_daemon, fault_threads):
    npages = 2048
    d = start_daemon(engine_backing, store_size="64M", max_resident="2M", config={"fault_threads": fault_threads})
    c = Workload.script(SPLIT_WRITER, d.socket, npages, 40)
    try:
        assert c.next(30)["vmas"] > npages // 8, "the region was not split"
        lines = c.finish_done(timeout=180, daemon=d)
    finally:
        c.kill()
    assert all(x.get("bad", 0) == 0 for x in lines), lines
    text = d.log_text()
    # No write-protect failed (a failure is logged, or closes the region).
    assert "UFFDIO_WRITEPROTECT" not in text and "closing (UFFDIO" not in text, text[-3000:]
    st = status(d)
    assert st["pages_written_total"] > npages, st
    assert_audit(st)
    finish_clean(d)
