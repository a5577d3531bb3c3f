"""Issue item (e): clients that die, or tear their region down under the
daemon, while I/O for them is in flight.

Invariant 7: losing a client frees its slots only after their writes return
(the InjectingStore counts a second write to an offset with one in flight:
overlapping_writes). Whatever a client does to its own memory, the daemon keeps
serving everyone else and its accounting (status "audit") stays exact.
"""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

from tests.daemon_proc import REPO
from tests.nfs_fixture import instance, start_nfs_server, stop_nfs_server
from tests.harness import Workload, assert_no_io_overlap, finish_clean, freeze, inject, status, wait_clean, wait_for


def client_pids(st: dict) -> set[int]:
    return {c["pid"] for c in st["clients"]}


def test_sigkill_with_writes_in_flight_frees_slots_after_they_return(backing, start_daemon):
    # A small store, so slots are reused soon after they are freed.
    d = start_daemon(backing, store_size="12M", max_resident="1M", inject={"write_delay": 0.2})
    # B keeps working through A's death and checks every stamp.
    a = Workload(d.socket, "--size", "4M", "--passes", "3", "--threads", "2")
    b = None
    try:
        a.next(20)  # A's region comes first, so its pages are the first victims
        b = Workload(d.socket, "--size", "2M", "--passes", "4", "--threads", "2")
        b.next(20)

        def a_evicting():
            st = status(d)
            regions = [r for c in st["clients"] if c["pid"] == a.pid for r in c["regions"]]
            return st["writeback_inflight"] > 0 and regions and regions[0]["swapped_bytes"] > 0
        wait_for("A's pages under writeback", a_evicting, timeout=40)
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait(10)
        # The daemon sees A's socket close; A's region lingers (closing) while
        # its writes are in flight, which status shows as audit == None.
        st = wait_for("A gone from status",
                      lambda: (lambda s: s if a.pid not in client_pids(s) else None)(status(d)), timeout=10)
        saw_closing = st["audit"] is None
        # B goes on writing (and reusing freed slots) until A's last write returned...
        wait_for("A's writes returned", lambda: status(d)["audit"] is not None, timeout=20)
        assert b.poll() is None, "B finished before A's region was released: the test did not overlap them"
        # ...then finishes quickly.
        inject(d, {"write_delay": 0.002})
        b.finish_ok(timeout=60)
    finally:
        for p in (a, b):
            if p is not None:
                p.kill()
    st = wait_clean(d)
    assert saw_closing, "A's region had no I/O in flight when it died"
    assert_no_io_overlap(st)
    text = finish_clean(d)
    assert "invariant 3 broken" not in text


def test_sigkill_with_many_reads_queued(engine_backing, start_daemon):
    """24 threads fault on swapped pages at once while every read takes 0.3 s:
    more reads than the daemon has buffers, so some wait in its queue. Killing
    the client must uncharge all of them and release the region, and the
    daemon must still drain and exit on SIGTERM."""
    d = start_daemon(engine_backing, store_size="64M", max_resident="1M", inject={})
    a = Workload(d.socket, "--size", "8M", "--passes", "2", "--threads", "24", "--order", "random")
    try:
        info = a.next(20)
        # Pass 1 writes everything (most of it is swapped out), then slow reads.
        a.wait_line(lambda x: x.get("pass") == 1, timeout=30)
        inject(d, {"read_delay": 0.3})
        wait_for("all read buffers busy", lambda: status(d)["reads_inflight"] >= 16, timeout=20)
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait(10)
    finally:
        a.kill()
    assert info["pages"] == 2048
    st = wait_clean(d, timeout=30)
    assert st["budget_waiters"] == 0, st
    # The daemon can still serve a new client...
    inject(d, {"read_delay": 0})
    b = Workload(d.socket, "--size", "4M", "--passes", "2")
    try:
        b.finish_ok(timeout=60)
    finally:
        b.kill()
    # ...and still drains and exits on SIGTERM.
    t0 = time.monotonic()
    assert d.stop(timeout=30) == 0
    assert time.monotonic() - t0 < 30
    assert "drained: every page is home" in d.log_text()
    assert "Traceback" not in d.log_text(), d.log_text()[-5000:]


