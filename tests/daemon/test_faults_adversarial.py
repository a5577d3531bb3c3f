"""Adversarial clients against the fault path: what a client may do to its
own region (split and merge its VMAs, mlock and munlock parts of it, flip
O_NONBLOCK on its uffd, read its own uffd) never costs it data and never
stalls anyone else; what it must not do (unregister part of its region) may
cost it its region, but never another client's progress or the daemon.

Every run is bounded by a deadline in the client (seconds of churn) and in
the test (timeouts on every wait); every page a client wrote is verified.
"""
from __future__ import annotations

import textwrap

import pytest

from tests.harness import Workload, assert_audit, finish_clean, status

# A client whose worker threads write and verify their own stripes of a
# region (page p belongs to thread p % THREADS and holds the last value that
# thread wrote there) while one more thread does `mode` to the region, until
# the deadline. Output: {"ready"}, then {"rounds", "bad", "churn"}, {"done"}.
CHURN = textwrap.dedent("""
    import ctypes, fcntl, os, select, struct, sys, threading, time
    import numpy as np
    import uswap
    from uswap import uffd as U
    from tests.client_program import finish, out, run_threads

    sock, mode, npages, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    THREADS, P = 4, 4096
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    libc.mlock.argtypes = libc.munlock.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    PROT_RW, PROT_RWX = 3, 7
    MADV_NORMAL, MADV_RANDOM = 0, 1
    c = uswap.connect(sock)
    r = c.alloc(npages * P)
    a = np.frombuffer(r.buf, dtype=np.uint64).reshape(-1, 512)
    stats = {"rounds": 0, "bad": 0, "churn": 0}
    lock = threading.Lock()
    out(ready=True, region=r.id)
    deadline = time.monotonic() + seconds

    def worker(t):
        pages = np.arange(t, npages, THREADS)
        rng = np.random.default_rng(t)
        expected = np.zeros(len(pages), np.uint64)   # untouched pages read as zeros
        gen = 0
        while time.monotonic() < deadline:
            gen += 1
            pick = rng.choice(len(pages), size=max(1, len(pages) // 4), replace=False)
            values = (pages[pick].astype(np.uint64) << np.uint64(20)) | np.uint64(gen)
            a[pages[pick], 0] = values
            expected[pick] = values
            bad = int(np.count_nonzero(a[pages, 0] != expected))
            with lock:
                stats["rounds"] += 1
                stats["bad"] += bad

    def ok(ret, what):
        if ret != 0:
            raise OSError(ctypes.get_errno(), what)

    def churn():
        rng = np.random.default_rng(99)
        fd = r._uffd
        while time.monotonic() < deadline:
            first = int(rng.integers(0, npages - 1))
            n = int(rng.integers(1, min(64, npages - first) + 1))
            at, size = r.addr + first * P, n * P
            if mode == "vma":
                # Flags that differ split the VMA; putting them back merges it.
                ok(libc.mprotect(at, size, PROT_RWX), "mprotect rwx")
                ok(libc.madvise(at, size, MADV_RANDOM), "madvise random")
                ok(libc.mprotect(at, size, PROT_RW), "mprotect rw")
                ok(libc.madvise(at, size, MADV_NORMAL), "madvise normal")
            elif mode == "mlock":
                ok(libc.mlock(at, size), "mlock")
                ok(libc.munlock(at, size), "munlock")
            elif mode == "nonblock":
                fl = fcntl.fcntl(fd, fcntl.F_GETFL)
                fcntl.fcntl(fd, fcntl.F_SETFL, fl & ~os.O_NONBLOCK)
                fcntl.fcntl(fd, fcntl.F_SETFL, fl | os.O_NONBLOCK)
            elif mode == "steal":
                # Read our own uffd, as the daemon does, and wake the thread
                # of every fault taken from under the daemon: it faults again.
                if not select.select([fd], [], [], 0.05)[0]:
                    continue
                try:
                    raw = os.read(fd, 32 * 16)
                except BlockingIOError:
                    continue
                for off in range(0, len(raw), 32):
                    event = raw[off]
                    if event == 0x12:   # UFFD_EVENT_PAGEFAULT
                        addr = struct.unpack_from("Q", raw, off + 16)[0]
                        U.wake(fd, addr & ~(P - 1), P)
                        stats["stolen"] = stats.get("stolen", 0) + 1
            stats["churn"] += 1

    run_threads([threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
                + [threading.Thread(target=churn)])
    out(**stats)
    del a
    finish(c, r, stats["bad"])
""")


