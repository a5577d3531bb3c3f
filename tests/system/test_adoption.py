"""Adoption (uswap/daemon/adoption.py) and handover, against the real
daemon: a client whose daemon is SIGKILLed, or hands over, is served by the
next daemon on the same state directory with every page intact; a state
directory of another store is refused."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.daemon_proc import REPO, DaemonProc
from tests.harness import Workload, assert_audit, ctl, wait_for
from uswap.daemon import pagetable as pt
from uswap.daemon.slots import MAX_REFS

MIB = 1 << 20

# A client that stamps every page of a region (page i holds i and a
# version), says "stamped", waits for "go", reads every page back (each
# touch of a swapped page is a fault the daemon serves), prints how many
# were wrong, and stamps again on "go" until "stop". Reads go through
# numpy with the GIL held: the client's reconnect must not need it.
STAMPER = r"""
import json, sys
import numpy as np
import pytest
import uswap
sock, mib = sys.argv[1], int(sys.argv[2])
c = uswap.connect(sock)
r = c.alloc(mib << 20)
a = np.frombuffer(r.buf, dtype=np.uint64).reshape(-1, 512)
ids = np.arange(len(a), dtype=np.uint64)
def stamp(v):
    a[:, 0] = ids
    a[:, 1:] = (ids * 7919 + v)[:, None]
def bad(v):
    return int(np.count_nonzero((a[:, 0] != ids) | (a[:, 1:] != (ids * 7919 + v)[:, None]).any(axis=1)))
stamp(1)
print(json.dumps({"stamped": True, "region": r.id}), flush=True)
for line in sys.stdin:
    if line.strip() == "stop":
        break
    print(json.dumps({"bad": bad(1), "reconnects": c.reconnects}), flush=True)
