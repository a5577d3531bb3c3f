"""The fast path's MINOR faults (native/fastpath.c fp_take_minor), adversarially:
a clean RESIDENT page taken out of the client's page tables (its own
MADV_DONTNEED, or the access sampler's MADV_PAGEOUT) is mapped again on a C
fault thread, write-protected. If it were mapped writable, the client's next
write would never be seen: the page would stay "clean", be dropped by reclaim
and its stale slot copy served later.

Every client here tags each page with (generation << 32 | page id) in its
first and last word and keeps what it wrote; a page read back with anything
else was lost or served stale. The budget is a small fraction of the region,
so every page is forced out to the store and back between checks. Each test
checks that the new path really ran (fast_path_minor_faults_total grew),
that every page read back right, and that the daemon's audit is exact.
"""
from __future__ import annotations

import textwrap

import pytest

from tests.harness import Workload, assert_audit, finish_clean, status

BUDGET_PAGES = 512
BUDGET = f"{BUDGET_PAGES * 4 // 1024}M"

COMMON = textwrap.dedent("""
    import ctypes, json, os, sys, threading
    import numpy as np
    import uswap
    from tests.client_program import finish, out

    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    MADV_DONTNEED = 4

    def dontneed(r, first, n):
        assert libc.madvise(r.addr + first * 4096, n * 4096, MADV_DONTNEED) == 0, ctypes.get_errno()

    def tags(gen, ids, pages):
        return (gen[pages] << np.uint64(32)) | ids[pages]

    def bad_of(a, gen, ids, pages):
        t = tags(gen, ids, pages)
        return int(np.count_nonzero((a[pages, 0] != t) | (a[pages, 511] != t)))

    def write(a, gen, ids, pages):
        gen[pages] += np.uint64(1)
        t = tags(gen, ids, pages)
        a[pages, 0] = t
        a[pages, 511] = t

    # A connection, a region of npages, its pages as rows of words, each
    # page's id and the generation written last (0: nothing yet).
    def region_of(sock, npages):
        c = uswap.connect(sock)
        r = c.alloc(npages * 4096)
        a = np.frombuffer(r.buf, dtype=np.uint64).reshape(-1, 512)
        return c, r, a, np.arange(npages, dtype=np.uint64), np.zeros(npages, np.uint64)

    # region_of, every page written once (dirty), then ready: reported, and
    # the go-ahead read from stdin (_run_script takes the status between).
    def filled_region(sock, npages):
        c, r, a, ids, gen = region_of(sock, npages)
        everything = np.arange(npages)
        write(a, gen, ids, everything)
        out(filled=npages)
        sys.stdin.readline()
        return c, r, a, ids, gen, everything

    # A forking test's parent, its work done: waits for the child, checks
    # its whole region and reports both; returns the count of bad pages.
    def parent_end(a, gen, ids, everything, pid, bad):
        child = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        bad["parent_end"] += bad_of(a, gen, ids, everything)
        out(bad=bad, child=child)
        return sum(bad.values()) + child
""")

# (a) argv: SOCKET NPAGES ROUNDS CHUNK. Each round walks the region chunk by
# chunk: reads the chunk (swapped in: clean), drops it from the page tables
# (MADV_DONTNEED), writes half of it at once (a MINOR fault that is a write:
# mapped write-protected, then the write-protect fault dirties it), reads it
# all (MINOR faults on the clean other half), drops and reads it again (the
# dirty half's MINOR faults go to the engine). The whole region is checked
# after every round: by then every page went to the store and came back.
DONTNEED_WRITER = COMMON + textwrap.dedent("""
    sock, npages, rounds, chunk = sys.argv[1], *map(int, sys.argv[2:5])
    c, r, a, ids, gen = region_of(sock, npages)
    everything = np.arange(npages)
    write(a, gen, ids, everything)
    out(filled=npages)
    sys.stdin.readline()
    bad = {"read": 0, "after_write": 0, "again": 0, "round_end": 0}
    for rnd in range(rounds):
        for lo in range(0, npages, chunk):
            pages = everything[lo:lo + chunk]
            bad["read"] += bad_of(a, gen, ids, pages)
            dontneed(r, lo, len(pages))
            write(a, gen, ids, pages[(pages + rnd) % 2 == 0])
            bad["after_write"] += bad_of(a, gen, ids, pages)
            dontneed(r, lo, len(pages))
            bad["again"] += bad_of(a, gen, ids, pages)
        bad["round_end"] += bad_of(a, gen, ids, everything)
    out(bad=bad)
    del a
    finish(c, r, sum(bad.values()))
""")


