"""The victim choice in C (native/victims.h through victims.py) in a real
daemon, adversarially (a reviewer's): four client threads write random
pages of a region eight times the budget while a fifth mlocks a random
range, holds it while sampling mincore, and munlocks it again, over and
over (partly, too: an munlock of half the range splits the VMA). A locked
page must never leave memory -- except the one move README "Known limits"
allows: a clean page whose punch was under way when the lock came leaves
once, and is then touched back in; from then on it must stay. Every value
reads back at the end, the audit is exact, the daemon exits clean."""
from __future__ import annotations

import textwrap

import pytest

from tests.harness import assert_audit, finish_clean, finishing, status

CLIENT = textwrap.dedent("""
    import ctypes, json, random, sys, threading, time
    import numpy as np
    import uswap

    sock, npages, cap = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    libc = ctypes.CDLL(None, use_errno=True)
    for f in (libc.mlock, libc.munlock):
        f.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)
    c = uswap.connect(sock)
    r = c.alloc(npages * 4096)
    a = np.frombuffer(r.buf, dtype=np.uint64).reshape(-1, 512)
    WRITERS = 4
    expected = np.zeros((WRITERS, npages), np.uint64)
    stats = {"writes": 0, "locks": 0, "samples": 0, "first_misses": 0, "evicted_locked": 0,
             "partial_unlocks": 0}
    want = {"writes": 15000, "locks": 30, "samples": 600}  # ~20 s in CI (60 locks: ~40)
    deadline = time.monotonic() + cap
    print(json.dumps({"ready": True}), flush=True)

    def running():
        return time.monotonic() < deadline and any(stats[k] < n for k, n in want.items())

    def writer(t):
        rng = np.random.default_rng(t)
        while running():
            for p in rng.integers(0, npages, 64):
                v = expected[t, p] + 1
                a[p, t] = v
                expected[t, p] = v
                stats["writes"] += 1

    def locker():
        rng = random.Random(11)
        while running():
            first = rng.randrange(npages - 64)
            n = rng.randrange(1, 64)
            addr, size = r.addr + first * 4096, n * 4096
            assert libc.mlock(addr, size) == 0, ctypes.get_errno()
            stats["locks"] += 1
            vec = ctypes.create_string_buffer(n)
            missed = set()     # pages allowed their one miss (a punch under way at the lock)
            for _ in range(rng.randrange(5, 40)):
                assert libc.mincore(addr, size, vec) == 0
                stats["samples"] += 1
                gone = [i for i in range(n) if not vec.raw[i] & 1]
                for i in gone:
                    if i in missed:
                        stats["evicted_locked"] += 1
                    else:
                        missed.add(i)
                        stats["first_misses"] += 1
                    # touched back in (read: the writers' values are checked at the end)
                    int(a[first + i, 7])
                time.sleep(0.0005)     # pacing, not synchronisation: the writers keep reclaim busy
            if rng.random() < 0.3 and n > 1:
                # munlock half: the VMA splits; the other half stays locked a while
                half = n // 2
                assert libc.munlock(addr, half * 4096) == 0
                stats["partial_unlocks"] += 1
                for _ in range(10):
                    assert libc.mincore(addr + half * 4096, size - half * 4096, vec) == 0
                    stats["samples"] += 1
                    for i in range(n - half):
                        if not vec.raw[i] & 1:
                            if half + i in missed:
                                stats["evicted_locked"] += 1
                            else:
                                missed.add(half + i)
                                stats["first_misses"] += 1
                            int(a[first + half + i, 7])
                    time.sleep(0.0005)
            assert libc.munlock(addr, size) == 0

    ts = [threading.Thread(target=writer, args=(t,)) for t in range(WRITERS)]
    ts.append(threading.Thread(target=locker))
    for th in ts:
        th.start()
    for th in ts:
        th.join()
    bad = int((a[:, :WRITERS].T != expected).sum())
    stats["bad_values"] = bad
    print(json.dumps(stats), flush=True)
    del a
    r.close()
    c.close()
    print(json.dumps({"done": True}), flush=True)
""")


@pytest.mark.deadline(300)
def test_mlocked_ranges_flipping_under_reclaim_are_never_evicted(file_backing, start_daemon):
    npages = 2048                                        # 8 MiB through a 1 MiB budget
    d = start_daemon(file_backing, store_size="64M", max_resident="1M")
    with finishing(d, CLIENT, npages, 60, timeout=30) as c:
        assert c.next(30) == {"ready": True}
        stats = c.next(120)
    print(stats)
    assert stats["writes"] > 7500 and stats["locks"] > 15 and stats["samples"] > 250, stats
    st = status(d)
    assert st["swapouts_total"] > 4 * npages, st          # reclaim was busy all along
    assert stats["evicted_locked"] == 0, stats
    assert stats["bad_values"] == 0, stats
    assert_audit(st)
    finish_clean(d)
