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
from tests.daemon.test_review_dirty_minor_fork import STRESS as MINOR_FORK
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
        elif op == "writestatus":    # written, then a status on this connection at once
            for p in pages:
                gen[p] += 1
                put(p)
            st = c.status()
            out(status_audit=st["audit"], wakeups=st["fast_path_wakeups_total"])
        elif op == "writedie":       # written, then the client dies at once
            for p in pages:
                gen[p] += 1
                put(p)
            out(dying=True)
            os._exit(0)
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


def _quiet(d) -> dict:
    """A status once the engine has nothing going on that would give it a
    turn (and take the records) by itself: no store I/O or punch in flight,
    and no page written since the sample before (background writeback,
    cleaner.py, writes ahead again after each turn while it has room to)."""
    seen = [None]

    def quiet():
        s = status(d)
        idle = not (s["writeback_inflight"] or s["punching_pages"] or s["reads_inflight"])
        key = (s["pages_written_total"], s["swapins_total"])
        before, seen[0] = seen[0], key
        return s if idle and key == before else None
    return wait_for("the engine quiet", quiet, timeout=60)


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


def _successor(d, end: str) -> None:
    """End daemon d while its client lives -- "sigkill", or "handover"
    (SIGUSR2: exits 0 undrained) -- and start its successor on the same
    store and state directory."""
    if end == "sigkill":
        assert d.kill() == -signal.SIGKILL
    else:
        d.proc.send_signal(signal.SIGUSR2)
        assert d.proc.wait(60) == 0
    d.restart()


def _settled_audit(d, want_used: int | None = None) -> dict:
    """Status once no store I/O is in flight, audit exact (and slots_used as
    wanted): every stale slot freed exactly once."""
    def ok():
        s = status(d)
        if s["writeback_inflight"] or s["punching_pages"] or s["reads_inflight"] or s["audit"] is None:
            return None  # (audit None: a region is closing)
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
        return d, w, pages, _quiet(d)
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
@pytest.mark.parametrize("op", ["writefree", "writedie"])
def test_free_right_after_pending_dirtied_records(file_backing, start_daemon, how, op):
    """The region is freed (writefree), or its client dies (writedie: the
    connection's hang-up closes it), while its stale slots' records wait:
    the close frees every slot its table names; the records, taken after,
    free none again. Nothing used at the end."""
    d, w, pages, st0 = _written_soon(start_daemon, file_backing, how, 40)
    try:
        w.send(f"{op} " + " ".join(map(str, pages)) + "\n")
        w.finish(60)
        assert w.proc.returncode == 0, w.lines
        assert _pending_proof(d, st0) == 0
        _settled_audit(d, 0)
    finally:
        w.kill()
    finish_clean(d)


@pytest.mark.deadline(180)
@pytest.mark.parametrize("how", ["swapin", "wp"])
def test_status_right_after_pending_dirtied_records(file_backing, start_daemon, how):
    """A status request is answered before its turn takes the records: its
    audit counts the stale slots still named and is exact, and so is every
    one after (each freed once)."""
    d, w, pages, st0 = _written_soon(start_daemon, file_backing, how, 40)
    try:
        # On the client's own connection: status() would connect anew, and
        # the accept's turn would take the records first.
        w.send("writestatus " + " ".join(map(str, pages)) + "\n")
        res = w.wait_line(lambda x: "status_audit" in x, 60)
        audit = res["status_audit"]
        assert audit is not None and audit["slots_ok"] and audit["charged_ok"] and audit["evicting_ok"], audit
        # Informative: with the engine quiet (_quiet) and no write waking it,
        # the stale slots are still named, and counted, when the status is
        # built -- unless a turn of its own (a timer) came between.
        print("slots used before the writes, at the status right after:", st0["audit"]["slots_used"],
              audit["slots_used"], "wake-ups:", res["wakeups"] - st0["fast_path_wakeups_total"])
        _settled_audit(d)
    finally:
        w.kill()
    finish_clean(d)


