"""A write fault served by the engine's swap-in (uswap/daemon/swapin.py) maps
its page writable and dirty at once, as the fast path's threads do
(native/fastpath.c), so the write takes no second, write-protect fault; the
read-ahead neighbours that come in with it stay write-protected clean copies
of their slots; and the faulting page and its neighbours come in with one
store read (the load's write_page, native/readmap.h us_verify_map). Counted
with the daemon's own status counters and, for the reads, the fault
injector's count of store reads; engine only (fault_threads 0), against a
real O_DIRECT file and a real nfs:// server."""
from __future__ import annotations

from tests.harness import status, wait_for
from tests.daemon.test_fastpath import FpClient, status_if


def _loaded(d, st0: dict, pages: int) -> dict:
    """Status once `pages` more swap-ins than in `st0` are applied and no read
    is in flight: the COPY wakes the client before the engine applies the load."""
    want = st0["swapins_total"] + pages
    return wait_for(f"{pages} swap-in(s) applied",
                    lambda: status_if(d, lambda s: s["swapins_total"] >= want and s["reads_inflight"] == 0),
                    timeout=20)


def wait_swapped(d) -> None:
    """Until a 1536-page client's oldest pages, 0 up to about 1000, are
    written back and dropped (2 MiB budget, 6 MiB written)."""
    wait_for("the oldest pages swapped out",
             lambda: status_if(d, lambda s: s["writeback_inflight"] == 0 and s["swapped_bytes"] >= 3 << 20),
             timeout=30)


def _filled(d) -> FpClient:
    """A client whose oldest pages, 0 up to about 1000, are written back and
    dropped (wait_swapped)."""
    a = FpClient(d.socket, 1536, seed=7)
    try:
        a.cmd("fill", "filled")
        wait_swapped(d)
    except BaseException:
        a.kill()
        raise
    return a


def test_write_fault_on_an_engine_swapin_takes_one_fault(backing, start_daemon):
    d = start_daemon(backing, store_size="64M", max_resident="2M", config={"fault_threads": 0})
    a = _filled(d)
    try:
        # No locality with an earlier swap-in: the page is read alone.
        st0 = status(d)
        a.cmd("write 400", "written")
        st1 = _loaded(d, st0, 1)
        assert st1["swapins_total"] - st0["swapins_total"] == 1, (st0, st1)
        assert st1["faults_total"] - st0["faults_total"] == 1, (st0, st1)  # MISSING only, no WP fault
        # Near it, not a stream: the aligned read-ahead window 392..399 comes in.
        a.cmd("write 396", "written")
        st2 = _loaded(d, st1, 2)
        assert st2["swapins_total"] - st1["swapins_total"] > 1, (st1, st2)
        assert st2["faults_total"] - st1["faults_total"] == 1, (st1, st2)
        # A neighbour of the window is resident, write-protected and clean: its
        # first write is one write-protect fault, and no read.
        a.cmd("write 397", "written")
        st3 = status(d)
        assert st3["swapins_total"] == st2["swapins_total"], (st2, st3)
        assert st3["faults_total"] - st2["faults_total"] == 1, (st2, st3)
        a.cmd("touch 392 393 394 395 396 397 398 399 400", "touched")
        a.exit_ok()
    finally:
        a.kill()


def test_write_fault_in_a_readahead_window_takes_one_store_read(backing, start_daemon):
    """The read-ahead window of a write fault is one store read: the faulting
    page mapped writable and its neighbours write-protected from the same
    buffer (before, the page and each side of it were loads of their own:
    three reads). The injector counts the store's reads (it runs the loads on
    the Python pool, through the same C routine as the C pool's jobs)."""
    d = start_daemon(backing, store_size="64M", max_resident="2M", inject={}, config={"fault_threads": 0})
    a = _filled(d)
    try:
        st = status(d)
        a.cmd("write 400", "written")  # random: read alone; the next fault is near it
        st0 = _loaded(d, st, 1)
        a.cmd("write 396", "written")  # near, not a stream: the aligned window 392..399
        st1 = _loaded(d, st0, 2)
        window = st1["swapins_total"] - st0["swapins_total"]
        assert window > 2, (st0, st1)  # 396 and neighbours on both sides of it
        reads = st1["store"]["inject"]["reads"] - st0["store"]["inject"]["reads"]
        assert reads == 1, f"{reads} store reads for one write fault's window of {window} pages"
        assert st1["faults_total"] - st0["faults_total"] == 1, (st0, st1)  # writable: no WP fault
        # Its neighbours are clean copies: a first write is one WP fault, no read.
        a.cmd("write 397", "written")
        a.cmd("write 395", "written")
        st2 = status(d)
        assert st2["faults_total"] - st1["faults_total"] == 2, (st1, st2)
        assert st2["store"]["inject"]["reads"] == st1["store"]["inject"]["reads"], (st1, st2)
        a.cmd("touch 392 393 394 395 396 397 398 399 400", "touched")
        a.exit_ok()
    finally:
        a.kill()
