"""A reviewer's tests of the quarantine-ID.unsaved marker (statedir.py,
Adoption.load, SlotAllocator.claim_free): invariant 9 when quarantine.json
cannot be rewritten, on a fragmented store, and the start-up refusal when
the marker cannot be made.

Fragmented: a dead daemon's tables name every other slot (a region swapped
out whole, then every other page discarded). A successor that finds the
marker "1" held every slot no table names as one quarantine run per free
gap: thousands here, millions on a large store (a 64 GiB store with every
other slot used: 8 million entries, 8 s in claim_free, 20 s per settle in
expire_quarantine's loop, a 120 MB quarantine.json rewritten at each change;
a later successor claimed each run with np.add.at). Now claim_free holds
the whole store as one run.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

from tests.daemon_proc import REPO
from tests.client_program import FILLED_REGION
from tests.harness import Workload, assert_audit, ctl, inject, status, wait_for

NPAGES = 8192

CLIENT = FILLED_REGION + textwrap.dedent("""
    sys.stdin.readline()
    for p in range(0, npages, 2):
        r.discard(p * 4096, 4096)
    out(discarded=npages // 2)
    sys.stdin.readline()
    a[0:256:2, 1] = 7  # zero pages written: dirty, written at the next eviction
    out(dirtied=128)
    sys.stdin.read()
""")

WRITE_ERROR = re.compile(r"write error on swap store \(offset (\d+), (\d+) pages\)")


def _failed_runs(log: str) -> list[tuple[int, int]]:
    return [(int(off) // 4096, int(n)) for off, n in WRITE_ERROR.findall(log)]


def _saved_runs(d) -> list[list[int]]:
    with open(os.path.join(d.state_dir, "quarantine.json")) as f:
        return [r for e in json.load(f)["stores"] for r in e["runs"]]


@pytest.mark.parametrize("backing", ["nfs"], indirect=True)
def test_successor_of_a_fragmented_store_holds_it_in_few_runs(backing, start_daemon):
    d = start_daemon(backing, store_size="64M", max_resident="4M", inject={},
                     config={"slot_quarantine": "600s", "adopt_timeout": "1s",
                             "write_retry_min": "5s", "write_retry_max": "5s"})
    blocker = os.path.join(d.state_dir, "quarantine.json.tmp")
    c = Workload.script(CLIENT, d.socket, NPAGES)
    try:
        c.next(120)
        ctl(d, {"op": "budget", "max_resident": "256K"})
        wait_for("the region swapped out", lambda: status(d)["swapped_bytes"] >= (NPAGES - 128) * 4096, 120)
        c.send("\n")
        c.next(120)
        os.makedirs(blocker)
        inject(d, {"fail_writes": ["EIO"]})
        c.send("\n")
        c.next(120)
        wait_for("a failed write applied", lambda: status(d)["store"].get("quarantined_bytes", 0) > 0, 60)
        wait_for("no write in flight", lambda: status(d)["writeback_inflight"] == 0, 60)
        runs = _failed_runs(d.log_text())
        assert runs
        d.kill()
    finally:
        c.kill()
    os.rmdir(blocker)
    d.restart()
    wait_for("the orphan dropped", lambda: status(d)["adoption_waiting"] == 0, 60)
    saved = _saved_runs(d)
    held = {s for first, n in saved for s in range(first, first + n)}
    want = {s for first, n in runs for s in range(first, first + n)}
    assert want <= held, sorted(want - held)
    # Before: one run per free gap, ~4096 here (8 million on a 64 GiB store).
    assert len(saved) <= 8, f"{len(saved)} quarantined runs saved for a {NPAGES}-page region"
    st = status(d)
    assert st["store"]["full"] or st["store_full"], st["store"]
    assert_audit(st)
    # A second death in a row: the next successor holds them again, at once.
    d.kill()
    d.restart()
    st = status(d)
    assert st["store"]["quarantined_bytes"] >= len(want) * 4096, st["store"]
    assert_audit(st)


def test_marker_that_cannot_be_allocated_refuses_start(file_backing, start_daemon, tmp_path):
    """posix_fallocate failing on the marker (here: a character device where
    it goes): the daemon refuses to start, naming the file, exit status 2,
    and a StateDir that refused holds no fd."""
    d = start_daemon(file_backing, store_size="64M")
    assert d.stop(timeout=60) == 0
    with open(file_backing, "rb") as f:
        head = f.read(4096)
    store_id = json.loads(head[head.index(b"{"):].split(b"\n", 1)[0])["id"]
    marker = os.path.join(d.state_dir, f"quarantine-{store_id}.unsaved")
    os.symlink("/dev/null", marker)
    out = subprocess.run([sys.executable, "-m", "uswap.cli", "run", "--backing", file_backing,
                          "--store-size", "64M", "--max-resident", "32M", "--socket", str(tmp_path / "s2"), "--state-dir", d.state_dir],
                         capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 2, (out.returncode, out.stderr[-3000:])
    assert marker in out.stderr and "Traceback" not in out.stderr, out.stderr[-3000:]
    from uswap.daemon.statedir import StateDir, StateRefused
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(StateRefused, match="cannot allocate"):
        StateDir(d.state_dir, {"url": "u", "size_bytes": 1, "id": store_id})
    assert set(os.listdir("/proc/self/fd")) <= before