@pytest.mark.deadline(240)
@pytest.mark.parametrize("how", ["swapin", "wp"])
@pytest.mark.parametrize("end", ["sigterm", "sigkill", "handover"])
def test_daemon_ends_right_after_pending_dirtied_records(engine_backing, start_daemon, how, end):
    """The daemon ends while the records wait: drained (SIGTERM: every page
    home, handed back), killed (the successor adopts a table whose dirty
    pages name stale slots: dropped, never read, never leaked), or handed
    over (the records taken in the last turn). Every page reads its last
    bytes; the successor's audit is exact."""
    d, w, pages, st0 = _written_soon(start_daemon, engine_backing, how, 48)
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
        _successor(d, end)
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


# ------------------------------------------------------------------ stress

# Writer threads (each owns the pages p % writers == k) write random pages
# of a region mostly swapped out -- fast-path write swap-ins and first
# writes of clean pages, each an FP_DIRTIED record -- in bursts of 1..40, so
# that fewer than a batch are often outstanding; drop runs from their page
# tables (MADV_DONTNEED: data kept) and discard runs of their own pages
# (the `discard` op: zeros); each write an (gen << 32 | page) tag in a page's
# first and last word through ctypes (the GIL let go while it faults). The
# main thread forks again and again with every writer's lock held (the
# child's snapshot exact: it checks the pages just written first, then all,
# again after dropping them from its page tables, writes its own, checks),
# and once asks the test to end the daemon (SIGKILL or SIGUSR2) and start a
# successor, the writers going on meanwhile (their faults wait for the
# successor; their discards wait for the restart to end).
# The opening is test_review_dirty_minor_fork's client's (connect, region,
# tags, dontneed, put, got), up to its bad_of; tags of generation 0 (a page
# discarded: zeros) are this client's own, so put is made again over `tag`.
STRESS = MINOR_FORK[:MINOR_FORK.index("def bad_of(want):")] + textwrap.dedent("""
    import contextlib

    def tag(g, p):
        return 0 if g == 0 else (g << 32) | p

    def put(p, g):
        t = ctypes.c_uint64(tag(g, p))
        for off in (0, 4088):
            ctypes.memmove(base + p * 4096 + off, ctypes.addressof(t), 8)

    def bad_of(want, pages=None):
        g = np.array(want, np.uint64)
        t = np.where(g == 0, np.uint64(0), (g << np.uint64(32)) | ids)
        sel = slice(None) if pages is None else np.array(sorted(pages), np.int64)
        return int(np.count_nonzero((a[sel, 0] != t[sel]) | (a[sel, 511] != t[sel])))

    out(filled=npages)
    sys.stdin.readline()

    locks = [threading.Lock() for _ in range(writers)]
    stop = threading.Event()
    restarting = threading.Event()
    wbad = [0] * writers
    wrote = [0] * writers
    discarded = [0] * writers
    recent = [[] for _ in range(writers)]      # each writer's last burst

    def writer(k):
        rng = random.Random(k)
        mine = list(range(k, npages, writers))
        while not stop.is_set():
            with locks[k]:
                burst = rng.sample(mine, rng.randrange(1, 41))
                for p in burst:
                    gen[p] += 1
                    put(p, gen[p])
                    wrote[k] += 1
                recent[k] = burst
                if rng.random() < 0.1 and not restarting.is_set():
                    run = [p for p in burst[:4]]
                    for p in run:
                        r.discard(p * 4096, 4096)
                        gen[p] = 0
                    discarded[k] += len(run)
            if rng.random() < 0.3:
                first = rng.randrange(npages)
                dontneed(first, min(rng.randrange(1, 64), npages - first))
            for p in rng.sample(mine, 4):
                if got(p) != (tag(gen[p], p),) * 2:
                    wbad[k] += 1

    def child(snap, last):
        bad = bad_of(snap, last) + bad_of(snap)
        dontneed(0, npages)
        bad += bad_of(snap)
        for p in random.Random(os.getpid()).sample(range(npages), npages // 16):
            snap[p] += 1000              # the child's own writes stay its own
            put(p, snap[p])
        dontneed(0, npages)
        os._exit(min(bad + bad_of(snap), 100))

    def reap(pid):
        # A child's exit status is its count of pages not as in its snapshot.
        code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        if code:
            kid_bad.append(code)

    @contextlib.contextmanager
    def writers_held():
        for l in locks:
            l.acquire()
        try:
            yield
        finally:
            for l in locks:
                l.release()

    threads = [threading.Thread(target=writer, args=(k,), daemon=True) for k in range(writers)]
    list(map(threading.Thread.start, threads))
    kids, kid_bad, forks = [], [], 0
    rng = random.Random(7)
    start = time.monotonic()
    end = start + seconds
    restarted = False
    while time.monotonic() < end:
        if not restarted and time.monotonic() > start + seconds / 2:
            # No discard in flight (each is made under its writer's lock)
            # and none started until the successor is up.
            with writers_held():
                restarting.set()
            out(restart=forks)
            sys.stdin.readline()
            restarting.clear()
            restarted = True
        with writers_held():             # the snapshot: exactly `gen` now
            snap, last = list(gen), sorted({p for b in recent for p in b})
            pid = os.fork()
            if pid == 0:
                child(snap, last)
        forks += 1
        kids.append(pid)
        if len(kids) >= max_kids:
            reap(kids.pop(0))
        if rng.random() < 0.5:
            first = rng.randrange(npages)
            dontneed(first, npages - first)
    stop.set()
    list(map(threading.Thread.join, threads))
    list(map(reap, kids))
    dontneed(0, npages)
    end_bad = bad_of(gen)
    out(bad={"writers": sum(wbad), "end": end_bad, "children": kid_bad}, forks=forks, wrote=sum(wrote),
        discarded=sum(discarded), reconnects=c.reconnects)
    del a
    finish(c, r, sum(wbad) + end_bad + len(kid_bad))
""")


