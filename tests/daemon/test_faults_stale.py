"""MINOR faults whose page changed under them, and pages that appear in the
memfd behind the daemon's back.

- A MINOR fault (the page is in the memfd, not mapped in the client: after
  the client's MADV_DONTNEED) can wait in the queue while reclaim punches
  that clean page. The daemon used to take the page as written behind its
  back, free its slot, and CONTINUE it: EFAULT, taken for "client gone", and
  the region was closed under a live client. It must wake the thread, which
  faults again (MISSING) and is served from the slot.
- A page that appears in the memfd while the daemon has it SWAPPED (here a
  pwrite(2) on the memfd; a forked child's read does the same with a zero
  page) is never adopted over the slot copy: the client reads the slot.
  One that appears while EMPTY is adopted (README "Known limits").
"""
from __future__ import annotations

import textwrap

from tests.harness import Workload, assert_audit, finish_clean, status, wait_for

# Thread 0 drops its mapping of random pages (MADV_DONTNEED keeps them in
# the memfd) and reads them back at once: MINOR faults, while threads 1..3
# write random pages of a region 8x the budget, so reclaim punches pages all
# the time. Every read is checked (word 0: the page's id; word 8*t: the last
# value thread t wrote there).
DROPPER = textwrap.dedent("""
    import ctypes, json, random, sys, threading, time
    import numpy as np
    import uswap

    sock, npages, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    MADV_DONTNEED = 4
    MAGIC = 0x5EED_D20F_0000_0000
    c = uswap.connect(sock)
    r = c.alloc(npages * 4096)
    a = np.frombuffer(r.buf, dtype=np.uint64).reshape(-1, 512)
    a[:, 0] = np.arange(npages, dtype=np.uint64) ^ np.uint64(MAGIC)
    print(json.dumps({"filled": npages}), flush=True)
    last = np.zeros((4, npages), np.uint64)
    errors, counts = [], [0] * 4
    deadline = time.monotonic() + seconds
    cell_t = ctypes.c_uint64

    def worker(t):
        rng = random.Random(t + 11)
        cell = cell_t()
        n = 0
        while time.monotonic() < deadline and not errors:
            p = rng.randrange(npages)
            if t == 0:
                assert libc.madvise(r.addr + p * 4096, 4096, MADV_DONTNEED) == 0
            ctypes.memmove(ctypes.addressof(cell), r.addr + p * 4096, 8)   # faults without the GIL
            if cell.value != p ^ MAGIC:
                errors.append((p, cell.value))
            if t:
                n += 1
                cell.value = t << 48 | n
                ctypes.memmove(r.addr + p * 4096 + 64 * t, ctypes.addressof(cell), 8)
                last[t, p] = t << 48 | n
            counts[t] += 1

    ts = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in ts:
        th.start()
    for th in ts:
        th.join()
    ids = np.arange(npages, dtype=np.uint64)
    bad = len(errors) + int(np.count_nonzero(a[:, 0] != ids ^ np.uint64(MAGIC)))
    for t in range(1, 4):
        bad += int(np.count_nonzero(a[:, 8 * t] != last[t]))
    print(json.dumps({"minor_rounds": counts[0], "writes": sum(counts[1:]), "bad": bad,
                      "first_errors": errors[:3]}), flush=True)
    del a
    r.close()
    c.close()
    print(json.dumps({"done": True}), flush=True)
    sys.exit(3 if bad else 0)
""")


def test_minor_fault_on_a_page_punched_meanwhile(engine_backing, start_daemon):
    d = start_daemon(engine_backing, store_size="64M", max_resident="1M")
    c = Workload.script(DROPPER, d.socket, 2048, 12)
    try:
        c.next(30)
        lines = c.finish_done(timeout=120, daemon=d)
    finally:
        c.kill()
    summary = lines[-2]
    assert summary["bad"] == 0 and summary["minor_rounds"] > 1000, summary
    text = d.log_text()
    assert "closing (UFFDIO" not in text, text[-3000:]
    assert_audit(status(d))
    finish_clean(d)


# Fills a region, waits (the test waits for page 0 to be swapped out), then
# writes garbage straight into the memfd over page 0 (swapped) and over
# page EMPTY_PAGE (never touched), and reads both through the mapping.
INTRUDER = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    import uswap

    sock, npages, empty_page = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    c = uswap.connect(sock)
    r = c.alloc(npages * 4096)
    a = np.frombuffer(r.buf, dtype=np.uint64).reshape(-1, 512)
    ids = np.arange(npages, dtype=np.uint64)
    live = ids != empty_page
    a[live, 0] = ids[live] + 100
    print(json.dumps({"filled": npages}), flush=True)
    sys.stdin.readline()
    os.pwrite(r._memfd, b"\\xab" * 4096, 0)
    os.pwrite(r._memfd, b"\\xcd" * 4096, empty_page * 4096)
    print(json.dumps({"swapped_page": int(a[0, 0]), "empty_page": int(a[empty_page, 0]),
                      "bad": int(np.count_nonzero(a[live, 0] != ids[live] + 100))}), flush=True)
    del a
    r.close()
    c.close()
    print(json.dumps({"done": True}), flush=True)
""")


def test_page_written_into_the_memfd_never_beats_the_slot_copy(engine_backing, start_daemon):
    d = start_daemon(engine_backing, store_size="64M", max_resident="1M")
    c = Workload.script(INTRUDER, d.socket, 1024, 700)
    try:
        c.next(30)
        wait_for("most of the region swapped out",
                 lambda: status(d)["swapped_bytes"] >= 2 << 20, timeout=30)
        c.send()
        got = c.next(30)
        c.finish_done(timeout=30)
    finally:
        c.kill()
    # Page 0 was swapped: the slot copy wins over the bytes written into the memfd.
    assert got["swapped_page"] == 100, got
    assert got["bad"] == 0, got
    # Page 700 was never touched (EMPTY): what was written there is adopted.
    assert got["empty_page"] == 0xcdcdcdcdcdcdcdcd, got
    text = d.log_text()
    assert "appeared in memory while swapped; the slot copy wins" in text, text[-3000:]
    finish_clean(d)
