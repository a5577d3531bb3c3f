"""A reviewer's attack on branch rwrite (native/fastpath.c fp_push): an
FP_DIRTIED record (a clean page with a slot written on a fault thread: the
slot copy is stale) wakes the engine only once per FP_DIRTIED_BATCH, so up
to 63 such records may wait, the stale slot still in the page's table,
until something else gives the engine a turn. Whatever that something is --
a client request (fork_begin, discard, free), a signal (SIGTERM, SIGUSR2),
a SIGKILL and a successor -- it sees those pages RESIDENT, dirty and still
naming their stale slot before the record is taken (requests run before the
turn's completions, engine.py on_completions).

Each scenario test makes fewer than a batch of such records (write faults
on SWAPPED pages served on a fault thread, or first writes of clean
resident pages, fp_take_wp) and at once, with no status request between
(a status turn would take them), makes one of those things happen; then
checks every page's bytes -- in the parent, in a forked child (which must
see the new bytes, never the stale slot's), after a drain or an adoption --
and the audit (each stale slot freed exactly once, none leaked).
`fast_path_wakeups_total` shows that no kick took the records first.

The stress test hammers the window: writer threads on a region mostly
swapped out under a tight budget, forks whose children check their
snapshots, discards and MADV_DONTNEED of written pages, a SIGKILL and a
successor's adoption in the middle, a SIGTERM drain at the end.

Real daemon, real O_DIRECT file store (and nfs:// where the store matters).
"""
from __future__ import annotations

import signal
import textwrap

import pytest

from tests.daemon.test_fastpath_wakeups import _scattered
from tests.daemon.test_swapin_write_fault import wait_swapped
from tests.harness import Workload, assert_audit, ctl, finish_clean, status, wait_for

NPAGES = 1536

# A client of NPAGES pages, each tagged (gen << 32 | page) in its first and
# last word (gen 0: the page must read zeros). Commands on stdin, one line
# each, answered with one JSON line; "bad" counts pages not as expected.
SCEN = textwrap.dedent("""
    import ctypes, os, sys
    import numpy as np
    import uswap
    from tests.client_program import out

    sock, npages = sys.argv[1], int(sys.argv[2])
    c = uswap.connect(sock)
    r = c.alloc(npages * 4096)
    base = r.addr
    a = np.frombuffer(r.buf, dtype=np.uint64).reshape(-1, 512)
    ids = np.arange(npages, dtype=np.uint64)
    gen = np.ones(npages, np.uint64)

    def want(g):
        return np.where(g == 0, np.uint64(0), (g << np.uint64(32)) | ids)

    def put(p):
        # One ctypes write (the GIL let go while it faults).
        t = ctypes.c_uint64(int(gen[p]) << 32 | p)
        ctypes.memmove(base + p * 4096, ctypes.addressof(t), 8)
        ctypes.memmove(base + p * 4096 + 4088, ctypes.addressof(t), 8)

    def bad_of(g, pages=None):
        w = want(g)
        sel = slice(None) if pages is None else pages
        return int(np.count_nonzero((a[sel, 0] != w[sel]) | (a[sel, 511] != w[sel])))

    a[:, 0] = want(gen)
    a[:, 511] = a[:, 0]
    out(filled=npages)

    def child(snap, pages):
        # The snapshot: first the pages just written (their stale slots may
        # still be named by the parent's table), then every page.
        bad = bad_of(snap, pages) + bad_of(snap)
        os._exit(min(bad, 100))

    for line in sys.stdin:
        cmd = line.split()
        if not cmd:
            continue
        op, pages = cmd[0], [int(x) for x in cmd[1:]]
        if op == "read":             # swapped pages in, clean (read faults)
            out(read=bad_of(gen, pages))
        elif op == "write":          # each page written once, nothing after
            for p in pages:
                gen[p] += 1
                put(p)
            out(written=len(pages))
        elif op == "writefork":      # written, then forked at once; the parent
            for p in pages:          # writes them again while the child checks
                gen[p] += 1
                put(p)
            snap = gen.copy()
            pid = os.fork()
            if pid == 0:
                child(snap, pages)
            for p in pages:
                gen[p] += 1
                put(p)
            code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
            out(forked=code, bad=bad_of(gen))
        elif op == "writediscard":   # written, then half of them discarded at once
            for p in pages:
                gen[p] += 1
                put(p)
            for p in pages[::2]:
                r.discard(p * 4096, 4096)
                gen[p] = 0
            out(discarded=len(pages[::2]), bad=bad_of(gen))
        elif op == "writefree":      # written, then the region freed at once
            for p in pages:
                gen[p] += 1
                put(p)
            del a
            r.close()
            c.close()
            out(freed=True)
            out(done=True)
            sys.exit(0)
        elif op == "verify":
            out(verified=bad_of(gen), reconnects=c.reconnects)
        elif op == "exit":
            break
    bad = bad_of(gen)
    del a
    r.close()
    c.close()
    out(done=True)
    sys.exit(3 if bad else 0)
""")