@pytest.mark.deadline(300)
@pytest.mark.parametrize("end", ["sigkill", "handover"])
def test_stress_batched_dirtied_window(engine_backing, start_daemon, end):
    """STRESS under a budget the test moves between tight (2 MiB: pages
    written back, evicted, swapped in) and roomy (16 MiB: write faults wake
    nothing, records wait) every status round; a SIGKILL or a handover and
    a successor half way. Every child sees exactly its snapshot, the parent
    its writes (zeros where it discarded); audit exact, no illegal
    transition; then a SIGTERM drain."""
    npages, writers, seconds, max_kids = 2048, 3, 16, 3
    d = start_daemon(engine_backing, store_size="128M", max_resident="2M", config={"fault_threads": 2})
    w = Workload.script(STRESS, d.socket, npages, writers, seconds, max_kids)
    try:
        w.next(60)
        wait_for("most pages swapped out", lambda: status(d)["swapped_bytes"] >= 4 << 20, timeout=60)
        w.send()
        tight, rounds, res = True, 0, None
        while res is None:
            ctl(d, {"op": "budget", "max_resident": (2 << 20) if tight else (16 << 20)})
            tight = not tight
            rounds += 1
            try:
                line = w.next(0.4)  # the pace of the budget's moves, not a wait for an event
            except AssertionError as e:
                if "no output within" not in str(e):
                    raise
                continue
            if "restart" in line:
                _successor(d, end)
                w.send()
            elif "bad" in line:
                res = line
        ctl(d, {"op": "budget", "max_resident": 16 << 20})
        w.finish_done(timeout=120, daemon=d)
    finally:
        w.kill()
    assert res["bad"] == {"writers": 0, "end": 0, "children": []}, res
    assert res["forks"] >= 5 and res["reconnects"] >= 1, res
    st = _settled_audit(d, 0)
    print("forks", res["forks"], "writes", res["wrote"], "discarded", res["discarded"], "budget rounds", rounds,
          "wake-ups", st["fast_path_wakeups_total"], "fast swap-ins", st["fast_path_swapins_total"])
    finish_clean(d)