def test_clients_killed_while_the_store_fails(engine_backing, start_daemon):
    """A client stalled on failing reads, and another whose writes fail, are
    killed: their regions are still released completely (the read retry and
    the failed writes find the region closed), and the daemon goes on."""
    d = start_daemon(engine_backing, store_size="64M", max_resident="1M", inject={},
                     config={"read_retry_min": "10ms", "read_retry_max": "100ms",
                             "write_retry_min": "10ms", "write_retry_max": "100ms",
                             "slot_quarantine": "0.5s"})
    a = Workload(d.socket, "--size", "4M", "--passes", "2", "--hold")
    try:
        a.wait_line(lambda x: x.get("holding"), timeout=40)
        inject(d, {"fail_reads": ["EIO"]})
        a.send("verify\n")
        wait_for("failed reads", lambda: status(d)["read_errors_total"] >= 3, timeout=20)
        assert a.poll() is None
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait(10)
    finally:
        a.kill()
    wait_clean(d)

    inject(d, {"fail_reads": [], "fail_writes": ["EIO"], "write_delay": 0.05})
    b = Workload(d.socket, "--size", "4M", "--passes", "1", "--hold")
    try:
        b.wait_line(lambda x: x.get("holding"), timeout=40)
        wait_for("failed writes", lambda: status(d)["write_errors_total"] >= 3, timeout=20)
        wait_for("a write in flight", lambda: status(d)["writeback_inflight"] > 0, timeout=20)
        b.proc.send_signal(signal.SIGKILL)
        b.proc.wait(10)
    finally:
        b.kill()
    inject(d, {"fail_writes": [], "write_delay": 0})
    # A healthy client afterwards: swaps, verifies, and leaves nothing behind.
    c = Workload(d.socket, "--size", "4M", "--passes", "2")
    try:
        c.finish_ok(timeout=60)
    finally:
        c.kill()
    assert_no_io_overlap(wait_clean(d))
    finish_clean(d)


CDEATH_NFS = instance("uswap-cdeath")  # this module's own NFS instance: the test below freezes it


@pytest.fixture(scope="module")
def own_nfs_server():
    server = start_nfs_server(CDEATH_NFS)
    yield server
    stop_nfs_server(CDEATH_NFS)


def test_client_killed_while_its_nfs_writes_time_out(own_nfs_server, start_daemon):
    """NFS: a write that timed out may still be executed by the server later,
    so the daemon quarantines its slots instead of reusing them (invariant 3).
    The same must hold when the client that owned the pages is gone by the
    time the write times out: the slots of a closed region's timed-out writes
    must not go straight back to the free pool."""
    url = f"{own_nfs_server['url']}/swap-{uuid.uuid4().hex[:12]}"
    # Each write waits 0.5 s in the injecting wrapper before it reaches the
    # server, so a write seen in flight is certain to meet the frozen server.
    d = start_daemon(url, store_size="64M", max_resident="1M", inject={"write_delay": 0.5},
                     config={"nfs_timeout": "1s", "slot_quarantine": "2s", "write_retry_max": "500ms"})
    pid = own_nfs_server["ganesha_pid"]
    a = Workload(d.socket, "--size", "4M", "--passes", "3", "--threads", "2")
    stopped = False
    try:
        a.next(20)
        wait_for("writes in flight", lambda: status(d)["writeback_inflight"] > 0, timeout=30, interval=0.002)
        freeze(pid)  # every thread stopped, not just signalled
        t_stop = time.monotonic()
        stopped = True
        inject(d, {"write_delay": 0})
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait(10)
        # A's writes time out (nfs_timeout 1 s) after its region closed.
        st = wait_for("A's writes to time out and its region to go",
                      lambda: (lambda s: s if (s["writeback_inflight"] == 0 and not s["clients"]
                                               and s["audit"] is not None) else None)(status(d)),
                      timeout=30)
        # (they waited for the frozen server: the RPC timeout, not an answer)
        assert time.monotonic() - t_stop >= 0.9
        assert st["store"]["quarantined_bytes"] > 0, (
            "the closed region's timed-out writes freed their slots at once: a late write could land"
            f" on a reused slot. store: {st['store']}")
    finally:
        if stopped:
            os.kill(pid, signal.SIGCONT)
        a.kill()
    # The server is back: a healthy client works, and the quarantine drains.
    b = Workload(d.socket, "--size", "2M", "--passes", "2")
    try:
        b.finish_ok(timeout=60)
    finally:
        b.kill()
    finish_clean(d)


# A client that unmaps its region behind the daemon's back (no unregister,
# no free) while its threads fault on it: a buggy or hostile client. Its
# threads then crash on the unmapped memory; only the daemon matters here.
# The touching threads run numpy loops long enough to drop the GIL, so they
# fault in parallel with each other and with the munmap.
ROGUE = textwrap.dedent("""
    import os, sys, threading, time
    import numpy as np
    import uswap
    from uswap import native
    sock, size, unmap_after = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    c = uswap.connect(sock)
    r = c.alloc(size)
    a = np.frombuffer(r.buf, dtype=np.uint64).reshape(-1, 512)
    a[:, 0] = np.arange(a.shape[0])           # write it all: most of it gets swapped out
    print("filled", r.id, flush=True)
    n = a.shape[0]
    def toucher(seed):
        rng = np.random.default_rng(seed)
        while True:
            lo = int(rng.integers(0, n - 600))
            a[lo:lo + 600, 1] += 1            # swap-in faults, then write-protect faults
    for t in range(4):
        threading.Thread(target=toucher, args=(t,), daemon=True).start()
    time.sleep(unmap_after)                   # let the threads fault for a while
    native.munmap(r.addr, r._mapped)          # raw unmap: the daemon gets UFFD_EVENT_UNMAP
    print("unmapped", flush=True)
    os._exit(0)
""")


