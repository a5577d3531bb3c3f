"""Adoption.after_live (adoption.py) with everything at once, adversarially
(a reviewer's): a dead daemon's region that its client unmapped in part
while no daemon ran, with punches to make again and pages the client
discarded during the dead daemon's I/O, in both the part it maps and the
part it unmapped. The successor adopts the mapped part: pages punched again
keep their data, discarded ones read zeros, every other page its data; the
audit is exact at once, no illegal transition (strict in tests), and every
slot but the quarantined one is free once the client leaves.

The dead daemon's states are made in its page table while no daemon runs,
each as a kill at one instruction would leave it (docs/design.md section 9):
a clean page (its slot holds its copy, it is in the memfd) left PUNCHING (a
punch not made), the same marked F_DISCARD (the client discarded it while
the punch was in flight), a swapped page left LOADING with F_DISCARD (its
read not made, discarded meanwhile), and a clean page left WRITEBACK with
F_DISCARD (written again, discarded meanwhile)."""
from __future__ import annotations

import signal

import numpy as np

from tests.client_program import REGION
from tests.harness import Workload, assert_audit, finish_clean, status, wait_for
from tests.system.test_adoption import _only_table, swapped
from uswap.daemon import pagetable as pt

MIB = 1 << 20

CLIENT = REGION + r"""
import ctypes, threading
ids = np.arange(len(a), dtype=np.uint64)
a[:] = (ids * 7919 + 1)[:, None]
half = len(a) // 2
out(stamped=True)

def unmap():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    # Waits for the UNMAP event to be read: by the successor.
    assert libc.munmap(r.addr + half * 4096, r.size - half * 4096) == 0, ctypes.get_errno()
    out(unmapped=True)

for line in sys.stdin:
    cmd = line.split()
    if cmd[0] == "read":  # swapped in: clean pages with a slot
        lo, hi = int(cmd[1]), int(cmd[2])
        out(read=int(a[lo:hi, 3].sum()))
    elif cmd[0] == "unmap":
        threading.Thread(target=unmap, daemon=True).start()
        out(unmapping=True)
    elif cmd[0] == "check":
        first = a[:half]
        zero = np.flatnonzero((first == 0).all(axis=1))
        bad = np.flatnonzero((first != (ids[:half] * 7919 + 1)[:, None]).any(axis=1))
        out(zero=zero.tolist(), bad=bad.tolist())
    elif cmd[0] == "exit":
        break
c.close()
out(done=True)
"""


def test_unmapped_part_discarded_pages_and_punches_to_redo_at_once(file_backing, start_daemon):
    d = start_daemon(file_backing, store_size="64M", max_resident="4M",
                     config={"adopt_timeout": "60s", "slot_quarantine": "1s"})
    w = Workload.script(CLIENT, d.socket, 2048)   # 8 MiB, half of them unmapped later
    try:
        w.wait_line(lambda l: l.get("stamped"), 60)
        wait_for("pages swapped", lambda: swapped(d) >= 3 * MIB, 60)
        # Swapped in again: clean, in the memfd, their slots their copies.
        w.send("read 0 300\n")
        w.wait_line(lambda l: "read" in l, 60)
        w.send("read 1100 1400\n")
        w.wait_line(lambda l: "read" in l, 60)
        wait_for("writes ended", lambda: status(d)["writeback_inflight"] == 0, 60)
        assert d.kill() == -signal.SIGKILL
        t = _only_table(d)
        clean = (t.state == pt.RESIDENT) & ((t.flags & pt.F_DIRTY) == 0) & (t.slot >= 0)
        low = np.flatnonzero(clean[:1024])
        high = 1024 + np.flatnonzero(clean[1024:])
        sw = np.flatnonzero((t.state[:1024] == pt.SWAPPED) & (t.slot[:1024] >= 0))
        assert len(low) >= 40 and len(high) >= 20 and len(sw) >= 10, (len(low), len(high), len(sw))
        repunch, repunch_discarded, written_discarded = low[:10], low[10:20], low[20:30]
        loading_discarded = sw[:10]
        t.state[repunch] = pt.PUNCHING
        t.state[repunch_discarded] = pt.PUNCHING
        t.flags[repunch_discarded] |= pt.F_DISCARD
        t.state[written_discarded] = pt.WRITEBACK
        t.flags[written_discarded] |= pt.F_DISCARD
        t.state[loading_discarded] = pt.LOADING
        t.flags[loading_discarded] |= pt.F_DISCARD
        # In the part the client unmaps: a punch to redo, a discarded one, a
        # write discarded.
        t.state[high[:10]] = pt.PUNCHING
        t.state[high[10:15]] = pt.PUNCHING
        t.flags[high[10:15]] |= pt.F_DISCARD
        t.state[high[15:20]] = pt.WRITEBACK
        t.flags[high[15:20]] |= pt.F_DISCARD
        del t
        w.send("unmap\n")
        w.wait_line(lambda l: l.get("unmapping"), 30)
        d.restart()
        wait_for("the region adopted", lambda: status(d)["adopted_regions_total"] == 1, 60)
        st = status(d)
        assert st["adoption_dropped_total"] == 0, st
        w.wait_line(lambda l: l.get("unmapped"), 60)   # its UNMAP event read by the successor
        log = d.log_text()
        assert "discarded 40" in log and "punches_done 35" in log and "torn_writes 15" in log, log[-3000:]
        wait_for("the punches returned", lambda: status(d)["audit"] is not None, 30)
        assert_audit(status(d))
        w.send("check\n")
        got = w.wait_line(lambda l: "bad" in l, 120)
        discarded = sorted(np.concatenate([repunch_discarded, written_discarded, loading_discarded]).tolist())
        assert got["bad"] == discarded, got   # every other page of the mapped part holds its data
        assert got["zero"] == discarded, got
        st = status(d)
        assert_audit(st)
        # The 15 slots of writes the dead daemon had in flight are quarantined.
        assert st["store"]["quarantined_bytes"] == 15 * 4096, st["store"]
        w.send("exit\n")
        w.wait_line(lambda l: l.get("done"), 60)
    finally:
        w.kill()
    wait_for("the quarantine over", lambda: status(d)["store"]["quarantined_bytes"] == 0, 60)
    log = finish_clean(d)
    assert "illegal" not in log
