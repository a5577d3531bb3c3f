"""A reviewer's stress of fastpath.c `fp_take_minor` on DIRTY pages against
forks (branch dminor: a dirty RESIDENT page's MINOR fault is mapped writable
on a C fault thread unless a forked child still reads it, cow.py's share
counts through fp_region.shares).

The parent keeps several threads writing random pages of a region (each
write an 8-byte tag, (generation << 32 | page), in the page's first and last
word, through ctypes so the GIL is let go while a thread waits on its fault)
and taking pages out of its page tables (MADV_DONTNEED of its MAP_SHARED
mapping: the next touch of a dirty page is a MINOR fault), while its main
thread forks again and again. Each fork is taken with every writer stopped
(each writer's lock held), so the child's snapshot is exactly the
generations at that moment. Each child, while the parent keeps writing,
reads every page again and again (dropping them from its own page tables
between rounds), writes some of its own and checks again; a parent's write
that reached the child (a dirty page mapped writable while the child still
read it from the parent) shows as a wrong tag there. Children exit while
others are still reading (their regions close, their links to the parent go).
With a roomy budget the pages stay RESIDENT and dirty (the new path's case);
with a tight one they are also written back, evicted and swapped in
meanwhile. Data on both sides, exact audit, no illegal transition.
"""
from __future__ import annotations

import textwrap

import pytest

from tests.harness import Workload, assert_audit, finish_clean, status

STRESS = textwrap.dedent("""
    import ctypes, os, random, sys, threading, time
    import numpy as np
    import uswap
    from tests.client_program import finish, out

    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    MADV_DONTNEED = 4

    sock, npages, writers, seconds, max_kids = sys.argv[1], *map(int, sys.argv[2:6])
    c = uswap.connect(sock)
    r = c.alloc(npages * 4096)
    base = r.addr
    a = np.frombuffer(r.buf, dtype=np.uint64).reshape(-1, 512)
    ids = np.arange(npages, dtype=np.uint64)
    gen = [1] * npages             # generation written last, per page (writer k owns pages p % writers == k)
    a[:, 0] = (np.uint64(1) << np.uint64(32)) | ids
    a[:, 511] = a[:, 0]

    def dontneed(first, n):
        assert libc.madvise(base + first * 4096, n * 4096, MADV_DONTNEED) == 0, ctypes.get_errno()

    def put(p, g):
        # ctypes calls let the GIL go: the other threads run while this one faults.
        t = ctypes.c_uint64((g << 32) | p)
        ctypes.memmove(base + p * 4096, ctypes.addressof(t), 8)
        ctypes.memmove(base + p * 4096 + 4088, ctypes.addressof(t), 8)

    def got(p):
        t = (ctypes.c_uint64 * 2)()
        ctypes.memmove(ctypes.addressof(t), base + p * 4096, 8)
        ctypes.memmove(ctypes.addressof(t) + 8, base + p * 4096 + 4088, 8)
        return t[0], t[1]

    def bad_of(want):
        t = (np.array(want, np.uint64) << np.uint64(32)) | ids
        return int(np.count_nonzero((a[:, 0] != t) | (a[:, 511] != t)))

    out(filled=npages)
    sys.stdin.readline()

    locks = [threading.Lock() for _ in range(writers)]
    stop = threading.Event()
    wbad = [0] * writers
    wrote = [0] * writers

    def writer(k):
        rng = random.Random(k)
        mine = list(range(k, npages, writers))
        while not stop.is_set():
            with locks[k]:
                for p in rng.sample(mine, 8):
                    gen[p] += 1
                    put(p, gen[p])
                    wrote[k] += 1
            if rng.random() < 0.5:
                first = rng.randrange(npages)
                dontneed(first, min(rng.randrange(1, 64), npages - first))
            for p in rng.sample(mine, 4):
                t = (gen[p] << 32) | p
                if got(p) != (t, t):
                    wbad[k] += 1

    def child(snap):
        rng = random.Random(os.getpid())
        bad = bad_of(snap)                 # at once: the parent writes on meanwhile
        for _ in range(6):
            dontneed(0, npages)            # every page read again: MINOR faults here too
            bad += bad_of(snap)
        own = rng.sample(range(npages), npages // 8)
        for p in own:                      # the child's own writes stay its own
            snap[p] += 1000
            put(p, snap[p])
        dontneed(0, npages)
        bad += bad_of(snap)
        os._exit(min(bad, 100))

    threads = [threading.Thread(target=writer, args=(k,), daemon=True) for k in range(writers)]
    for t in threads:
        t.start()
    kids, forks, kid_bad = [], 0, []
    rng = random.Random(99)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        # Dirty pages out of the page tables, then (often) a fork at once:
        # the parent's next touches are MINOR faults on shared dirty pages.
        first = rng.randrange(npages)
        dontneed(first, npages - first)
        for l in locks:
            l.acquire()
        try:
            snap = list(gen)
            pid = os.fork()
            if pid == 0:
                child(snap)
        finally:
            for l in locks:
                l.release()
        forks += 1
        kids.append(pid)
        while len(kids) >= max_kids:
            code = os.waitstatus_to_exitcode(os.waitpid(kids.pop(0), 0)[1])
            if code:
                kid_bad.append(code)
    stop.set()
    for t in threads:
        t.join()
    for pid in kids:
        code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        if code:
            kid_bad.append(code)
    dontneed(0, npages)
    end_bad = bad_of(gen)
    out(bad={"writers": sum(wbad), "end": end_bad, "children": kid_bad}, forks=forks, wrote=sum(wrote))
    del a
    finish(c, r, sum(wbad) + end_bad + len(kid_bad))
""")


@pytest.mark.deadline(240)
@pytest.mark.parametrize("budget", ["roomy", "tight"])
def test_forks_under_dirty_minor_faults_keep_every_snapshot(engine_backing, start_daemon, budget):
    """Parent threads write and drop pages while the parent forks again and
    again; every child reads exactly its snapshot, the parent its own
    writes; audit exact."""
    npages, writers, seconds, max_kids = 1024, 3, 15, 3
    d = start_daemon(engine_backing, store_size="128M", max_resident="64M" if budget == "roomy" else "2M")
    w = Workload.script(STRESS, d.socket, npages, writers, seconds, max_kids)
    try:
        w.next(60)
        before = status(d)
        w.send()
        res = w.wait_line(lambda x: "bad" in x, seconds + 120)
        after = status(d)
        w.finish_done(timeout=60, daemon=d)
    finally:
        w.kill()
    assert res["bad"] == {"writers": 0, "end": 0, "children": []}, (res, after["fork"])
    assert res["forks"] >= 5, res
    fast = after["fast_path_minor_faults_total"] - before["fast_path_minor_faults_total"]
    assert after["illegal_transitions_total"] == 0, after
    print("forks", res["forks"], "writes", res["wrote"], "fast minor", fast,
          "minor", after["minor_faults_total"] - before["minor_faults_total"],
          "passed", after["fast_path_passed_faults"], "copied", after["fork"]["fork_copied_pages_total"])
    assert_audit(after)
    finish_clean(d)
