"""Pages pinned by in-flight I/O, made safe by mlock.

A page that is the target of an O_DIRECT read is pinned by the kernel, and
the device writes it without any fault the daemon could see: written back
and punched mid-transfer, what the device writes after the copy was taken
is lost, and the client later reads the stale slot copy. Pins cannot be
seen from userspace, so the rule (README "Known limits") is that the client
mlocks such a buffer for the duration of the I/O, and the daemon never
evicts pages in mlocked ranges. Here a client mlocks part of its region and
reads a file with O_DIRECT into it, over and over, while other threads keep
reclaim busy on the rest of the region: every read must land, and no locked
page may ever leave memory (mincore, sampled all along).
"""
from __future__ import annotations

import ctypes
import os
import textwrap

import uswap
from tests.harness import Workload, assert_audit, finish_clean, status, wait_for

LOCKED_PAGES = 64
CHUNKS = 16

CLIENT = textwrap.dedent("""
    import ctypes, json, os, random, sys, threading, time
    import numpy as np
    import uswap

    sock, datafile, npages, locked, chunks, cap = (sys.argv[1], sys.argv[2], int(sys.argv[3]),
                                                  int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6]))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mlock.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)
    c = uswap.connect(sock)
    r = c.alloc(npages * 4096)
    a = np.frombuffer(r.buf, dtype=np.uint64).reshape(-1, 512)
    size = locked * 4096
    assert libc.mlock(r.addr, size) == 0, ctypes.get_errno()
    with open(datafile, "rb") as f:
        expected = np.frombuffer(f.read(), dtype=np.uint64).reshape(chunks, -1)
    fd = os.open(datafile, os.O_RDONLY | os.O_DIRECT)
    buf = r.buf[:size]
    window = a[:locked].reshape(-1)
    # Run until every thread has done half as much again as the test asks
    # for (a fixed time did not get there on a loaded machine), or until the
    # cap. (Twice as much took 25 s of CI.)
    deadline = time.monotonic() + cap
    stats = {"io_rounds": 0, "bad_rounds": 0, "samples": 0, "evicted_samples": 0, "writes": 0}
    want = {"io_rounds": 150, "writes": 15000, "samples": 150}

    def running():
        return (time.monotonic() < deadline
                and any(stats[k] < n for k, n in want.items()))
    print(json.dumps({"ready": True}), flush=True)

    def io():
        rng = random.Random(5)
        while running():
            k = rng.randrange(chunks)
            assert os.preadv(fd, [buf], k * size) == size
            stats["io_rounds"] += 1
            if not np.array_equal(window, expected[k]):
                stats["bad_rounds"] += 1

    def pressure(t):
        rng = np.random.default_rng(t)
        while running():
            for p in rng.integers(locked, npages, 64):
                a[p, t] += 1
                stats["writes"] += 1

    def watch():
        vec = ctypes.create_string_buffer(locked)
        while running():
            assert libc.mincore(r.addr, size, vec) == 0
            stats["samples"] += 1
            if any(b & 1 == 0 for b in vec.raw):
                stats["evicted_samples"] += 1
            time.sleep(0.0005)

    ts = [threading.Thread(target=io), threading.Thread(target=watch)]
    ts += [threading.Thread(target=pressure, args=(t,)) for t in (1, 2)]
    for th in ts:
        th.start()
    for th in ts:
        th.join()
    os.close(fd)
    print(json.dumps(stats), flush=True)
    del a, window, buf
    r.close()
    c.close()
    print(json.dumps({"done": True}), flush=True)
""")


def test_mlocked_buffer_under_o_direct_reads_is_never_evicted(engine_backing, start_daemon, tmp_path):
    datafile = tmp_path / "data"
    datafile.write_bytes(os.urandom(CHUNKS * LOCKED_PAGES * 4096))   # on the root fs: O_DIRECT is real
    d = start_daemon(engine_backing, store_size="64M", max_resident="1M")
    c = Workload.script(CLIENT, d.socket, datafile, 1024, LOCKED_PAGES, CHUNKS, 90)
    try:
        assert c.next(30) == {"ready": True}
        stats = c.next(120)
        c.finish_done(timeout=30)
    finally:
        c.kill()
    assert stats["io_rounds"] > 100 and stats["writes"] > 10000 and stats["samples"] > 100, stats
    st = status(d)
    assert st["swapouts_total"] > 4 * 1024, st   # reclaim was busy all along
    assert stats["bad_rounds"] == 0, stats
    assert stats["evicted_samples"] == 0, stats
    assert_audit(st)
    finish_clean(d)


def test_a_victim_mlocked_while_its_write_is_in_flight_stays(file_backing, start_daemon):
    """A page chosen for eviction before its client mlocked it, whose write
    to the store is still in flight when the mlock comes: the write's end
    must not drop it (a punch then loses what pinned I/O into the freshly
    locked buffer writes). It was dropped: the lock was looked at only when
    the victim was chosen (seen with a per-uid share evicting a region just
    written, then mlocked)."""
    # Evicted for a per-uid share (shares.py), with the budget's room to
    # spare: faults never wait, so the writes are still in flight when the
    # writing ends.
    d = start_daemon(file_backing, store_size="64M", max_resident="64M", inject={"write_delay": 0.5},
                     config={"max_resident_per_uid": "4M"})
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mlock.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)
    locked = 512  # pages: the region's oldest, the first reclaim writes back
    with uswap.connect(d.socket) as c:
        r = c.alloc(8 << 20)
        for off in range(0, r.size, 4096):
            r.buf[off:off + 8] = (off + 1).to_bytes(8, "little")
        vec = ctypes.create_string_buffer(locked)
        assert libc.mincore(r.addr, locked * 4096, vec) == 0

        wait_for("writes in flight", lambda: status(d)["writeback_inflight"] > 0, 10, 0.005)
        assert libc.mlock(r.addr, locked * 4096) == 0, ctypes.get_errno()
        # Every write started before the mlock has ended (0.5 s each, several in flight).
        wait_for("the writes ended", lambda: status(d)["writeback_inflight"] == 0, 30)
        assert libc.mincore(r.addr, locked * 4096, vec) == 0
        gone = [p for p in range(locked) if not vec.raw[p] & 1]
        assert not gone, f"{len(gone)} mlocked pages dropped when their write ended, first {gone[:5]}"
        bad = [off for off in range(0, r.size, 4096) if bytes(r.buf[off:off + 8]) != (off + 1).to_bytes(8, "little")]
        assert not bad, bad[:5]
        r.close()
    finish_clean(d)