def _good_client(d) -> Workload:
    """A well-behaved client that verifies every page it wrote."""
    return Workload(d.socket, "--size", "2M", "--passes", "3", "--threads", "2")


@pytest.mark.parametrize("fault_threads", [4, 0], ids=["fast-path", "engine-only"])
@pytest.mark.parametrize("mode", ["vma", "mlock"])
def test_churning_client_keeps_its_data_and_stalls_nobody(engine_backing, start_daemon, mode, fault_threads):
    """Four threads write and verify a region under heavy reclaim while a
    fifth splits and merges its VMAs; a well-behaved client runs alongside
    and must finish. Both stores: the loads' timing against the churn
    differs."""
    _churn(start_daemon(engine_backing, store_size="64M", max_resident="1M", config={"fault_threads": fault_threads}), mode)


@pytest.mark.parametrize("fault_threads", [4, 0], ids=["fast-path", "engine-only"])
@pytest.mark.parametrize("mode", ["nonblock", "steal"])
def test_client_playing_with_its_uffd_stalls_nobody(file_backing, start_daemon, mode, fault_threads):
    """The same, while the fifth thread flips O_NONBLOCK on the uffd or
    reads the uffd itself (what reaches the daemon's reads does not depend
    on the store)."""
    _churn(start_daemon(file_backing, store_size="64M", max_resident="1M", config={"fault_threads": fault_threads}),
           mode)


def _churn(d, mode: str) -> None:
    churn = Workload.script(CHURN, d.socket, mode, 1024, 2.5)
    good = None
    try:
        assert churn.next(30)["ready"]
        good = _good_client(d)
        good.finish_ok(timeout=90)
        lines = churn.finish_done(timeout=90, daemon=d)
    finally:
        churn.kill()
        if good is not None:
            good.kill()
    result = lines[-2]
    assert result["bad"] == 0 and result["rounds"] > 0 and result["churn"] > 0, lines
    if mode == "steal":
        assert result.get("stolen", 0) > 0, result   # it did take faults from under the daemon
    text = d.log_text()
    # Flipping O_NONBLOCK is no reason to close the region. (A closing on an
    # ioctl error is not looked for: the client's own free, racing a late
    # read-ahead COPY, legitimately shows up as one. Had the region been
    # closed mid-run, its threads would have hung or read wrong data.)
    assert "reading its userfaultfd failed" not in text, text[-3000:]
    st = status(d)
    assert st["swapouts_total"] > 0, st
    assert_audit(st)
    finish_clean(d, stop_timeout=60)


# A client that fills its region (so reclaim must take its pages to serve
# anyone else) and then unregisters pages from the uffd it gave the daemon:
# "drop" leaves its upper half unregistered, "own" registers all of it with
# a uffd of the client's own. Then it idles until killed.
HOG = textwrap.dedent("""
    import sys
    import numpy as np
    import uswap
    from uswap import uffd as U
    from tests.client_program import out

    sock, how, npages = sys.argv[1], sys.argv[2], int(sys.argv[3])
    c = uswap.connect(sock)
    r = c.alloc(npages * 4096)
    a = np.frombuffer(r.buf, dtype=np.uint64).reshape(-1, 512)
    a[:, 0] = np.arange(npages, dtype=np.uint64) + 1
    # The upper half, or all of it when registering it with a uffd of its own.
    first = 0 if how == "own" else npages // 2 * 4096
    U.unregister(r._uffd, r.addr + first, npages * 4096 - first)
    if how == "own":
        mine = U.open_uffd()
        U.register(mine, r.addr, npages * 4096, U.REGISTER_MISSING | U.REGISTER_WP | U.REGISTER_MINOR)
    out(ready=True)
    sys.stdin.readline()
""")


@pytest.mark.parametrize("how", ["drop", "own"])
def test_client_unregistering_its_region_stalls_nobody(engine_backing, start_daemon, how):
    """The hog's pages fill the budget; a well-behaved client can only run
    if reclaim gets past pages it can no longer write-protect."""
    d = start_daemon(engine_backing, store_size="64M", max_resident="1M")
    hog = Workload.script(HOG, d.socket, how, 256)
    good = None
    try:
        assert hog.next(30) == {"ready": True}
        good = _good_client(d)
        good.finish_ok(timeout=90)
        status(d)
    finally:
        hog.kill()
        if good is not None:
            good.kill()
    finish_clean(d, stop_timeout=60)


