"""The `discard` op (Region.discard; MADV_DONTNEED for a uswap region): the
pages read zeros on their next touch, their slots are freed, pages outside
the range keep their data, and pages whose I/O is in flight are discarded
once it returns (the answer waits for them)."""
from __future__ import annotations

import textwrap

import pytest

from tests.harness import Workload, assert_audit, ctl, finish_clean, inject, status, wait_for

P = 4096

# argv: SOCKET NPAGES LO HI. Tags page p with p + 1 in word 0 (more pages than
# the budget: most are swapped out), waits for "go", discards [LO, HI), checks
# the range reads zeros and every other page its tag, waits for "go", writes
# the range again and checks the whole region.
DISCARDER = textwrap.dedent("""
    import sys
    import numpy as np
    import uswap
    from tests.client_program import finish, out

    sock, npages, lo, hi = sys.argv[1], *map(int, sys.argv[2:5])
    c = uswap.connect(sock)
    r = c.alloc(npages * 4096)
    a = np.frombuffer(r.buf, dtype=np.uint64).reshape(-1, 512)
    ids = np.arange(npages, dtype=np.uint64)
    rest = np.r_[0:lo, hi:npages]
    a[:, 0] = ids + 1
    out(filled=npages)
    sys.stdin.readline()
    r.discard(lo * 4096, (hi - lo) * 4096)
    out(discarded=hi - lo)
    bad = int(np.count_nonzero(a[lo:hi])) + int(np.count_nonzero(a[rest, 0] != ids[rest] + 1))
    out(checked=True, bad=bad)
    sys.stdin.readline()
    a[lo:hi, 0] = ids[lo:hi] + 7
    bad += int(np.count_nonzero(a[lo:hi, 0] != ids[lo:hi] + 7)) + int(np.count_nonzero(a[rest, 0] != ids[rest] + 1))
    out(rewritten=True, bad=bad)
    del a
    finish(c, r, bad)
""")


def _run_discarder(d, npages: int, lo: int, hi: int) -> tuple[dict, dict]:
    """Run DISCARDER; return the daemon's status before and after the discard."""
    c = Workload.script(DISCARDER, d.socket, npages, lo, hi)
    try:
        c.next(60)
        before = wait_for("pages swapped out", lambda: (lambda st: st if st["store"]["used_bytes"] > 0
                                                       and st["writeback_inflight"] == 0 else None)(status(d)), 60)
        c.send()
        assert c.next(60).get("discarded") == hi - lo
        checked = c.next(120)
        assert checked["bad"] == 0, checked
        after = status(d)
        c.send()
        assert c.wait_line(lambda x: "rewritten" in x, 120)["bad"] == 0
        c.next(60)  # done
        assert c.proc.wait(30) == 0, c.proc.stderr.read()
    finally:
        c.kill()
    return before, after


def test_discarded_pages_read_zero_and_free_their_slots(backing, start_daemon):
    d = start_daemon(backing, store_size="64M", max_resident="1M")
    npages, lo, hi = 2048, 512, 1536
    before, after = _run_discarder(d, npages, lo, hi)
    assert after["discarded_pages_total"] == hi - lo, after
    # Every page of the range had left memory or held a slot before; now none
    # has a slot: the store holds at most the pages outside the range.
    assert before["store"]["used_bytes"] > (npages - (hi - lo)) * P, before["store"]
    assert after["store"]["used_bytes"] <= (npages - (hi - lo)) * P, after["store"]
    assert after["swapouts_total"] > 0
    assert_audit(after)
    finish_clean(d)


def test_discard_waits_for_reads_and_writes_in_flight(tmp_path, start_daemon):
    """Slow store writes and reads keep pages WRITEBACK and LOADING when the
    discard comes; the answer waits for them, and they read zeros after.

    The writes are caused, not waited for: after the fill the charged pages
    sit between the watermarks and nothing is written (the test used to
    wait for a write the fill might have finished, and timed out in CI). A
    budget cut makes reclaim write the dirty pages, 4 s each.

    The fill runs at full speed, the delays are injected after it: a fill
    of 1024 pages through a 1 MiB budget writes 768 of them, and reclaim
    evicts only down to the low watermark, so at most max - low (+ the
    faults waiting) = about 12 pages are on their way out at once. With
    every write delayed 0.2 s that is over 64 rounds of a delayed write,
    each also paying the hand-offs between the client, the engine and an
    I/O thread: 13 s on a quiet machine, 25-28 s at load 17, and in two CI
    runs of the whole suite over 120 s. Nothing checked here needs it slow."""
    d = start_daemon(str(tmp_path / "swapfile"), store_size="64M", max_resident="1M", inject={})
    npages, lo, hi = 1024, 0, 1024
    c = Workload.script(DISCARDER, d.socket, npages, lo, hi)
    try:
        c.next(120)
        inject(d, {"write_delay": 4.0, "read_delay": 0.2})
        ctl(d, {"op": "budget", "max_resident": "256K"})
        wait_for("a write in flight", lambda: status(d)["writeback_inflight"] > 0, 60)
        c.send()
        assert c.next(120).get("discarded") == hi - lo
        assert c.next(120)["bad"] == 0
        st = status(d)
        assert st["forgotten_after_io_total"] > 0, st
        assert st["store"]["used_bytes"] == 0, st["store"]
        inject(d, {"write_delay": 0, "read_delay": 0})  # the rewrite at full speed, under the first budget
        ctl(d, {"op": "budget", "max_resident": "1M"})
        c.send()
        assert c.wait_line(lambda x: "rewritten" in x, 120)["bad"] == 0
        c.next(60)
    finally:
        c.kill()
    finish_clean(d)