c.close()
print(json.dumps({"done": True}), flush=True)
"""


def swapped(d: DaemonProc) -> int:
    return d.status()["swapped_bytes"]


@contextlib.contextmanager
def stamped_client(d: DaemonProc, mib: int, swapped_mib: int = 0):
    """A STAMPER client of `mib` MiB, once at least `swapped_mib` of it is
    swapped out; told to stop and checked to end well on leaving."""
    w = Workload.script(STAMPER, d.socket, mib)
    try:
        w.wait_line(lambda l: l.get("stamped"), 60)
        wait_for("pages swapped out", lambda: swapped(d) >= swapped_mib * MIB, 60)
        yield w
    finally:
        if w.poll() is None:
            w.send("stop\n")
        w.finish_done(60, d)


def check_all(w: Workload) -> dict:
    w.send("check\n")
    line = w.wait_line(lambda l: "bad" in l, 120)
    assert line["bad"] == 0, line
    return line


def test_swapped_pages_survive_sigkill_and_restart(backing, start_daemon):
    d = start_daemon(backing, store_size="128M", max_resident="4M")
    with stamped_client(d, 16, 8) as w:
        assert d.kill() == -signal.SIGKILL
        d.restart()
        assert "adoption: 1 regions" in d.log_text()
        line = check_all(w)  # every page, most of them swapped: served by the new daemon
        assert line["reconnects"] == 1
        st = d.status()
        assert st["adopted_regions_total"] == 1 and st["adoption_waiting"] == 0
        assert st["adoption_seconds"] is not None
        assert "adoption: done in" in d.log_text()
        assert_audit(st)
        out = subprocess.run([sys.executable, "-m", "uswap.cli", "status", "--socket", d.socket],
                             capture_output=True, text=True, timeout=60, cwd=REPO)
        assert "adoption   1 regions adopted, 0 waiting, 0 dropped; done in" in out.stdout, out
        check_all(w)  # and again, after the budget swapped them out again
    assert d.stop() == 0


BLOCKED = r"""
import json, socket, struct, sys, threading
import numpy as np
import pytest
import uswap
sock = sys.argv[1]
c = uswap.connect(sock)
r = c.alloc(8 << 20)
a = np.frombuffer(r.buf, dtype=np.uint64).reshape(-1, 512)
a[:] = 5
print(json.dumps({"stamped": True}), flush=True)
sys.stdin.readline()
# Touch page 0, swapped: the daemon's read of it is held up by injection.
print(json.dumps({"touching": True}), flush=True)
value = int(a[0, 7])
print(json.dumps({"value": value, "reconnects": c.reconnects}), flush=True)
c.status()  # a request: the client takes the keeper's new connection
sec, usec = struct.unpack("ll", c._sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, 16))
print(json.dumps({"rcvtimeo": sec + usec / 1e6}), flush=True)
c.close()
print(json.dumps({"done": True}), flush=True)
"""


def test_thread_blocked_on_a_fault_is_served_by_the_successor(file_backing, start_daemon):
    """The old daemon read the fault and started the page's read (slow by
    injection), then died: the successor finds the page LOADING, not in the
    memfd, takes it as SWAPPED, wakes the thread, and serves its new fault."""
    d = start_daemon(file_backing, store_size="64M", max_resident="2M", inject={"read_delay": 30})
    w = Workload.script(BLOCKED, d.socket)
    try:
        w.wait_line(lambda l: l.get("stamped"), 60)
        wait_for("page 0 swapped", lambda: swapped(d) >= 4 * MIB, 60)
        w.send("go\n")
        w.wait_line(lambda l: l.get("touching"), 30)
        wait_for("the read in flight", lambda: d.status()["reads_inflight"] > 0, 30)
        d.kill()
        d.restart()
        line = w.wait_line(lambda l: "value" in l, 60)
        assert line == {"value": 5, "reconnects": 1}
        # The keeper's 30 s receive timeout for its own exchange is gone
        # from the connection the client took over: a slow reply waits.
        assert w.wait_line(lambda l: "rcvtimeo" in l, 30) == {"rcvtimeo": 0}
        assert "reads_undone" in d.log_text()
    finally:
        w.finish_done(60, d)
    assert d.stop() == 0


# A client whose zero pages were let through for writing by a daemon that
# died before it recorded them dirty (fastpath.c fp_take_wp once
# un-protected first and recorded after; a SIGKILL in between left this):
# it reads N pages (zero fills: clean, no slot, write-protected), then --
# no daemon running -- un-protects them through its own copy of the uffd, as
# the dead daemon's ioctl did, and writes them (no fault: nobody records
# it). Once the successor adopted the region, it writes every other page,
# four budgets' worth, so the first ones are evicted, and reads them back.
UNRECORDED = r"""
import json, sys
import numpy as np
import pytest
import uswap
from uswap import uffd
sock, n = sys.argv[1], int(sys.argv[2])
c = uswap.connect(sock)
r = c.alloc(8 << 20)
a = np.frombuffer(r.buf, dtype=np.uint64).reshape(-1, 512)
print(json.dumps({"zeros": int(np.count_nonzero(a[:n, 0] == 0))}), flush=True)
sys.stdin.readline()
assert uffd.writeprotect(r._uffd, r.addr, n * 4096, protect=False) == 0
want = np.arange(1, n + 1, dtype=np.uint64)
a[:n, 0] = want
print(json.dumps({"written": True}), flush=True)
sys.stdin.readline()
a[n:, 0] = 7
print(json.dumps({"bad": int(np.count_nonzero(a[:n, 0] != want)), "reconnects": c.reconnects}), flush=True)
c.close()
print(json.dumps({"done": True}), flush=True)
"""


def test_zero_pages_written_before_the_daemon_recorded_them_are_adopted_dirty(file_backing, start_daemon):
    n = 16
    d = start_daemon(file_backing, store_size="64M", max_resident="2M")
    w = Workload.script(UNRECORDED, d.socket, n)
    try:
        assert w.wait_line(lambda l: "zeros" in l, 60) == {"zeros": n}
        assert d.kill() == -signal.SIGKILL
        w.send("go\n")
        w.wait_line(lambda l: l.get("written"), 60)
        d.restart()
        wait_for("region adopted", lambda: d.status()["adopted_regions_total"] == 1, 60)
        w.send("go\n")
        line = w.wait_line(lambda l: "bad" in l, 120)
        # Taken as clean zero pages, they were dropped at eviction and read
        # back as zeros: all n lost (16 of 16 before adoption checked them).
        assert line == {"bad": 0, "reconnects": 1}, line
        assert f"written_unrecorded {n}" in d.log_text()   # adoption found them written
        st = d.status()
        assert st["swapouts_total"] > 0, st
        assert_audit(st)
    finally:
        w.finish_done(60, d)
    assert d.stop() == 0


def test_handover_keeps_pages_swapped_and_the_successor_serves_them(backing, start_daemon):
    d = start_daemon(backing, store_size="128M", max_resident="4M")
    with stamped_client(d, 16, 8) as w:
        d.proc.send_signal(signal.SIGUSR2)
        assert d.proc.wait(60) == 0
        log = d.log_text()
        assert "SIGUSR2: handing over" in log and "handover: done" in log
        assert "draining" not in log and "drained:" not in log  # nothing came home
        d.restart()
        # Adopted with its pages still on the store.
        wait_for("region reclaimed", lambda: d.status()["adopted_regions_total"] == 1, 60)
        assert d.status()["swapped_bytes"] >= 8 * MIB
        check_all(w)
        assert_audit(d.status())
    assert d.stop() == 0


def test_handover_op_from_the_command_line(file_backing, start_daemon):
    d = start_daemon(file_backing, store_size="64M", max_resident="4M")
    with stamped_client(d, 8) as w:
        out = subprocess.run([sys.executable, "-m", "uswap.cli", "handover", "--socket", d.socket],
                             capture_output=True, text=True, timeout=60, cwd=REPO)
        assert out.returncode == 0, out.stderr
        assert d.proc.wait(60) == 0
        d.restart()
        check_all(w)
    assert d.stop() == 0


def test_state_dir_of_another_store_is_refused(tmp_path, start_daemon):
    d = start_daemon(str(tmp_path / "store-a"), store_size="64M", max_resident="4M")
    with stamped_client(d, 8) as w:
        d.kill()
        out = subprocess.run([sys.executable, "-m", "uswap.cli", "run", "--backing", str(tmp_path / "store-b"),
                              "--store-size", "64M", "--max-resident", "4M", "--socket", str(tmp_path / "b.sock"),
                              "--state-dir", d.state_dir], capture_output=True, text=True, timeout=60, cwd=REPO)
        assert out.returncode == 2
        assert f"state_dir: {d.state_dir} holds the regions of a daemon of another store" in out.stderr
        assert "store-a" in out.stderr and "store-b" in out.stderr
        # Still adoptable by its own store's daemon.
        d.restart()
        check_all(w)
    assert d.stop() == 0


def test_a_drained_daemon_leaves_nothing_to_adopt(file_backing, start_daemon):
    d = start_daemon(file_backing, store_size="64M", max_resident="4M")
    with stamped_client(d, 8) as w:
        assert d.stop() == 0
        assert sorted(os.listdir(d.state_dir)) == ["lock"]
        check_all(w)  # handed back: plain memory, no daemon needed


def test_region_not_reclaimed_in_time_is_dropped(file_backing, start_daemon, tmp_path):
    d = start_daemon(file_backing, store_size="64M", max_resident="4M", config={"adopt_timeout": "1s"})
    w = Workload.script(STAMPER, d.socket, 8)
    w.wait_line(lambda l: l.get("stamped"), 60)
    d.kill()
    w.kill()  # dies while no daemon runs: nobody reclaims its region
    d.restart()
    assert d.status()["adoption_waiting"] == 1
    wait_for("region dropped", lambda: d.status()["adoption_dropped_total"] == 1, 30)
    st = d.status()
    # Every slot is free but those of writes the dead daemon had in flight,
    # quarantined (one may still land: docs/design.md section 9).
    assert st["store"]["used_bytes"] == st["store"]["quarantined_bytes"] and st["adoption_waiting"] == 0, st["store"]
    assert_audit(st)
    assert "was not reclaimed within adopt_timeout" in d.log_text()
    assert json.loads(json.dumps(st))["adopted_regions_total"] == 0
    assert d.stop() == 0


def test_adopt_timeout_runs_from_the_first_successor_not_each(file_backing, start_daemon):
    """A daemon that dies again before adopt_timeout does not restart the
    orphans' clock: a daemon crash-looping faster than adopt_timeout kept a
    dead client's region (and its slots) for ever. (Each start still gives
    clients a grace of 5 s, half of adopt_timeout here, to come back.)"""
    timeout = 10.0
    d = start_daemon(file_backing, store_size="64M", max_resident="4M", config={"adopt_timeout": f"{timeout}s"})
    w = Workload.script(STAMPER, d.socket, 8)
    w.wait_line(lambda l: l.get("stamped"), 60)
    d.kill()
    w.kill()  # dies while no daemon runs: nobody reclaims its region
    d.restart()
    first = d.status()["adoption_deadline_s"]
    t_first = time.monotonic()
    assert 0 < first <= timeout
    # Some of the time gone, the successor dies; the next one goes on from there.
    wait_for("some of adopt_timeout gone", lambda: d.status()["adoption_deadline_s"] <= timeout - 3, 30)
    d.kill()
    d.restart()
    st = d.status()
    gone = time.monotonic() - t_first
    assert st["adoption_waiting"] == 1, st
    assert st["adoption_deadline_s"] <= max(first - gone, 5.0) + 0.5, (first, gone, st["adoption_deadline_s"])
    wait_for("region dropped", lambda: d.status()["adoption_dropped_total"] == 1, 30, interval=0.05)
    # Dropped on the first successor's clock (or at the end of the second's
    # grace), not adopt_timeout after the second started.
    assert time.monotonic() - t_first < max(first, gone + 5.0) + 2.0
    assert_audit(d.status())
    assert d.stop() == 0


def test_a_reclaimed_region_is_an_orphan_no_more(file_backing, start_daemon):
    """Once its client is back, a region's orphan clock is gone from its
    metadata: a later death starts it anew (a stale one would drop a live
    client's region at once)."""
    d = start_daemon(file_backing, store_size="64M", max_resident="4M")
    with stamped_client(d, 8, 4) as w:
        d.kill()
        d.restart()
        wait_for("region reclaimed", lambda: d.status()["adopted_regions_total"] == 1, 60)
        metas = [f for f in os.listdir(d.state_dir) if f.startswith("region-") and f.endswith(".json")]
        assert len(metas) == 1, metas
        with open(os.path.join(d.state_dir, metas[0])) as f:
            assert "orphaned_at" not in json.load(f)
        check_all(w)
    assert d.stop() == 0


def test_run_handover_takes_over_from_the_running_daemon(file_backing, start_daemon):
    d = start_daemon(file_backing, store_size="64M", max_resident="4M")
    with stamped_client(d, 8, 4) as w:
        assert d.handover() == 0
        wait_for("region reclaimed", lambda: d.status()["adopted_regions_total"] == 1, 60)
        assert d.status()["swapped_bytes"] >= 4 * MIB
        check_all(w)
    assert d.stop() == 0


def test_writes_in_flight_at_death_are_redone(file_backing, start_daemon):
    """Killed with store writes in flight (slow by injection): the successor
    finds those pages WRITEBACK, keeps them resident and dirty (the slot copy
    may be torn), quarantines the slots, and writes them again."""
    d = start_daemon(file_backing, store_size="64M", max_resident="4M", inject={"write_delay": 30})
    w = Workload.script(STAMPER, d.socket, 8)  # its stamping waits for room the slow writes make
    try:
        wait_for("writes in flight", lambda: d.status()["writeback_inflight"] > 0, 60)
        d.kill()
        d.restart()
        w.wait_line(lambda l: l.get("stamped"), 60)
        check_all(w)
        assert "torn_writes" in d.log_text()
        st = d.status()
        assert st["store"]["quarantined_bytes"] > 0 or st["pages_written_total"] > 0
        assert_audit(st)
        check_all(w)
        w.send("stop\n")
        w.finish_done(60, d)
    finally:
        w.kill()
    assert d.stop() == 0


def test_adopt_refuses_what_is_not_the_region(file_backing, start_daemon):
    """An orphan is served again only on its own memfd, range and owner; a
    refusal is an entry of the reply, and the orphan goes on waiting."""
    import socket

    from uswap import native, protocol, uffd

    d = start_daemon(file_backing, store_size="64M", max_resident="4M")
    w = Workload.script(STAMPER, d.socket, 8)
    w.wait_line(lambda l: l.get("stamped"), 60)
    region_id = w.lines[-1]["region"]
    d.kill()
    w.kill()  # its orphan waits for a client that will not come
    d.restart()
    memfd = os.memfd_create("not-the-region", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(memfd, 8 * MIB)
    addr = native.mmap_shared(memfd, 8 * MIB)
    ufd = uffd.open_uffd()
    uffd.register(ufd, addr, 8 * MIB, uffd.REGISTER_MISSING | uffd.REGISTER_WP | uffd.REGISTER_MINOR)
    try:
        meta = json.load(open(os.path.join(d.state_dir, f"region-{region_id}.json")))
        asks = [({"id": 99, "addr": addr, "size": 8 * MIB}, "no region 99 waits for adoption here"),
                ({"id": region_id, "addr": addr + 4096, "size": 8 * MIB}, "addr"),
                ({"id": region_id, "addr": meta["addr"], "size": 8 * MIB}, "the memfd sent is not the region's memfd")]
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(30)
            s.connect(d.socket)
            protocol.send(s, {"op": "hello", "version": protocol.VERSION})
            protocol.recv(s)
            for entry, why in asks:
                protocol.send(s, {"op": "adopt", "regions": [entry]}, [ufd, memfd])
                reply, _ = protocol.recv(s)
                (got,) = reply["regions"]
                assert got["ok"] is False and why in got["error"], (entry, reply)
        st = d.status()
        assert st["adoption_waiting"] == 1 and st["adopted_regions_total"] == 0
    finally:
        uffd.unregister(ufd, addr, 8 * MIB)  # else munmap waits for someone to read its UNMAP event
        native.munmap(addr, 8 * MIB)
        os.close(ufd)
        os.close(memfd)
    assert d.stop() == 0


def test_writeback_begun_but_no_slot_recorded_at_death(file_backing, start_daemon):
    """Killed between the two stores that start a write-back
    (Writeback.start_writeback: the page's state WRITEBACK, then its slot):
    the table holds a WRITEBACK page that names no slot, and no write was
    queued. The successor makes it RESIDENT dirty, and has no slot to
    quarantine for it (a slot -1 was quarantined: the slot references no
    longer added up, and freeing it when the quarantine ended dropped a
    reference nothing held)."""
    d = start_daemon(file_backing, store_size="64M", max_resident="4M")
    with stamped_client(d, 8, 2) as w:
        # No write of its own in flight: the only WRITEBACK pages are the test's.
        wait_for("writes ended", lambda: d.status()["writeback_inflight"] == 0, 60)
        assert d.kill() == -signal.SIGKILL
        (meta_path,) = [os.path.join(d.state_dir, f) for f in os.listdir(d.state_dir)
                        if f.startswith("region-") and f.endswith(".json")]
        with open(meta_path) as f:
            meta = json.load(f)
        table = pt.PageTable.load(meta_path[:-len(".json")] + ".table", meta["npages"])
        dirty = np.flatnonzero((table.state == pt.RESIDENT) & ((table.flags & pt.F_DIRTY) != 0) & (table.slot < 0))
        assert len(dirty), "no dirty resident page to start a write-back of"
        half_made = dirty[:4]
        table.state[half_made] = pt.WRITEBACK  # the first store made, the slot's not
        table.flags[half_made] = pt.F_EVICT  # (either order of the two: same outcome)
        del table
        d.restart()
        check_all(w)
        assert "torn_writes 4" in d.log_text()
        st = d.status()
        assert st["store"]["quarantined_bytes"] == 0, st["store"]
        assert_audit(st)
    assert d.stop() == 0


def test_writes_of_a_freed_region_in_flight_at_death_keep_their_slots_quarantined(file_backing, start_daemon):
    """A region freed while its store writes are in flight (slow by
    injection), then the daemon killed: nobody adopts the region (its free
    was answered), but a write of the dead daemon may still land in those
    slots (nfs://: a request in the server's queue), so the successor
    quarantines them as it does an adopted region's. They were free at
    once: the region's metadata went when it started closing, and its table
    was removed unread."""
    import uswap
    # Evicted for a per-uid share with the budget's room to spare: this
    # process's own writes never wait for the slow store writes (a fault
    # waiting for room would stall it with the GIL held).
    d = start_daemon(file_backing, store_size="64M", max_resident="64M", inject={"write_delay": 30},
                     config={"max_resident_per_uid": "4M"})
    with uswap.connect(d.socket) as c:
        r = c.alloc(8 << 20)
        r.buf[:] = b"\x5a" * r.size  # past the share: writes start, each held 30 s
        wait_for("writes in flight", lambda: d.status()["writeback_inflight"] > 0, 60)
        r.close()  # answered: the region is closing
        st = d.status()
        assert st["writeback_inflight"] > 0 and st["audit"] is None, st  # (no audit while one closes)
        assert d.kill() == -signal.SIGKILL
        d.restart()
        st = d.status()
        assert st["adoption_waiting"] == 0 and st["adopted_regions_total"] == 0, st
        assert st["store"]["quarantined_bytes"] > 0, st["store"]
        assert_audit(st)
    assert d.stop() == 0


def test_quarantine_is_held_through_two_deaths_and_a_drain(file_backing, start_daemon):
    """Quarantined slots are named by no page table, so a successor that
    died in turn left nothing saying they were held: the third daemon handed
    them out while a late write of the first (nfs://) could still land in
    them. The quarantine is kept in the state directory (quarantine.json),
    held again by every successor, and kept through a drain for this store's
    next daemon."""
    # As the freed-region test above: writes of a freed region in flight at death.
    d = start_daemon(file_backing, store_size="64M", max_resident="64M", inject={"write_delay": 30},
                     config={"max_resident_per_uid": "4M"})
    held = _quarantine_a_freed_regions_writes(d)
    assert d.kill() == -signal.SIGKILL  # the successor dies too, within slot_quarantine
    d.restart()
    st = d.status()
    assert st["store"]["quarantined_bytes"] == held, st["store"]
    assert st["store"]["used_bytes"] >= held, st["store"]
    assert_audit(st)
    assert d.stop() == 0  # drained: nothing left to adopt, the quarantine stays
    d.restart()
    st = d.status()
    assert st["store"]["quarantined_bytes"] == held, st["store"]
    assert_audit(st)
    assert d.stop() == 0


def test_region_dropped_unclaimed_keeps_the_slots_of_its_dead_writes_quarantined(file_backing, start_daemon):
    """An orphan whose client never comes back, left with store writes in
    flight (slow by injection): dropped at adopt_timeout, but those slots
    stay quarantined, as an adopted region's would (a write of the dead
    daemon may still land: nfs://). They were freed with the rest."""
    d = start_daemon(file_backing, store_size="64M", max_resident="4M", inject={"write_delay": 30},
                     config={"adopt_timeout": "1s"})
    w = Workload.script(STAMPER, d.socket, 8)  # its stamping waits for room the slow writes make
    try:
        wait_for("writes in flight", lambda: d.status()["writeback_inflight"] > 0, 60)
        d.kill()
    finally:
        w.kill()  # dies while no daemon runs: nobody reclaims its region
    d.restart()
    wait_for("region dropped", lambda: d.status()["adoption_dropped_total"] == 1, 30)
    st = d.status()
    assert st["store"]["quarantined_bytes"] > 0, st["store"]
    assert_audit(st)
    assert d.stop() == 0


def test_a_repeated_free_from_another_process_leaves_the_orphan(file_backing, start_daemon):
    """A free marked repeated (client.py _again_on_the_next_daemon) drops
    the orphan it names only for the process that made it: another process
    of the same uid, sending it with the id of a region whose client has
    not reconnected yet (here: stopped), dropped that live region, and its
    client lost every page when it came back."""
    import socket

    from uswap import protocol
    d = start_daemon(file_backing, store_size="64M", max_resident="4M")
    with stamped_client(d, 8, 2) as w:
        rid = next(line["region"] for line in w.lines if line.get("stamped"))
        os.kill(w.pid, signal.SIGSTOP)  # its keeper cannot reconnect for now
        try:
            assert d.kill() == -signal.SIGKILL
            d.restart()
            assert d.status()["adoption_waiting"] == 1
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(10)
                s.connect(d.socket)
                protocol.send(s, {"op": "hello", "version": protocol.VERSION})
                protocol.recv(s)
                protocol.send(s, {"op": "free", "region": rid, "repeated": True})
                protocol.recv(s)
            assert d.status()["adoption_waiting"] == 1
        finally:
            os.kill(w.pid, signal.SIGCONT)
        check_all(w)
        assert_audit(d.status())
    assert d.stop() == 0


def _quarantine_a_freed_regions_writes(d: DaemonProc) -> int:
    """The recipe of the freed-region test and the two-deaths test on daemon `d` (started with
    write_delay and a 4M per-uid share): a region freed with its writes in
    flight, the daemon killed and restarted; the bytes the successor holds."""
    import uswap
    with uswap.connect(d.socket) as c:
        r = c.alloc(8 << 20)
        r.buf[:] = b"\x5a" * r.size
        wait_for("writes in flight", lambda: d.status()["writeback_inflight"] > 0, 60)
        r.close()
        assert d.kill() == -signal.SIGKILL
    d.restart()
    held = d.status()["store"]["quarantined_bytes"]
    assert held > 0
    return held


def test_quarantine_of_a_store_survives_another_store_using_the_drained_directory(file_backing, start_daemon,
                                                                                   tmp_path):
    """A drained state directory may serve another store next
    (StateDir.clear); that store's daemon ignores the first store's
    quarantine (url and header id differ), but must not drop it: the first
    store's next daemon on this directory still holds those slots."""
    opts = dict(store_size="64M", max_resident="64M", inject={"write_delay": 30},
                config={"max_resident_per_uid": "4M"})
    d = start_daemon(file_backing, **opts)
    held = _quarantine_a_freed_regions_writes(d)
    assert d.stop() == 0  # drained: the quarantine stays, for store A's next daemon
    os.makedirs(tmp_path / "b")
    other = DaemonProc(str(tmp_path / "b"), str(tmp_path / "b" / "store-b"), state_dir=d.state_dir, **opts)
    try:
        assert other.status()["store"]["quarantined_bytes"] == 0  # not its slots
        _quarantine_a_freed_regions_writes(other)  # store B holds slots of its own
        assert other.stop() == 0
    finally:
        if other.proc.poll() is None:
            other.kill()
    d.restart()
    st = d.status()
    assert st["store"]["quarantined_bytes"] == held, st["store"]
    assert_audit(st)
    assert d.stop() == 0


# A client's region of MIB MiB (argv: socket, MIB), every page stamped; what
# PARTS and HOLE do with it follows.
STAMPED_REGION = r"""
import ctypes, json, sys
import numpy as np
import uswap
sock, mib = sys.argv[1], int(sys.argv[2])
c = uswap.connect(sock)
r = c.alloc(mib << 20)
a = np.frombuffer(r.buf, dtype=np.uint64).reshape(-1, 512)
ids = np.arange(len(a), dtype=np.uint64)
a[:] = (ids * 7919)[:, None]
half = len(a) // 2
print(json.dumps({"stamped": True, "region": r.id}), flush=True)
"""

PARTS = STAMPED_REGION + r"""
for line in sys.stdin:
    cmd = line.strip()
    if cmd == "unmap":  # the second half taken away, as a foreign MAP_FIXED mapping or a mremap shrink does
        libc = ctypes.CDLL(None, use_errno=True)
        libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
        assert libc.munmap(r.addr + half * 4096, r.size - half * 4096) == 0, ctypes.get_errno()
        print(json.dumps({"unmapped": True}), flush=True)
    elif cmd == "cover":  # a foreign mapping MAP_FIXED over the second half, as an allocator's
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
        got = libc.mmap(r.addr + half * 4096, r.size - half * 4096, 3, 0x32, -1, 0)  # RW, PRIVATE|ANON|FIXED
        assert got == r.addr + half * 4096, ctypes.get_errno()
        ctypes.memset(got, 0x77, r.size - half * 4096)
        print(json.dumps({"unmapped": True}), flush=True)
    elif cmd == "check":
        print(json.dumps({"bad": int(np.count_nonzero(a[:half] != (ids[:half] * 7919)[:, None]))}), flush=True)
"""


@pytest.mark.parametrize("how", ["munmap-handover", "map_fixed-sigkill"])
def test_a_region_mapped_in_parts_is_adopted_after_a_handover(file_backing, start_daemon, how):
    """A region its client maps only in parts (docs/design.md section 7:
    under uswap exec a foreign MAP_FIXED mapping over part of a heap region;
    or a munmap of its second half, which the daemon forgets) is handed
    over, or its daemon killed, like any other: the successor adopts the
    parts still mapped, and the pages swapped out of them come back intact.
    (The adopt op checked the registration of the whole region: refused,
    dropped at adopt_timeout, and the client hung on its next fault.)"""
    d = start_daemon(file_backing, store_size="64M", max_resident="4M", config={"adopt_timeout": "5s"})
    w = Workload.script(PARTS, d.socket, 8)
    try:
        w.wait_line(lambda l: l.get("stamped"), 60)
        wait_for("pages swapped out", lambda: swapped(d) >= 2 * MIB, 60)
        w.send("unmap\n" if how.startswith("munmap") else "cover\n")
        w.wait_line(lambda l: l.get("unmapped"), 30)
        wait_for("the unmapped half forgotten", lambda: d.status()["forgotten_pages_total"] >= 1024, 30)
        if how.endswith("handover"):
            assert d.handover() == 0
        else:
            assert d.kill() == -signal.SIGKILL
            d.restart()
        wait_for("the orphan adopted or dropped", lambda: d.status()["adoption_waiting"] == 0, 60)
        st = d.status()
        assert st["adopted_regions_total"] == 1 and st["adoption_dropped_total"] == 0, (st, d.log_text()[-2000:])
        w.send("check\n")
        assert w.wait_line(lambda l: "bad" in l, 60)["bad"] == 0
        assert_audit(d.status())
    finally:
        w.kill()
    assert d.stop() == 0


# A client whose region's first half is clean in memory (read back from the
# store), and which, while its daemon is dead, maps a foreign mapping over a
# hole in the middle of it (MAP_FIXED, as an allocator under uswap exec) on
# a thread of its own and reads the UNMAP event from its own uffd (the mmap
# waits until it is read): what a daemon killed after reading
# the event and before applying it leaves (then no protect of the uffd
# fails EAGAIN, as all do while an event is unread).
HOLE = STAMPED_REGION + r"""
import os, select, threading
sys.stdin.readline()
print(json.dumps({"read": int(np.count_nonzero(a[:half, 0] != ids[:half] * 7919))}), flush=True)
hole_first, hole_pages = map(int, sys.stdin.readline().split())
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
# RW, PRIVATE|ANON|FIXED: a foreign mapping takes the hole (a mere munmap leaves no VMA there, which
# UFFDIO_WRITEPROTECT skips; a VMA not registered with the uffd fails it ENOENT).
unmapper = threading.Thread(target=libc.mmap, args=(r.addr + hole_first * 4096, hole_pages * 4096, 3, 0x32, -1, 0),
                            daemon=True)
unmapper.start()
p = select.poll()
p.register(r._uffd, select.POLLIN)
assert p.poll(30000), "no UNMAP event"
msg = os.read(r._uffd, 32)
assert msg[0] == 0x16, msg  # UFFD_EVENT_UNMAP
unmapper.join(30)
assert not unmapper.is_alive()
print(json.dumps({"unmapped": True}), flush=True)
sys.stdin.readline()
kept = np.r_[0:hole_first, hole_first + hole_pages:len(a)]
print(json.dumps({"bad": int(np.count_nonzero(a[kept] != (ids[kept] * 7919)[:, None]))}), flush=True)
"""


def test_clean_pages_beside_a_part_mapped_over_while_the_daemon_was_dead_are_adopted_clean(file_backing, start_daemon):
    """resolve.py `_verify_clean` write-protects the clean pages of an
    adopted region run by run, then compares each with its slot copy. A
    run reaching into a part a foreign mapping took while its daemon was dead
    (its UNMAP event read, not applied: forgotten once the region is live)
    failed as a whole (ENOENT), and every page of it was taken as written
    unrecorded: dirty, its slot freed, to be written to the store again
    (before: the 2/3 of the run still mapped, counted in written_unrecorded
    with the hole). Now each page of such a run is protected on its own:
    only those the kernel will not protect are dirty (logged as
    not_protected: the hole), the others are checked as any clean page."""
    d = start_daemon(file_backing, store_size="64M", max_resident="4M")
    w = Workload.script(HOLE, d.socket, 8)
    try:
        w.wait_line(lambda l: l.get("stamped"), 60)
        wait_for("the first half swapped out", lambda: swapped(d) >= 3 * MIB, 60)
        ctl(d, {"op": "budget", "max_resident": "32M"})  # what is read back stays, clean
        w.send("\n")
        assert w.wait_line(lambda l: "read" in l, 60)["read"] == 0
        assert d.kill() == -signal.SIGKILL
        # The longest run of clean pages with a slot; the hole is its middle third.
        t = _only_table(d)
        clean = (t.state == pt.RESIDENT) & ((t.flags & pt.F_DIRTY) == 0) & (t.slot >= 0)
        first, n = max(pt.runs(np.flatnonzero(clean), 1 << 30), key=lambda run: run[1])
        assert n >= 96, (first, n)
        hole_first, hole_pages = first + n // 3, n // 3
        w.send(f"{hole_first} {hole_pages}\n")
        w.wait_line(lambda l: l.get("unmapped"), 30)
        d.restart()
        wait_for("region adopted", lambda: d.status()["adopted_regions_total"] == 1, 60)
        w.send("\n")
        assert w.wait_line(lambda l: "bad" in l, 120)["bad"] == 0
        resolved = [line for line in d.log_text().splitlines() if "reclaimed (" in line]
        assert resolved and "written_unrecorded" not in resolved[0], resolved
        assert f"not_protected {hole_pages}" in resolved[0], resolved
        assert_audit(d.status())
    finally:
        w.kill()
    assert d.stop() == 0


def _only_region(d: DaemonProc) -> tuple[str, dict]:
    """The state directory's one region: the path of its metadata, and that."""
    (meta_path,) = [os.path.join(d.state_dir, f) for f in os.listdir(d.state_dir)
                    if f.startswith("region-") and f.endswith(".json")]
    with open(meta_path) as f:
        return meta_path, json.load(f)


def _only_table(d: DaemonProc) -> pt.PageTable:
    meta_path, meta = _only_region(d)
    return pt.PageTable.load(meta_path[:-len(".json")] + ".table", meta["npages"])


def _write_quarantine(d: DaemonProc, slots: np.ndarray) -> None:
    """quarantine.json as a dead daemon of this store would have left it."""
    with open(os.path.join(d.state_dir, "store.json")) as f:
        store = json.load(f)
    with open(os.path.join(d.state_dir, "quarantine.json"), "w") as f:
        json.dump({"store": store, "runs": [[int(s), 1] for s in slots]}, f)


def test_a_quarantine_file_naming_a_slot_many_times_holds_it_once(file_backing, start_daemon):
    """A damaged quarantine.json names one slot (that a page table names
    too) as many times as a slot may be referenced (MAX_REFS). The successor
    claimed a reference per repeat, the table's claim then passed MAX_REFS,
    and its OverflowError stopped the daemon at start: every client
    stranded. A slot is held by the quarantine once, however often the file
    names it: the daemon starts, the region is adopted, every page reads
    back, and the slot is freed once the quarantine ends."""
    d = start_daemon(file_backing, store_size="64M", max_resident="4M", config={"slot_quarantine": "1s"})
    with stamped_client(d, 8, 2) as w:
        wait_for("writes ended", lambda: d.status()["writeback_inflight"] == 0, 60)
        assert d.kill() == -signal.SIGKILL
        table = _only_table(d)
        slot = int(table.slot[np.flatnonzero(table.state == pt.SWAPPED)[0]])
        del table
        _write_quarantine(d, np.full(MAX_REFS, slot))
        d.restart()  # before: the daemon exited at start (OverflowError from SlotAllocator.claim)
        st = d.status()
        assert st["store"]["quarantined_bytes"] == 4096, st["store"]
        assert_audit(st)
        check_all(w)
        wait_for("quarantine ended", lambda: d.status()["store"]["quarantined_bytes"] == 0, 30)
        assert_audit(d.status())
        check_all(w)
    st = d.status()
    assert st["store"]["used_bytes"] == 0, st["store"]
    assert d.stop() == 0


def test_a_quarantine_file_naming_slots_a_table_names_holds_one_reference_each(file_backing, start_daemon):
    """quarantine.json may name a slot a page table names too: a daemon
    killed after it freed an expired run but before the file was rewritten,
    and the slot since given to a page. The successor claims both
    references; the quarantine's end drops its own only, so the page's copy
    is neither freed nor lost, and the file is rewritten without it."""
    d = start_daemon(file_backing, store_size="64M", max_resident="4M", config={"slot_quarantine": "1s"})
    with stamped_client(d, 8, 2) as w:
        wait_for("writes ended", lambda: d.status()["writeback_inflight"] == 0, 60)
        assert d.kill() == -signal.SIGKILL
        table = _only_table(d)
        slots = table.slot[np.flatnonzero(table.state == pt.SWAPPED)[:16]].copy()
        del table
        assert len(slots) == 16
        _write_quarantine(d, slots)
        d.restart()
        st = d.status()
        assert st["store"]["quarantined_bytes"] == 16 * 4096, st["store"]
        assert_audit(st)
        check_all(w)
        wait_for("quarantine ended", lambda: d.status()["store"]["quarantined_bytes"] == 0, 30)
        assert_audit(d.status())
        check_all(w)
        with open(os.path.join(d.state_dir, "quarantine.json")) as f:
            assert [e["runs"] for e in json.load(f)["stores"]] == [[]]
    st = d.status()
    assert st["store"]["used_bytes"] == 0, st["store"]  # every reference dropped once, none twice
    assert d.stop() == 0


def test_a_quarantine_file_naming_the_slots_of_writes_in_flight_quarantines_them_twice(file_backing,
                                                                                       start_daemon):
    """A daemon killed between the quarantine of a failed write's slots
    (persisted first) and its table's update: the successor finds the
    slots in quarantine.json and under WRITEBACK pages, and holds each
    twice (two references, two runs), all dropped when they end."""
    d = start_daemon(file_backing, store_size="64M", max_resident="4M", inject={"write_delay": 30},
                     config={"slot_quarantine": "1s"})
    w = Workload.script(STAMPER, d.socket, 8)
    try:
        wait_for("writes in flight", lambda: d.status()["writeback_inflight"] > 0, 60)
        assert d.kill() == -signal.SIGKILL
        table = _only_table(d)
        slots = table.slot[np.flatnonzero((table.state == pt.WRITEBACK) & (table.slot >= 0))].copy()
        del table
        assert len(slots)
        _write_quarantine(d, slots)
        d.restart()
        w.wait_line(lambda l: l.get("stamped"), 60)
        check_all(w)
        st = d.status()
        assert st["store"]["quarantined_bytes"] == 2 * len(slots) * 4096, st["store"]
        assert_audit(st)
        wait_for("quarantine ended", lambda: d.status()["store"]["quarantined_bytes"] == 0, 30)
        assert_audit(d.status())
        check_all(w)
        w.send("stop\n")
        w.finish_done(60, d)
    finally:
        w.kill()
    st = d.status()
    assert st["store"]["used_bytes"] == 0, st["store"]
    assert d.stop() == 0


def test_the_quarantine_ends_with_the_daemon_out_of_fds(file_backing, start_daemon):
    """The daemon lives through a full fd table (test_connections_limits.py:
    refusals, never a crash). The quarantine is rewritten in the state
    directory whenever it changes, which takes an fd: with none left, the
    rewrite cannot be made, and the daemon must go on (the file then names
    slots no longer held: a successor holds them a while longer, which is
    safe) instead of dying."""
    import socket

    from uswap import protocol
    d = start_daemon(file_backing, store_size="64M", max_resident="64M", inject={"write_delay": 30},
                     nofile=(160, 160), config={"max_resident_per_uid": "4M", "slot_quarantine": "10s",
                                                 "max_clients": 1000, "handshake_timeout": "60s"})
    _quarantine_a_freed_regions_writes(d)  # the successor holds them, its clock starting at its first write
    held = []
    try:
        while True:  # connections until the daemon's fd table is full: an EMFILE refusal
            assert len(held) < 400
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(15)
            s.connect(d.socket)
            protocol.send(s, {"op": "hello", "version": protocol.VERSION})
            reply, _ = protocol.recv(s)
            if "EMFILE" in str(reply.get("error")):
                s.close()
                break
            assert reply.get("ok", True) is not False, reply
            held.append(s)
        wait_for("the quarantine's end failing to be recorded, or the daemon dead",
                 lambda: d.proc.poll() is not None or "cannot record the quarantined slots" in d.log_text(), 60)
        assert d.proc.poll() is None, d.log_text()[-2000:]
    finally:
        for s in held:
            s.close()
    # With fds free again, the state directory catches up (at the next settle).
    path = os.path.join(d.state_dir, "quarantine.json")

    def recorded_empty() -> bool:
        with open(path) as f:
            held_runs = json.load(f)
        return all(e["runs"] == [] for e in held_runs.get("stores", [held_runs]))
    wait_for("the quarantine's end recorded", lambda: d.status()["store"]["quarantined_bytes"] == 0
             and recorded_empty(), 60)
    assert_audit(d.status())
    assert d.stop() == 0


def test_a_table_naming_a_slot_at_two_pages_is_refused_as_damaged(file_backing, start_daemon):
    """A state directory damaged from outside: a page table names one slot
    at two pages (a fork's share is another table's, never a repeat within
    one). The successor claimed each repeat and freed the slot once when
    the orphan was dropped: the slot stayed used for ever. Now the table is
    refused as damaged, as one naming a slot outside the store is, logged
    with its region, slot and pages; the slot of its write in flight is
    quarantined (a late write may still land there), nothing else is held."""
    d = start_daemon(file_backing, store_size="64M", max_resident="4M", config={"adopt_timeout": "1s"})
    w = Workload.script(STAMPER, d.socket, 8)
    w.wait_line(lambda l: l.get("stamped"), 60)
    wait_for("pages swapped, writes ended",
             lambda: swapped(d) >= 2 * MIB and d.status()["writeback_inflight"] == 0, 60)
    assert d.kill() == -signal.SIGKILL
    w.kill()  # nobody reclaims the region: dropped at adopt_timeout unless refused at start
    table = _only_table(d)
    a, b, c = np.flatnonzero((table.state == pt.SWAPPED) & (table.slot >= 0))[:3].tolist()
    repeated, writing = int(table.slot[a]), int(table.slot[c])
    table.slot[b] = repeated  # page b's own slot is named by no table now: free
    table.state[c] = pt.WRITEBACK  # a write of the dead daemon to page c's slot may still land
    del table
    d.restart()
    # Refused at start now; before, dropped at adopt_timeout: either way gone.
    wait_for("region dropped", lambda: d.status()["adoption_dropped_total"] == 1, 30)
    st = d.status()
    assert st["adoption_waiting"] == 0 and st["adopted_regions_total"] == 0, st
    assert st["store"]["quarantined_bytes"] == 4096, st["store"]
    assert st["store"]["used_bytes"] == 4096, st["store"]  # the quarantined slot only: none leaked
    assert_audit(st)
    log = d.log_text()
    assert (f"cannot be adopted: a page table names 1 slots at more than one page: slot {repeated} at pages"
            f" {min(a, b)}, {max(a, b)}; its pages are lost") in log, log[-3000:]
    assert "1 slots its writes in flight name are quarantined" in log
    assert writing != repeated
    assert d.stop() == 0