# A client that moves its mlock from one range to another of the same size
# (mlock the new one, munlock the old one) while the daemon is idle, so its
# locked memory (VmLck) reads the same before and after; then it keeps
# reclaim busy on the rest of the region and looks (mincore) whether the
# newly locked range stayed in memory. The newly locked range was read just
# before, so its pages are resident and may sit in the daemon's victim queue.
MOVING_LOCK = textwrap.dedent("""
    import ctypes, sys, time
    import numpy as np
    import uswap
    from tests.client_program import finish, out

    sock, npages, span, phases = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    P = 4096
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mlock.argtypes = libc.munlock.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)
    c = uswap.connect(sock)
    r = c.alloc(npages * P)
    a = np.frombuffer(r.buf, dtype=np.uint64).reshape(-1, 512)
    ids = np.arange(npages, dtype=np.uint64)
    a[:, 0] = ids + 1
    ranges = [(npages - 2 * span, npages - span), (npages - span, npages)]
    low = npages - 2 * span
    rng = np.random.default_rng(3)

    def lock(which, on):
        first, end = ranges[which]
        fn = libc.mlock if on else libc.munlock
        if fn(r.addr + first * P, (end - first) * P) != 0:
            raise OSError(ctypes.get_errno(), "mlock" if on else "munlock")

    def resident(which):
        first, end = ranges[which]
        vec = ctypes.create_string_buffer(end - first)
        assert libc.mincore(r.addr + first * P, (end - first) * P, vec) == 0
        return sum(b & 1 for b in vec.raw)

    def press(pages):
        idx = rng.choice(low, size=pages, replace=False)
        a[idx, 0] = ids[idx] + 1
        return int(np.count_nonzero(a[idx, 0] != ids[idx] + 1))

    def idle():
        # No eviction in flight and none starting: the next mlock lands
        # between two reclaim steps, never inside one. An eviction already
        # under way when the range is locked may still finish (its punch
        # was decided before the lock could be seen; the page's data is
        # safe, see punch.py), so none may be: no write, no punch.
        deadline = time.monotonic() + 30
        last = None
        while time.monotonic() < deadline:
            st = c.status()
            now = (st["swapouts_total"], st["writeback_inflight"], st["punching_pages"])
            if now == last and now[1] == 0 and now[2] == 0:
                return
            last = now
            time.sleep(0.02)
        raise AssertionError("the daemon never went idle")

    locked, bad, evicted, before = 0, 0, [], []
    PRESS = int(sys.argv[5])
    lock(locked, True)
    for phase in range(phases):
        other = 1 - locked
        bad += press(PRESS)
        first, end = ranges[other]
        a[first:end, 0] = ids[first:end] + 1   # in, and active (written after its read)
        bad += press(32)   # a few reclaim steps, from the queue's front
        idle()
        before.append(resident(other))
        lock(other, True)
        lock(locked, False)
        locked = other
        assert resident(locked) == span
        s0 = c.status()["swapouts_total"]
        while c.status()["swapouts_total"] < s0 + npages:
            bad += press(64)
        evicted.append(span - resident(locked))
    out(bad=bad, evicted=evicted, before=before)
    del a
    finish(c, r, bad)
""")


def test_moved_mlock_is_never_evicted(file_backing, start_daemon):
    """Moving an mlock to another range of the same size leaves the
    client's VmLck unchanged; the daemon must still see the new range."""
    d = start_daemon(file_backing, store_size="64M", max_resident="1M")
    client = Workload.script(MOVING_LOCK, d.socket, 1024, 16, 8, 128)
    try:
        lines = client.finish_done(timeout=90)
    finally:
        client.kill()
    result = lines[-2]
    assert result["bad"] == 0, result
    # The premise: the newly locked range was in memory when it was locked.
    assert all(n == 16 for n in result["before"]), result
    assert not any(result["evicted"]), result
    finish_clean(d, stop_timeout=60)