# argv: SOCKET NPAGES LO HI SECONDS. Threads write and check the pages outside
# [LO, HI) (each its own slice, a version per pass), another writes and reads
# pages inside it (each reads zero or what that thread wrote last), while the
# main thread discards [LO, HI) over and over. Ends with a last discard and
# the range all zeros.
CONCURRENT = textwrap.dedent("""
    import sys, threading, time
    import numpy as np
    import uswap
    from tests.client_program import finish, out, run_threads

    sock, npages, lo, hi, seconds = sys.argv[1], *map(int, sys.argv[2:6])
    c = uswap.connect(sock)
    r = c.alloc(npages * 4096)
    a = np.frombuffer(r.buf, dtype=np.uint64).reshape(-1, 512)
    ids = np.arange(npages, dtype=np.uint64)
    outside = np.r_[0:lo, hi:npages]
    bad = []
    stop = time.monotonic() + seconds

    def outside_writer(part):
        pages = outside[part::2]
        v = 0
        while time.monotonic() < stop:
            v += 1
            a[pages, 0] = ids[pages] * 1000 + v
            n = int(np.count_nonzero(a[pages, 0] != ids[pages] * 1000 + v))
            if n:
                bad.append(("outside", n))

    def inside_toucher():
        rng = np.random.default_rng(1)
        while time.monotonic() < stop:
            pages = lo + rng.choice(hi - lo, 64, replace=False)
            a[pages, 1] = ids[pages] + 1
            got = a[pages, 1]
            n = int(np.count_nonzero((got != 0) & (got != ids[pages] + 1)))
            if n:
                bad.append(("inside", n))

    def discarder():
        k = 0
        while time.monotonic() < stop:
            r.discard(lo * 4096, (hi - lo) * 4096)
            k += 1
        out(discards=k)

    run_threads([threading.Thread(target=outside_writer, args=(i,)) for i in range(2)]
                + [threading.Thread(target=inside_toucher), threading.Thread(target=discarder)])
    r.discard(lo * 4096, (hi - lo) * 4096)
    nbad = sum(n for _, n in bad) + int(np.count_nonzero(a[lo:hi]))
    out(checked=True, bad=nbad, what=bad[:5])
    del a
    finish(c, r, nbad)
""")


@pytest.mark.parametrize("fault_threads", [4, 0], ids=["fast-path", "engine-only"])
def test_discard_under_concurrent_faults_and_writeback(tmp_path, start_daemon, fault_threads):
    d = start_daemon(str(tmp_path / "swapfile"), store_size="64M", max_resident="1M",
                     config={"fault_threads": fault_threads})
    c = Workload.script(CONCURRENT, d.socket, 1024, 300, 700, 6)
    try:
        lines = c.finish_done(timeout=180, daemon=d)
    finally:
        c.kill()
    assert any(x.get("discards", 0) > 3 for x in lines), lines
    assert all(x.get("bad", 0) == 0 for x in lines), lines
    st = status(d)
    assert st["swapouts_total"] > 0 and st["discarded_pages_total"] > 3 * 400, st
    finish_clean(d)


def test_discard_refuses_bad_values_and_keeps_the_connection(tmp_path, start_daemon):
    d = start_daemon(str(tmp_path / "swapfile"), store_size="64M")
    with d.client() as c:
        r = c.alloc(16 * P)
        r.buf[:] = b"\x01" * (16 * P)
        refused = {}
        for name, msg in {
            "unknown region": {"region": r.id + 100, "offset": 0, "length": P},
            "bool region": {"region": True, "offset": 0, "length": P},
            "unaligned offset": {"region": r.id, "offset": 100, "length": P},
            "unaligned length": {"region": r.id, "offset": 0, "length": 5000},
            "zero length": {"region": r.id, "offset": 0, "length": 0},
            "negative offset": {"region": r.id, "offset": -P, "length": P},
            "past the end": {"region": r.id, "offset": 12 * P, "length": 8 * P},
            "string length": {"region": r.id, "offset": 0, "length": "4096"},
        }.items():
            with pytest.raises(Exception) as e:
                c._request({"op": "discard", **msg})
            refused[name] = str(e.value)
        assert str(r.id + 100) in refused["unknown region"] and "no region" in refused["unknown region"]
        assert "100" in refused["unaligned offset"] and "4096" in refused["unaligned offset"]
        assert "5000" in refused["unaligned length"]
        assert "passes the end" in refused["past the end"] and str(16 * P) in refused["past the end"]
        assert "'4096'" in refused["string length"]
        # The connection and the region live on.
        r.discard(4 * P, 4 * P)
        assert bytes(r.buf[4 * P:8 * P]) == bytes(4 * P)
        assert bytes(r.buf[:4 * P]) == b"\x01" * (4 * P) and bytes(r.buf[8 * P:]) == b"\x01" * (8 * P)
        r.close()
    finish_clean(d)