def _run_script(d, code: str, *args, timeout: float = 120) -> tuple[dict, dict, dict]:
    """Run a client that reports once ready and once with its result; the
    daemon's status before it starts its work and after it ends."""
    c = Workload.script(code, d.socket, *args)
    try:
        c.next(60)
        before = status(d)
        c.send()
        res = c.wait_line(lambda x: "bad" in x, timeout)
        after = status(d)
        c.finish_done(timeout=60, daemon=d)
    finally:
        c.kill()
    return before, after, res


def _end_exact(d, after: dict) -> None:
    """No illegal page transition, an exact audit, a clean exit."""
    assert after["illegal_transitions_total"] == 0, after
    assert_audit(after)
    finish_clean(d)


def _passed_minor(before: dict, after: dict) -> int:
    """MINOR faults the fault threads passed to the engine meanwhile."""
    return after["fast_path_passed_faults"]["minor"] - before["fast_path_passed_faults"]["minor"]


def _assert_fast_minor(before: dict, after: dict, at_least: int) -> int:
    fast = after["fast_path_minor_faults_total"] - before["fast_path_minor_faults_total"]
    total = after["minor_faults_total"] - before["minor_faults_total"]
    assert fast >= at_least, (fast, total, after)
    assert fast <= total, (fast, total)
    return fast