def _client(d, backing_budget: str = "2M") -> Workload:
    """A SCEN client whose oldest pages (0 up to about 1000) are swapped out,
    then a budget far above what is charged, so that no write fault crosses
    a watermark or fills the budget (the other reasons a fault thread wakes
    the engine): each of the test's writes is a fast-path write fault whose
    FP_DIRTIED record waits."""
    w = Workload.script(SCEN, d.socket, NPAGES)
    try:
        w.next(60)
        wait_swapped(d)
        ctl(d, {"op": "budget", "max_resident": 16 << 20})
        wait_for("reclaim idle", lambda: (lambda s: s if s["writeback_inflight"] == 0
                                          and s["punching_pages"] == 0 else None)(status(d)), timeout=30)
    except BaseException:
        w.kill()
        raise
    return w


def _pages(n: int, how: str, w: Workload) -> list[int]:
    """n swapped pages, random to read-ahead. how "swapin": their writes are
    write faults on SWAPPED pages (fp_finish's FP_DIRTIED); "wp": they are
    read in clean first, so their writes are fp_take_wp's first writes."""
    pages = _scattered(n)
    if how == "wp":
        w.send("read " + " ".join(map(str, pages)) + "\n")
        assert w.wait_line(lambda x: "read" in x, 60)["read"] == 0
    return pages


def _pending_proof(d, st0: dict) -> int:
    """Wake-ups by the fault threads since st0: 0 means no kick took the
    records before the request that followed the writes."""
    return status(d)["fast_path_wakeups_total"] - st0["fast_path_wakeups_total"]


def _verify_and_end(d, w: Workload) -> None:
    """Audit exact once settled (_settled_audit), every page of the client
    as it last wrote it, the client ending cleanly, then the daemon."""
    try:
        _settled_audit(d)
        w.send("verify\n")
        assert w.wait_line(lambda x: "verified" in x, 120)["verified"] == 0
        w.send("exit\n")
        w.finish_done(60, d)
    finally:
        w.kill()
    finish_clean(d)


def _settled_audit(d, want_used: int | None = None) -> dict:
    """Status once no store I/O is in flight, audit exact (and slots_used as
    wanted): every stale slot freed exactly once."""
    def ok():
        s = status(d)
        if s["writeback_inflight"] or s["punching_pages"] or s["reads_inflight"]:
            return None
        if want_used is not None and s["audit"]["slots_used"] != want_used:
            return None
        return s
    st = wait_for("settled, slots as wanted", ok, timeout=30)
    assert_audit(st)
    assert st["illegal_transitions_total"] == 0, st
    return st


