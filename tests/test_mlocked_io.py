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

import os
import sys
import textwrap

from tests.harness import Workload, assert_audit, status, wait_clean

LOCKED_PAGES = 64
CHUNKS = 16

CLIENT = textwrap.dedent("""
    import ctypes, json, os, random, sys, threading, time
    import numpy as np
    import uswap

    sock, datafile, npages, locked, chunks, seconds = (sys.argv[1], sys.argv[2], int(sys.argv[3]),
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
    deadline = time.monotonic() + seconds
    stats = {"io_rounds": 0, "bad_rounds": 0, "samples": 0, "evicted_samples": 0, "writes": 0}
    print(json.dumps({"ready": True}), flush=True)

    def io():
        rng = random.Random(5)
        while time.monotonic() < deadline:
            k = rng.randrange(chunks)
            assert os.preadv(fd, [buf], k * size) == size
            stats["io_rounds"] += 1
            if not np.array_equal(window, expected[k]):
                stats["bad_rounds"] += 1

    def pressure(t):
        rng = np.random.default_rng(t)
        while time.monotonic() < deadline:
            for p in rng.integers(locked, npages, 64):
                a[p, t] += 1
                stats["writes"] += 1

    def watch():
        vec = ctypes.create_string_buffer(locked)
        while time.monotonic() < deadline:
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


def test_mlocked_buffer_under_o_direct_reads_is_never_evicted(backing, start_daemon, tmp_path):
    datafile = tmp_path / "data"
    datafile.write_bytes(os.urandom(CHUNKS * LOCKED_PAGES * 4096))   # on the root fs: O_DIRECT is real
    d = start_daemon(backing, store_size="64M", max_resident="1M")
    c = Workload.__new__(Workload)
    c._spawn([sys.executable, "-c", CLIENT, d.socket, str(datafile), "1024", str(LOCKED_PAGES),
              str(CHUNKS), "8"])
    try:
        assert c.next(30) == {"ready": True}
        stats = c.next(60)
        lines = c.finish(timeout=30)
    finally:
        c.kill()
    assert c.proc.returncode == 0, (lines, c.proc.stderr.read()[-3000:])
    assert stats["io_rounds"] > 100 and stats["writes"] > 10000 and stats["samples"] > 100, stats
    st = status(d)
    assert st["swapouts_total"] > 4 * 1024, st   # reclaim was busy all along
    assert stats["bad_rounds"] == 0, stats
    assert stats["evicted_samples"] == 0, stats
    assert_audit(st)
    wait_clean(d)
    text = d.log_text()
    assert "Traceback" not in text, text[-5000:]
    assert d.stop() == 0
