"""How often the fault fast path's threads wake the engine (native/fastpath.c
fp_kick, status `fast_path_wakeups_total`) under write faults on swapped
pages, and that the stale slots those faults leave are still freed.

A write fault on a SWAPPED page is served on a fault thread, which maps the
page writable and dirty and leaves the engine an FP_DIRTIED record: free the
page's slot, whose copy is now stale. Each record used to wake the engine,
so under random writes the engine took a turn under the page lock after
every fault, and the client's next fault waited for that turn before a
fault thread could take it (scripts/bench.py random-write: 6125 engine turns
for 6677 faults, the lock held 36-52% of the time, p50 fault->dispatch
9.5-16.5 us against 5-6 us for random reads). An FP_DIRTIED record now wakes
the engine only as the FP_DIRTIED_BATCH-th one since it last took records;
any other turn takes them first (Engine.on_completions, before settle).

Real daemon, real O_DIRECT file store; counted with the daemon's status,
never timed.
"""
from __future__ import annotations

from tests.daemon.test_fastpath import FpClient, finish_without_fatal_errors, status_if
from tests.daemon.test_swapin_write_fault import wait_swapped
from tests.harness import assert_audit, ctl, status, wait_for
from uswap._fastpath_cffi import lib

BATCH = lib.FP_DIRTIED_BATCH


def _scattered(n: int) -> list[int]:
    """n of the pages 7..924 (swapped out: wait_swapped) in an order where
    any two faults at most three apart in it are 147 pages or more apart
    (37 is prime to the 132 pages), so that every fault is random to
    read-ahead (us_ra_locality: neither near the last swap-in nor a
    stream's next, readahead 8 pages), also when a page of the order turned
    out resident, and the fast path serves it alone."""
    pages = [7 * j for j in range(1, 133)]
    out = [pages[(37 * i) % 132] for i in range(1, 133)]
    assert n <= len(out)
    return out[:n]


def _write_swapped(start_daemon, file_backing, n: int, seed: int) -> tuple[int, list[int]]:
    """A daemon and a client whose oldest pages are swapped out; then, with
    a budget far above what is charged (so that no fault crosses a watermark
    or fills the budget -- us_kick_due, fp_finish: the other reasons a fault
    thread wakes the engine), n of them written once each (_scattered),
    every one a write fault served on a fault thread. Checks that the pages'
    stale slots are freed, each once (audit), and that every page of the
    client reads back what it wrote. Returns the engine wake-ups counted
    over the writes, and the pages written."""
    d = start_daemon(file_backing, store_size="64M", max_resident="2M", config={"fault_threads": 2})
    a = FpClient(d.socket, 1536, seed=seed)
    try:
        a.cmd("fill", "filled")
        wait_swapped(d)
        ctl(d, {"op": "budget", "max_resident": 16 << 20})
        pages = _scattered(n)
        # No write or punch in flight: every page to write is SWAPPED.
        st0 = wait_for("reclaim idle", lambda: status_if(
            d, lambda s: s["writeback_inflight"] == 0 and s["punching_pages"] == 0), timeout=30)
        a.cmd("write " + " ".join(map(str, pages)), "written")
        st1 = status(d)
        served = st1["fast_path_swapins_total"] - st0["fast_path_swapins_total"]
        assert served == n, (served, _passed(st0, st1))
        # Mapped writable at once: one fault per write, no write-protect
        # fault after it (minor faults of pages the sampler took out aside).
        faults = [s["faults_total"] - s["minor_faults_total"] for s in (st0, st1)]
        assert faults[1] - faults[0] == n, faults
        woke = st1["fast_path_wakeups_total"] - st0["fast_path_wakeups_total"]
        # The stale slots go at the engine's next turn (at the latest a
        # status request's): each page's slot freed once, none kept.
        want = st0["audit"]["slots_used"] - n
        freed = wait_for("the written pages' stale slots freed",
                         lambda: status_if(d, lambda s: s["audit"]["slots_used"] == want), timeout=10)
        assert_audit(freed)
        a.cmd("touch " + " ".join(map(str, pages)), "touched")
        a.verify_and_exit()
    finally:
        a.kill()
    finish_without_fatal_errors(d)
    return woke, pages


def _passed(st0: dict, st1: dict) -> dict:
    """The faults passed to the engine between two status readings, by reason."""
    a, b = st0["fast_path_passed_faults"], st1["fast_path_passed_faults"]
    return {k: b[k] - a[k] for k in b if b[k] != a[k]}


def test_write_faults_on_swapped_pages_wake_the_engine_once_per_batch(file_backing, start_daemon):
    """Fewer write faults than a batch: the engine is not woken at all; their
    stale slots are freed at its next turn, started by something else.
    Failed before: one wake-up per write fault (46-48 of 48)."""
    woke, pages = _write_swapped(start_daemon, file_backing, 48, seed=11)
    assert woke == 0, f"{woke} engine wake-ups for {len(pages)} write faults"


def test_a_batch_of_write_faults_wakes_the_engine(file_backing, start_daemon):
    """Two batches of write faults wake the engine once or twice, never once
    per fault: the BATCH-th record since the engine last took records wakes
    it, so no more than a batch of stale slots waits for a turn. Failed
    before: 124-128 wake-ups for 128 faults."""
    woke, pages = _write_swapped(start_daemon, file_backing, 2 * BATCH, seed=12)
    assert 1 <= woke <= 2, f"{woke} engine wake-ups for {len(pages)} write faults"