@pytest.mark.deadline(300)
def test_a_write_after_a_fast_minor_fault_reaches_the_store(backing, start_daemon):
    """(a) MADV_DONTNEED, then a write: the page the fault thread maps again
    must be write-protected, so the write dirties it and is written back
    before the page is dropped; a writable mapping loses the write."""
    npages, rounds, chunk = 4 * BUDGET_PAGES, 3, 32
    d = start_daemon(backing, store_size="64M", max_resident=BUDGET)
    before, after, res = _run_script(d, DONTNEED_WRITER, npages, rounds, chunk)
    assert res["bad"] == {"read": 0, "after_write": 0, "again": 0, "round_end": 0}, (res, after)
    # Half of each chunk is clean when dropped and read: about npages/2 a
    # round on the fast path, and the written half's first touch too.
    _assert_fast_minor(before, after, rounds * npages // 4)
    # Pages really went to the store and came back.
    assert after["swapins_total"] - before["swapins_total"] > rounds * npages // 2, after
    assert_audit(after)
    finish_clean(d)


# (b) argv: SOCKET NPAGES CHUNK. The parent fills the region, reads half of
# it back (clean pages) and forks: at the fork its pages are a mix of
# SWAPPED, clean RESIDENT (the child shares the slot) and dirty RESIDENT
# (the child reads the parent's page: AT_PARENT, cow.py). The parent then
# drops and rewrites every page, newest first (the dirty ones while they are
# still in memory), and tells the child, which checks its whole snapshot
# while the parent goes on dropping and rewriting. The child then drops and
# reads its own pages (its clean pages' MINOR faults on the fast path) and
# writes and checks them; the parent checks its own region at the end.
FORKER = COMMON + textwrap.dedent("""
    sock, npages, chunk = sys.argv[1], *map(int, sys.argv[2:4])
    c, r, a, ids, gen = region_of(sock, npages)
    everything = np.arange(npages)
    write(a, gen, ids, everything)
    out(filled=npages)
    sys.stdin.readline()
    bad = {"parent_before": 0, "parent_pass": 0, "parent_end": 0}
    # Read back (and drop and read again) the first half: clean pages, some resident at the fork.
    half = everything[: npages // 2]
    for lo in range(0, npages // 2, chunk):
        pages = everything[lo:lo + chunk]
        bad["parent_before"] += bad_of(a, gen, ids, pages)
        dontneed(r, lo, len(pages))
        bad["parent_before"] += bad_of(a, gen, ids, pages)
    # The last chunk written now: dirty and resident at the fork (AT_PARENT in
    # the child), and the parent's first rewrite below, so that it is copied
    # into the child while still in memory -- not left to chance.
    write(a, gen, ids, everything[npages - chunk:])
    rd, wr = os.pipe()
    snap = gen.copy()
    pid = os.fork()
    if pid == 0:
        os.close(wr)
        assert os.read(rd, 1) == b"x"
        cbad = bad_of(a, snap, ids, everything)          # while the parent goes on writing
        for lo in range(0, npages, chunk):
            pages = everything[lo:lo + chunk]
            dontneed(r, lo, len(pages))
            cbad += bad_of(a, snap, ids, pages)
            write(a, snap, ids, pages[pages % 3 == 0])
            dontneed(r, lo, len(pages))
            cbad += bad_of(a, snap, ids, pages)
        cbad += bad_of(a, snap, ids, everything)
        os._exit(min(cbad, 100))
    os.close(rd)
    order = list(range(npages - chunk, -1, -chunk))      # newest first: the dirty pages still in memory
    for n, lo in enumerate(order + order):
        pages = everything[lo:lo + chunk]
        dontneed(r, lo, len(pages))
        write(a, gen, ids, pages)
        dontneed(r, lo, len(pages))
        bad["parent_pass"] += bad_of(a, gen, ids, pages)
        if n == len(order) - 1:
            os.write(wr, b"x")                           # the child checks while the second pass runs
    os.close(wr)
    total = parent_end(a, gen, ids, everything, pid, bad)
    del a
    finish(c, r, total)
""")


@pytest.mark.deadline(300)
def test_b_fork_snapshot_survives_fast_minor_faults(engine_backing, start_daemon):
    """(b) A dirty parent page a child still reads must stay write-protected
    after a MINOR fault: the parent's write then copies it into the child
    first. A clean one the child shares by slot must be write-protected too,
    or the parent's write never reaches the store."""
    npages, chunk = 4 * BUDGET_PAGES, 32
    d = start_daemon(engine_backing, store_size="64M", max_resident=BUDGET)
    before, after, res = _run_script(d, FORKER, npages, chunk)
    assert res["bad"] == {"parent_before": 0, "parent_pass": 0, "parent_end": 0} and res["child"] == 0, \
        (res, after)
    _assert_fast_minor(before, after, npages // 2)
    # The parent's dirty pages were copied into the child before their rewrite,
    # and the clean ones shared by slot.
    assert after["fork"]["fork_copied_pages_total"] > before["fork"]["fork_copied_pages_total"], after
    assert after["fork"]["fork_shared_slots_total"] > before["fork"]["fork_shared_slots_total"], after
    assert_audit(after)
    finish_clean(d)


# (c) argv: SOCKET NPAGES HOT THREADS STEPS. A hot set written once at the
# start and then only read by every thread (clean once written back: the
# sampler's MINOR faults on it are the fast path's, several threads fault the
# same page at once), and a hot set of each thread's own that it rewrites
# and checks, while each thread streams writes through its own part of the
# rest of the region (reclaim, and so sampling, runs all the time).
THREADED = COMMON + textwrap.dedent("""
    sock, npages, hot, nthreads, steps = sys.argv[1], *map(int, sys.argv[2:6])
    c, r, a, ids, gen = region_of(sock, npages)
    everything = np.arange(npages)
    write(a, gen, ids, everything)
    shared = everything[:hot]
    own = [everything[hot + t * hot: hot + (t + 1) * hot] for t in range(nthreads)]
    base = hot * (nthreads + 1)
    per = (npages - base) // nthreads
    stream = [everything[base + t * per: base + (t + 1) * per] for t in range(nthreads)]
    out(filled=npages)
    sys.stdin.readline()
    bad = [0] * nthreads
    shared_gen = gen[shared].copy()

    def worker(t):
        mine, cold = own[t], stream[t]
        for i in range(steps):
            p = cold[i % len(cold)]
            write(a, gen, ids, np.array([p]))       # the stream
            if i % 4 == 0:
                q = mine[(i // 4) % len(mine)]
                write(a, gen, ids, np.array([q]))
            if i % 8 == t % 8:
                bad[t] += bad_of(a, gen, ids, mine)
                s = (a[shared, 0] != ((shared_gen << np.uint64(32)) | ids[shared])) | \\
                    (a[shared, 511] != ((shared_gen << np.uint64(32)) | ids[shared]))
                bad[t] += int(np.count_nonzero(s))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(nthreads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    total = sum(bad) + bad_of(a, gen, ids, everything)
    out(bad=total, per_thread=bad)
    del a
    finish(c, r, total)
""")


@pytest.mark.deadline(300)
def test_c_sampled_hot_set_under_a_tiny_budget_with_threads(file_backing, start_daemon):
    """(c) The sampler takes hot pages out of the page tables; their next
    reads, by several threads at once, are fast-path MINOR faults; a
    thread's own hot pages are rewritten between samplings. Every value
    checked, the whole region at the end."""
    hot, nthreads = 64, 4
    npages = 6 * BUDGET_PAGES
    d = start_daemon(file_backing, store_size="64M", max_resident=BUDGET)
    before, after, res = _run_script(d, THREADED, npages, hot, nthreads, 3 * BUDGET_PAGES)
    assert res["bad"] == 0, (res, after)
    assert after["sampled_pages_total"] > before["sampled_pages_total"], after
    _assert_fast_minor(before, after, BUDGET_PAGES)   # ~16000 on a quiet machine
    assert after["swapouts_total"] - before["swapouts_total"] > 2 * BUDGET_PAGES, after
    assert_audit(after)
    finish_clean(d)


# (d) argv: SOCKET NPAGES DLEN ROUNDS. Pages [0, DLEN) are discarded and
# rewritten over and over by the main thread, which checks them after each
# step (zeros after a discard, its tags after the write). Two threads drop
# and read pages of that range all along (MINOR faults on clean pages:
# zero-filled ones, ones swapped in): a page read must be zeros only if a
# discard may have run since the last completed write, and otherwise carry
# a generation between the last completed write and the one in progress --
# never an older one (a stale copy). A third thread drops, rewrites and
# checks pages of its own beyond the range, which keeps reclaim evicting.
DISCARDER = COMMON + textwrap.dedent("""
    sock, npages, dlen, rounds = sys.argv[1], *map(int, sys.argv[2:5])
    c, r, a, ids, gen = region_of(sock, npages)
    everything = np.arange(npages)
    write(a, gen, ids, everything[dlen:])
    out(filled=npages)
    sys.stdin.readline()
    state = {"done": 0, "cur": 0, "stop": False}
    bad = {"discarder": 0, "readers": 0, "writer": 0, "end": 0, "reads": 0}
    errors = []
    drange = everything[:dlen]

    def reader(t):
        cell = (ctypes.c_uint64 * 2)()
        i = t
        while not state["stop"]:
            p = (i * 7) % dlen
            i += 1
            dontneed(r, p, 1)
            kb = state["done"]
            ctypes.memmove(ctypes.addressof(cell), r.addr + p * 4096, 8)
            ctypes.memmove(ctypes.addressof(cell) + 8, r.addr + p * 4096 + 4088, 8)
            ka = state["cur"]
            bad["reads"] += 1
            # Each word on its own: the main thread's write of the page may
            # fall between the two reads.
            for v in (cell[0], cell[1]):
                if v == 0 and (ka > kb or kb == 0):
                    continue
                if (v & 0xFFFFFFFF) == p and kb <= (v >> 32) <= ka:
                    continue
                bad["readers"] += 1
                errors.append((p, cell[0], cell[1], kb, ka))

    def writer():
        own = everything[dlen:]
        i = 0
        while not state["stop"]:
            lo = dlen + (i * 16) % len(own)
            pages = everything[lo:lo + 16]
            dontneed(r, lo, len(pages))
            write(a, gen, ids, pages)
            dontneed(r, lo, len(pages))
            bad["writer"] += bad_of(a, gen, ids, pages)
            i += 1

    threads = [threading.Thread(target=reader, args=(t,)) for t in range(2)] + [threading.Thread(target=writer)]
    for th in threads:
        th.start()
    for k in range(1, rounds + 1):
        state["cur"] = k
        r.discard(0, dlen * 4096)
        bad["discarder"] += int(np.count_nonzero(a[:dlen]))
        gen[drange] = np.uint64(k - 1)
        write(a, gen, ids, drange)
        state["done"] = k
        dontneed(r, 0, dlen)
        bad["discarder"] += bad_of(a, gen, ids, drange)
    state["stop"] = True
    for th in threads:
        th.join()
    bad["end"] = bad_of(a, gen, ids, everything)
    reads = bad.pop("reads")
    out(bad=bad, reads=reads, errors=errors[:5])
    del a
    finish(c, r, sum(bad.values()))
""")


@pytest.mark.deadline(300)
def test_d_discard_racing_fast_minor_faults(engine_backing, start_daemon):
    """(d) Discards of a range while other threads drop and read its pages:
    a fast-path MINOR fault never maps a page being discarded or punched
    over the zeros, nor an older generation over the newest write."""
    npages, dlen, rounds = 4 * BUDGET_PAGES, 64, 150
    d = start_daemon(engine_backing, store_size="64M", max_resident=BUDGET)
    before, after, res = _run_script(d, DISCARDER, npages, dlen, rounds)
    assert res["bad"] == {"discarder": 0, "readers": 0, "writer": 0, "end": 0}, (res, after)
    assert res["reads"] > 1000, res
    _assert_fast_minor(before, after, rounds * dlen // 4)   # ~10000 on a quiet machine
    assert after["discarded_pages_total"] - before["discarded_pages_total"] >= rounds * dlen, after
    assert_audit(after)
    finish_clean(d)


# (e) argv: SOCKET NPAGES ROUNDS. Every page written (dirty) and kept in
# memory (the budget holds them all), then, each round: dropped from the page
# tables (MADV_DONTNEED, as the sampler's MADV_PAGEOUT does), rewritten at
# random (a MINOR fault that is a write, on a dirty page), checked, dropped
# and read again (a MINOR read fault on a dirty page).
DIRTY_MINOR = COMMON + textwrap.dedent("""
    sock, npages, rounds = sys.argv[1], *map(int, sys.argv[2:4])
    c, r, a, ids, gen, everything = filled_region(sock, npages)
    rng = np.random.default_rng(7)
    bad = {"after_write": 0, "again": 0, "end": 0}
    for rnd in range(rounds):
        dontneed(r, 0, npages)
        for p in rng.permutation(npages):
            write(a, gen, ids, np.array([p]))
        bad["after_write"] += bad_of(a, gen, ids, everything)
        dontneed(r, 0, npages)
        bad["again"] += bad_of(a, gen, ids, everything)
    bad["end"] = bad_of(a, gen, ids, everything)
    out(bad=bad)
    del a
    finish(c, r, sum(bad.values()))
""")


@pytest.mark.deadline(300)
def test_e_dirty_pages_minor_faults_served_by_the_fault_threads(file_backing, start_daemon):
    """(e) A dirty RESIDENT page's MINOR fault (no fork: no child reads it)
    is served on a fault thread, mapped writable (us_minor_writable), not
    passed to the engine (status fast_path_passed_faults "minor"); every
    write is kept."""
    npages, rounds = 256, 4
    d = start_daemon(file_backing, store_size="64M", max_resident="64M")
    before, after, res = _run_script(d, DIRTY_MINOR, npages, rounds)
    assert res["bad"] == {"after_write": 0, "again": 0, "end": 0}, (res, after)
    passed = _passed_minor(before, after)
    # Each round: a MINOR write fault and a MINOR read fault on every (dirty) page.
    fast = _assert_fast_minor(before, after, 2 * rounds * npages * 9 // 10)
    assert passed <= 2 * rounds * npages // 20, (passed, fast, after["fast_path_passed_faults"])
    # Mapped writable: the writes after the MINOR faults raised no write-protect fault.
    assert after["fast_path_passed_faults"]["wp"] - before["fast_path_passed_faults"]["wp"] <= npages // 10, after
    _end_exact(d, after)


# (f) argv: SOCKET NPAGES CHUNK. The parent writes every page (dirty, all in
# memory) and drops them from its page tables, then forks: every page is
# AT_PARENT in the child (cow.py). The child first reads its first quarter
# (copied in from the parent: those pages no longer shared) and tells the
# parent, which then drops, rewrites (random order) and checks the whole
# region chunk by chunk: each first touch is a MINOR fault on a dirty page,
# mapped writable where no child reads it (the first quarter) and
# write-protected elsewhere, so that its write copies the page into the
# child first. The child then checks its whole snapshot (the parent's bytes
# as of the fork, none of the later writes), rewrites a third of its pages
# and checks again; the parent checks its own region after the child ends.
DIRTY_FORK = COMMON + textwrap.dedent("""
    sock, npages, chunk = sys.argv[1], *map(int, sys.argv[2:4])
    c, r, a, ids, gen, everything = filled_region(sock, npages)
    bad = {"parent_pass": 0, "parent_end": 0}
    dontneed(r, 0, npages)
    quarter = everything[: npages // 4]
    to_child, to_parent = os.pipe(), os.pipe()
    snap = gen.copy()
    pid = os.fork()
    if pid == 0:
        os.close(to_child[1]); os.close(to_parent[0])
        cbad = bad_of(a, snap, ids, quarter)             # copied in: no longer shared
        os.write(to_parent[1], b"q")
        assert os.read(to_child[0], 1) == b"x"
        cbad += bad_of(a, snap, ids, everything)         # after every parent write
        dontneed(r, 0, npages)
        cbad += bad_of(a, snap, ids, everything)
        write(a, snap, ids, everything[everything % 3 == 0])
        dontneed(r, 0, npages)
        cbad += bad_of(a, snap, ids, everything)
        os._exit(min(cbad, 100))
    os.close(to_child[0]); os.close(to_parent[1])
    assert os.read(to_parent[0], 1) == b"q"
    rng = np.random.default_rng(11)
    for lo in range(0, npages, chunk):
        pages = everything[lo:lo + chunk]
        dontneed(r, lo, len(pages))
        for p in rng.permutation(pages):
            write(a, gen, ids, np.array([p]))
        dontneed(r, lo, len(pages))
        bad["parent_pass"] += bad_of(a, gen, ids, pages)
    os.write(to_child[1], b"x")
    total = parent_end(a, gen, ids, everything, pid, bad)
    del a
    finish(c, r, total)
""")


@pytest.mark.deadline(300)
def test_f_fork_dirty_minor_faults_keep_the_childs_snapshot(file_backing, start_daemon):
    """(f) MINOR faults on the dirty pages of a forked parent: the fault
    threads map writable only the pages no child reads any more, and
    write-protect the rest, so the parent's writes never reach the child's
    snapshot. Data checked on both sides."""
    npages, chunk = 512, 32
    d = start_daemon(file_backing, store_size="64M", max_resident="64M")
    before, after, res = _run_script(d, DIRTY_FORK, npages, chunk)
    assert res["bad"] == {"parent_pass": 0, "parent_end": 0} and res["child"] == 0, (res, after)
    # The parent's first touches, on the fault threads: a quarter of them
    # writable (no child reads those pages), the rest write-protected.
    _assert_fast_minor(before, after, npages * 9 // 10)
    passed = _passed_minor(before, after)
    assert passed <= npages // 10, (passed, after["fast_path_passed_faults"])
    # The child's quarter was copied at its own faults, the rest before the parent's writes.
    assert after["fork"]["fork_copied_pages_total"] - before["fork"]["fork_copied_pages_total"] >= npages * 3 // 4, \
        after["fork"]
    _end_exact(d, after)
