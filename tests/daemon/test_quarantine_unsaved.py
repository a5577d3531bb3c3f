"""Invariant 9 when the quarantine cannot be written to the state directory.

`Writeback._write_done` releases a failed nfs:// write's run (quarantine,
`_persist_quarantine`) and then takes the run's slots out of the page
table. When the state directory's rewrite of quarantine.json fails (tmpfs
full, no fd left: `StateDir._rewrite` logs it and returns False,
`quarantine_unsaved`), the table forgets the slots all the same, so the
file alone would name them nowhere: a daemon killed before a later
settle's retry succeeded left a successor that handed those slots to new
data while the dead daemon's write could still land in them (this test
failed so). The marker quarantine-ID.unsaved, allocated and opened at start
and written in place, says the file is behind, and the successor then
holds every slot no table names (`Adoption.load`).

The rewrite is made to fail for real, with no hook: a directory sits where
`_write_atomic` opens its temporary file (quarantine.json.tmp), so the
open fails (EISDIR) as it would with ENOSPC. `blocked=False` is the
control: the same sequence with the state directory writable.
"""
from __future__ import annotations

import json
import os
import re
import textwrap

import pytest

from tests.client_program import FILLED_REGION
from tests.harness import Workload, ctl, inject, status, wait_for

NPAGES = 512

CLIENT = FILLED_REGION + textwrap.dedent("""
    sys.stdin.read()
""")

WRITE_ERROR = re.compile(r"write error on swap store \(offset (\d+), (\d+) pages\)")


def _failed_runs(log: str) -> list[tuple[int, int]]:
    return [(int(off) // 4096, int(n)) for off, n in WRITE_ERROR.findall(log)]


@pytest.mark.parametrize("blocked", [False, True], ids=["state-dir-writable", "quarantine-json-unwritable"])
@pytest.mark.parametrize("backing", ["nfs"], indirect=True)
def test_failed_write_slots_held_by_successor_even_if_quarantine_not_saved(backing, blocked, start_daemon):
    d = start_daemon(backing, store_size="64M", max_resident="4M", inject={},
                     config={"slot_quarantine": "600s", "adopt_timeout": "1s",
                             "write_retry_min": "5s", "write_retry_max": "5s"})
    if blocked:
        os.makedirs(os.path.join(d.state_dir, "quarantine.json.tmp"))
    c = Workload.script(CLIENT, d.socket, NPAGES)
    try:
        c.next(60)
        inject(d, {"fail_writes": ["EIO"]})
        ctl(d, {"op": "budget", "max_resident": "256K"})
        # The failed write has been applied by the engine: its run is in the
        # daemon's quarantine, and its pages are RESIDENT dirty with no slot.
        wait_for("a failed write applied", lambda: status(d)["store"].get("quarantined_bytes", 0) > 0, 60)
        runs = _failed_runs(d.log_text())
        assert runs, d.log_text()[-3000:]
        # No write in flight any more (the backoff is 5 s): every failed run
        # is named by no table now; only the quarantine holds it.
        st = wait_for("no write in flight", lambda: (lambda s: s if s["writeback_inflight"] == 0 else None)(status(d)),
                      60)
        runs = _failed_runs(d.log_text())
        assert st["store"]["quarantined_bytes"] == sum(n for _, n in runs) * 4096, (st["store"], runs)
        d.kill()  # SIGKILL: a crash
    finally:
        c.kill()
    if blocked:
        os.rmdir(os.path.join(d.state_dir, "quarantine.json.tmp"))

    d.restart()
    wait_for("the orphan dropped", lambda: (lambda s: s["adoption_waiting"] == 0
                                            and s["adoption_dropped_total"] == 1)(status(d)), 60)
    try:
        with open(os.path.join(d.state_dir, "quarantine.json")) as f:
            saved = json.load(f)
    except FileNotFoundError:  # the dead daemon could never write it
        saved = {"stores": []}
    held = {s for e in saved["stores"] for first, n in e["runs"] for s in range(first, first + n)}
    want = {s for first, n in runs for s in range(first, first + n)}
    # Invariant 9: a slot a dead daemon's failed write may still reach is
    # never free in its successor.
    assert want <= held, f"failed-write slots free in the successor: {sorted(want - held)} (runs {runs})"
    st = status(d)
    assert st["store"]["quarantined_bytes"] >= len(want) * 4096, st["store"]