def _written_soon(start_daemon, backing: str, how: str, n: int) -> tuple:
    """A daemon, a _client, n of its swapped pages (_pages) and a status
    taken before they are written."""
    d = start_daemon(backing, store_size="64M", max_resident="2M", config={"fault_threads": 2})
    w = _client(d)
    try:
        pages = _pages(n, how, w)
        return d, w, pages, status(d)
    except BaseException:
        w.kill()
        raise


@pytest.mark.deadline(180)
@pytest.mark.parametrize("how", ["swapin", "wp"])
@pytest.mark.parametrize("op", ["writefork", "writediscard"])
def test_request_right_after_pending_dirtied_records(file_backing, start_daemon, how, op):
    """writefork: fork_begin finds the written pages RESIDENT dirty naming
    their stale slots: the child must read the new bytes (AT_PARENT), not
    the stale copies, and keep them while the parent writes again.
    writediscard: the discard's forget punches pages still naming their
    stale slots: each slot freed once (by the record or the punch's
    completion, not both), discarded pages read zeros, the others their new
    bytes. Audit exact either way."""
    d, w, pages, st0 = _written_soon(start_daemon, file_backing, how, 48)
    try:
        w.send(f"{op} " + " ".join(map(str, pages)) + "\n")
        res = w.wait_line(lambda x: "bad" in x, 60)
        assert res["bad"] == 0 and res.get("forked", 0) == 0, res
        # Not asserted 0: a child's swap-ins, a discard's punches may kick.
        print("fault-thread wake-ups since the writes:", _pending_proof(d, st0))
    except BaseException:
        w.kill()
        raise
    _verify_and_end(d, w)


@pytest.mark.deadline(180)
@pytest.mark.parametrize("how", ["swapin", "wp"])
def test_free_right_after_pending_dirtied_records(file_backing, start_daemon, how):
    """The region is freed while its stale slots' records wait: the close
    frees every slot its table names; the records, taken after, free none
    again. Nothing used at the end."""
    d, w, pages, st0 = _written_soon(start_daemon, file_backing, how, 40)
    try:
        w.send("writefree " + " ".join(map(str, pages)) + "\n")
        w.finish_done(60, d)
        assert _pending_proof(d, st0) == 0
        _settled_audit(d, 0)
    finally:
        w.kill()
    finish_clean(d)


@pytest.mark.deadline(240)
@pytest.mark.parametrize("how", ["swapin", "wp"])
@pytest.mark.parametrize("end", ["sigterm", "sigkill", "handover"])
def test_daemon_ends_right_after_pending_dirtied_records(backing, start_daemon, how, end):
    """The daemon ends while the records wait: drained (SIGTERM: every page
    home, handed back), killed (the successor adopts a table whose dirty
    pages name stale slots: dropped, never read, never leaked), or handed
    over (the records taken in the last turn). Every page reads its last
    bytes; the successor's audit is exact."""
    d, w, pages, st0 = _written_soon(start_daemon, backing, how, 48)
    try:
        w.send("write " + " ".join(map(str, pages)) + "\n")
        assert w.wait_line(lambda x: "written" in x, 60)["written"] == len(pages)
        if end == "sigterm":
            assert d.stop() == 0
            # Handed back: plain shared memory, no daemon.
            w.send("verify\n")
            assert w.wait_line(lambda x: "verified" in x, 60)["verified"] == 0
            w.kill()  # no daemon to free its region with
            return
        if end == "sigkill":
            assert d.kill() == -signal.SIGKILL
        else:
            d.proc.send_signal(signal.SIGUSR2)
            assert d.proc.wait(60) == 0
        d.restart()
        w.send("verify\n")
        res = w.wait_line(lambda x: "verified" in x, 120)
        assert res["verified"] == 0, res
        wait_for("region adopted", lambda: (lambda s: s if s["adopted_regions_total"] == 1
                                                 and s["adoption_waiting"] == 0 else None)(status(d)), 60)
    except BaseException:
        w.kill()
        raise
    # Every slot in use is named by a table, each once (audit): no stale
    # slot leaked or freed twice.
    _verify_and_end(d, w)
