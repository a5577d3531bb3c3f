"""A damaged page table (one slot named at two of its pages) whose slots a
forked child's table shares, legitimately (a reviewer's): the damaged
parent's table is refused whole at start (SlotAllocator.claim claims
nothing of it), the child's is adopted and every one of its pages -- those
on slots the parent's table also names, the repeated one included -- reads
its data; the audit is exact, no illegal transition, and no slot is left
used once the child leaves (a repeat claimed, or the child's share lost
with the parent's refusal, shows as a slot used for ever or a child page
read wrong)."""
from __future__ import annotations

import json
import os
import signal

import numpy as np

from tests.client_program import REGION
from tests.harness import Workload, assert_audit, finish_clean, status, wait_for
from tests.system.test_adoption import swapped
from uswap.daemon import pagetable as pt

MIB = 1 << 20

CLIENT = REGION + r"""
import os
ids = np.arange(len(a), dtype=np.uint64)
a[:] = (ids * 7919 + 1)[:, None]
out(stamped=True, region=r.id)
sys.stdin.readline()
rd, wr = os.pipe()
pid = os.fork()
if pid == 0:  # the child: its own copy of the region, on a connection of its own
    os.close(wr)
    cmds = os.fdopen(rd)
    def bad():
        return int(np.count_nonzero((a != (ids * 7919 + 1)[:, None]).any(axis=1)))
    out(child=bad())  # every page read
    for line in cmds:
        if line.strip() == "check":
            out(child=bad(), reconnects=c.reconnects)
        elif line.strip() == "exit":
            break
    c.close()
    out(child_done=True)
    os._exit(0)
os.close(rd)
for line in sys.stdin:
    os.write(wr, line.encode())
    if line.strip() == "exit":
        break
os.waitpid(pid, 0)
out(done=True)
os._exit(0)
"""


def _tables(d) -> dict[int, pt.PageTable]:
    out = {}
    for f in os.listdir(d.state_dir):
        if f.startswith("region-") and f.endswith(".json"):
            with open(os.path.join(d.state_dir, f)) as fh:
                meta = json.load(fh)
            out[meta["id"]] = pt.PageTable.load(os.path.join(d.state_dir, f[:-5] + ".table"), meta["npages"])
    return out


def test_a_damaged_parent_table_refused_its_forked_childs_shares_adopted(file_backing, start_daemon):
    d = start_daemon(file_backing, store_size="64M", max_resident="4M", config={"adopt_timeout": "2s"})
    w = Workload.script(CLIENT, d.socket, 2048)
    try:
        parent_id = w.wait_line(lambda l: l.get("stamped"), 60)["region"]
        wait_for("pages swapped", lambda: swapped(d) >= 3 * MIB, 60)
        w.send("fork\n")
        assert w.wait_line(lambda l: "child" in l, 120)["child"] == 0   # the child read every page (none AT_PARENT)
        wait_for("writes ended", lambda: status(d)["writeback_inflight"] == 0, 60)
        assert d.kill() == -signal.SIGKILL
        tables = _tables(d)
        assert parent_id in tables and len(tables) == 2, tables.keys()
        parent = tables.pop(parent_id)
        (child,) = tables.values()
        shared = np.flatnonzero((parent.slot >= 0) & (parent.slot == child.slot))
        assert len(shared) >= 2, "no slot shared by the fork"
        p, q = shared[:2].tolist()
        parent.slot[q] = parent.slot[p]   # damage: the parent names p's slot at q too
        del parent, child, tables
        d.restart()
        wait_for("the child adopted, the parent refused",
                 lambda: (st := status(d))["adopted_regions_total"] == 1 and st["adoption_dropped_total"] == 1, 60)
        log = d.log_text()
        assert f"region {parent_id} of the previous daemon cannot be adopted" in log, log[-3000:]
        w.send("check\n")
        line = w.wait_line(lambda l: "reconnects" in l, 120)
        assert line["child"] == 0, line
        assert_audit(status(d))
        w.send("exit\n")
        w.wait_line(lambda l: l.get("child_done"), 60)
    finally:
        w.kill()
    finish_clean(d)