def test_client_unmapping_its_region_under_faults(engine_backing, start_daemon):
    """A client that munmaps its region while its threads fault on it must not
    take the daemon down (the kernel answers the daemon's ioctls on that range
    with EAGAIN while the unmap is in progress, then ENOENT): the daemon keeps
    serving another client, whose stamps all verify."""
    d = start_daemon(engine_backing, store_size="64M", max_resident="1M", inject={})
    # B goes on until told (its passes cost 1-2 s each here: a fixed count
    # either outlasts the rogues by tens of seconds or risks ending first).
    b = Workload(d.socket, "--size", "2M", "--passes", "1000", "--until-told", "--threads", "2")
    outcomes = []
    try:
        b.next(20)
        for i in range(8):
            rogue = subprocess.Popen([sys.executable, "-c", ROGUE, d.socket, str(4 << 20), str(0.2 + 0.03 * i)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
            try:
                # Its main thread needs the GIL to unmap, and a toucher holds
                # it through a numpy op of up to 600 faults: seconds on a
                # loaded machine (10 s was not always enough).
                out, _ = rogue.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                rogue.kill()   # its own threads may hang on the range it unmapped: not the point here
                out, _ = rogue.communicate()
            outcomes.append((rogue.returncode, out.split()))
            assert d.proc.poll() is None, f"daemon died after rogue client {i} {outcomes}:\n{d.log_text()[-5000:]}"
            status(d)  # still answers
        assert b.poll() is None, "B finished before the rogue clients were done"
        inject(d, {})
        b.send("stop\n")
        lines = b.finish_ok(timeout=120)
        assert all(x["errors"] == 0 for x in lines if "pass" in x), lines
    finally:
        b.kill()
    assert sum("unmapped" in out for _, out in outcomes) >= 4, outcomes
    text = finish_clean(d)
    # The daemon learns of the unmap by the UFFD_EVENT_UNMAP ("unmapped by
    # client") or, when an ioctl on the range meets it first, by checking the
    # client's mappings (RegionSet.ioctl_result): either closes the region.
    assert "unmapped by client" in text or "and the client's mapping is gone" in text, text[-3000:]


# One thread faults on a swapped page while every read takes 1 s; once the
# fault is parked in the daemon, the main thread unmaps the region. The parked
# thread must be woken (it then retries on unmapped memory: SIGSEGV), not left
# blocked in the kernel for ever.
PARKED = textwrap.dedent("""
    import ctypes, os, sys, threading, time
    import numpy as np
    import uswap
    from uswap import native
    c = uswap.connect(sys.argv[1])
    r = c.alloc(4 << 20)
    a = np.frombuffer(r.buf, dtype=np.uint64).reshape(-1, 512)
    a[:, 0] = np.arange(a.shape[0]) + 1       # page 0 is the oldest: swapped out
    print("filled", r.id, flush=True)
    sys.stdin.readline()                      # the test slows reads down
    libc = ctypes.CDLL(None)
    tids = []
    def toucher():
        tids.append(threading.get_native_id())
        libc.memset(ctypes.c_void_p(r.addr), 7, 8)   # faults without holding the GIL
    threading.Thread(target=toucher, daemon=True).start()
    def wchan():
        with open(f"/proc/self/task/{tids[0]}/wchan") as f:
            return f.read()
    deadline = time.monotonic() + 10
    while not tids or wchan() != "handle_userfault":
        assert time.monotonic() < deadline, "the toucher never faulted"
        time.sleep(0.005)
    native.munmap(r.addr, r._mapped)
    print("unmapped", flush=True)
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:
        time.sleep(0.05)
    print("stuck", wchan(), flush=True)      # still blocked: nobody woke the fault
    os._exit(3)
""")


def test_fault_parked_on_an_unmapped_region_is_woken(engine_backing, start_daemon):
    d = start_daemon(engine_backing, store_size="64M", max_resident="1M", inject={})
    rogue = subprocess.Popen([sys.executable, "-c", PARKED, d.socket], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        ready, _, _ = select.select([rogue.stdout], [], [], 30)
        assert ready, "the client did not fill its region within 30 s"
        assert rogue.stdout.readline().startswith("filled"), rogue.stderr.read()
        assert status(d)["swapped_bytes"] >= 2 << 20
        inject(d, {"read_delay": 1.0})
        rogue.stdin.write("go\n")
        rogue.stdin.flush()
        out, err = rogue.communicate(timeout=30)
    finally:
        if rogue.poll() is None:
            rogue.kill()
            rogue.wait()
    # "unmapped" may or may not be printed: the woken toucher's SIGSEGV can kill
    # the process between munmap() returning and the print.
    assert d.proc.poll() is None, d.log_text()[-5000:]
    assert "stuck" not in out, f"the parked fault was never woken: {out}"
    assert rogue.returncode == -signal.SIGSEGV, (rogue.returncode, out, err[-2000:])
    inject(d, {"read_delay": 0})
    finish_clean(d)