# A client that write(2)s into its own memfd from a buffer in its own
# region (pages of it evicted) while another of its threads keeps reclaim
# busy. The write holds the memfd's inode lock while it waits for its fault
# on the source page to be served.
MEMFD_WRITER = textwrap.dedent("""
    import os, sys, threading, time
    import numpy as np
    import uswap
    from tests.client_program import out, run_threads

    sock, npages, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    P = 4096
    c = uswap.connect(sock)
    r = c.alloc(npages * P)
    a = np.frombuffer(r.buf, dtype=np.uint64).reshape(-1, 512)
    a[:, 0] = np.arange(npages, dtype=np.uint64) + 1
    half = npages // 2
    deadline = time.monotonic() + seconds
    out(ready=True)
    stats = {"writes": 0, "touches": 0}

    def writer():
        rng = np.random.default_rng(1)
        while time.monotonic() < deadline:
            src = int(rng.integers(0, half))
            os.pwrite(r._memfd, r.buf[src * P:(src + 1) * P], (half + src) * P)
            stats["writes"] += 1

    def toucher():
        rng = np.random.default_rng(2)
        while time.monotonic() < deadline:
            a[rng.integers(0, half, 64), 1] += 1
            stats["touches"] += 1

    run_threads([threading.Thread(target=writer), threading.Thread(target=toucher)])
    out(**stats)
    out(done=True)
""")


def test_client_writing_its_memfd_from_its_region_stalls_nobody(file_backing, start_daemon):
    """fallocate(PUNCH_HOLE) takes the memfd's inode lock, which the
    client's write(2) holds while its fault on an evicted source page waits
    to be served. The engine once punched evicted pages holding the page
    lock (so it slept in shmem_fallocate for ever and every client and
    control request stalled); it now punches on an I/O thread, the pages
    PUNCHING meanwhile (engine._punch)."""
    d = start_daemon(file_backing, store_size="64M", max_resident="1M")
    writer = Workload.script(MEMFD_WRITER, d.socket, 1024, 3)
    good = None
    try:
        assert writer.next(30) == {"ready": True}
        good = _good_client(d)
        good.finish_ok(timeout=20)
        lines = writer.finish_done(timeout=30)
        status(d)
    finally:
        writer.kill()
        if good is not None:
            good.kill()
    assert lines[-2]["writes"] > 0, lines
    finish_clean(d, stop_timeout=60)


# Threads that each allocate a small region, write and verify it, and free
# it, over and over: the fast path's region slots are closed and reused
# (a new generation each time) while other threads fault on theirs.
SLOT_CHURN = textwrap.dedent("""
    import sys, threading, time
    import numpy as np
    import uswap
    from tests.client_program import out, run_threads

    sock, npages, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    deadline = time.monotonic() + seconds
    MIN_EACH = 4
    stats = {"regions": 0, "bad": 0}
    lock = threading.Lock()

    def churn(t):
        c = uswap.connect(sock)
        ids = np.arange(npages, dtype=np.uint64)
        k = 0
        # At least MIN_EACH regions each, however slow the machine: the
        # test's count of regions must not depend on load.
        while k < MIN_EACH or time.monotonic() < deadline:
            k += 1
            r = c.alloc(npages * 4096)
            a = np.frombuffer(r.buf, dtype=np.uint64).reshape(-1, 512)
            a[:, 0] = ids * np.uint64(1000) + np.uint64(k)
            a[::3, 1] = ids[::3]
            bad = int(np.count_nonzero(a[:, 0] != ids * np.uint64(1000) + np.uint64(k)))
            bad += int(np.count_nonzero(a[::3, 1] != ids[::3]))
            del a
            r.close()
            with lock:
                stats["regions"] += 1
                stats["bad"] += bad
        c.close()

    run_threads([threading.Thread(target=churn, args=(t,)) for t in range(3)])
    out(**stats)
    out(done=True)
""")


def test_region_slots_reused_under_faults(file_backing, start_daemon):
    """Regions freed while other regions' faults are read and served: a
    stale wake-up for a freed slot must never read the next region's uffd
    (fastpath.c fp_reader_enter), and no data is lost. The budget is half of one region, so every region swaps
    even when the threads do not overlap."""
    d = start_daemon(file_backing, store_size="64M", max_resident="256K")
    c = Workload.script(SLOT_CHURN, d.socket, 128, 3)
    try:
        lines = c.finish_done(timeout=60)
    finally:
        c.kill()
    assert lines[-2]["bad"] == 0 and lines[-2]["regions"] > 10, lines
    st = status(d)
    assert st["swapouts_total"] > 0, st
    finish_clean(d, stop_timeout=60)
