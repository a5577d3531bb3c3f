"""`Writeback._write_done` when some pages of a write were discarded by the
client while it was in flight (F_DISCARD): the two windows in that branch.

- Invariant 9: a failed write on nfs:// may still land late, so its whole
  run is quarantined, and the quarantine persisted in the state directory,
  before any page table forgets a slot of it. The daemon is SIGKILLed at the
  first call after the discarded pages' slots are forgotten
  (Forget.forget_pages); its successor must hold every slot of the run.
- A region closed by anything forget_pages calls (here the real
  RegionSet.close_region, called by the hook) must leak no slot of the run
  and leave `regions.evicting` exact (the audit's evicting_ok), for a failed
  and for a successful write.

The daemon runs through tests/writeback_hooks.py (test-only wrappers, no
change to the production code): store writes wait until the client's
discard has marked part of the first one F_DISCARD, so the discard comes
during the write by construction, not by timing.
"""
from __future__ import annotations

import json
import os
import signal
import textwrap

import pytest

from tests.client_program import FILLED_REGION
from tests.harness import Workload, assert_audit, ctl, inject, status, wait_clean, wait_for

NPAGES = 512  # 2 MiB, all dirty, under the 4 MiB budget: nothing is written until the budget is cut

# argv: SOCKET NPAGES. Fills the region, then discards each range "LO HI" read from stdin.
CLIENT = FILLED_REGION + textwrap.dedent("""
    for line in sys.stdin:
        lo, hi = map(int, line.split())
        try:
            r.discard(lo * 4096, (hi - lo) * 4096)
            out(discarded=hi - lo)
        except Exception as e:
            out(error=repr(e))
""")


def _start(start_daemon, backing: str, hooks: str, at_forget: str, config: dict):
    os.makedirs(hooks)
    return start_daemon(backing, store_size="64M", max_resident="4M", inject={}, config=config,
                        module="tests.writeback_hooks",
                        extra_env={"USWAP_TEST_HOOKS": hooks, "USWAP_TEST_HOOK_AT_FORGET": at_forget})


def _first_write(hooks: str) -> dict | None:
    try:
        with open(os.path.join(hooks, "writes.jsonl")) as f:
            line = f.readline()
    except FileNotFoundError:
        return None
    return json.loads(line) if line.endswith("\n") else None


def _discard_half_of_a_write(d, hooks: str, fail: bool) -> tuple[Workload, dict, list[int]]:
    """A client fills its region; the budget is cut, so reclaim writes (held
    by the hooks until the discard); the first half of the first write's
    pages is discarded. Returns the client, that write and the pages."""
    c = Workload.script(CLIENT, d.socket, NPAGES)
    c.next(60)
    if fail:
        inject(d, {"fail_writes": ["EIO"]})
    ctl(d, {"op": "budget", "max_resident": "256K"})
    first = wait_for("a store write queued", lambda: _first_write(hooks), 60)
    pages = first["pages"]
    assert len(pages) >= 2, first  # some pages discarded, some not
    half = pages[:len(pages) // 2]
    c.send(f"{half[0]} {half[-1] + 1}\n")
    return c, first, half


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, ValueError):  # not written yet, or half written
        return None


@pytest.mark.parametrize("backing", ["nfs"], indirect=True)
def test_killed_while_forgetting_discarded_pages_of_a_failed_write_successor_quarantines_the_run(
        backing, start_daemon, tmp_path):
    hooks = str(tmp_path / "hooks")
    d = _start(start_daemon, backing, hooks, "kill",
               {"slot_quarantine": "600s", "adopt_timeout": "1s", "write_retry_min": "20ms"})
    c, first, half = _discard_half_of_a_write(d, hooks, fail=True)
    try:
        assert d.proc.wait(60) == -signal.SIGKILL, d.log_text()[-3000:]
    finally:
        c.kill()
    killed = _read_json(os.path.join(hooks, "killed.json"))
    assert killed is not None, d.log_text()[-3000:]
    assert (killed["slot"], killed["n"]) == (first["slot"], len(first["pages"])), (killed, first)
    assert set(killed["discarded"]) == set(half), killed
    d.kill()

    # The successor, plain uswap: the client is dead, so its orphan is
    # dropped (its WRITEBACK pages' slots quarantined, adoption.py), and the
    # quarantine the dead daemon persisted is held again.
    d.restart(module="uswap.cli")
    wait_for("the orphan dropped", lambda: (lambda s: s["adoption_waiting"] == 0
                                            and s["adoption_dropped_total"] == 1)(status(d)), 60)
    saved = _read_json(os.path.join(d.state_dir, "quarantine.json"))
    held = {s for e in saved["stores"] for first_slot, n in e["runs"] for s in range(first_slot, first_slot + n)}
    run = set(range(killed["slot"], killed["slot"] + killed["n"]))
    # Invariant 9: no slot of the failed run is free in the successor while
    # the dead daemon's write may still land in it.
    assert run <= held, f"slots of the failed run not held by the successor: {sorted(run - held)}"
    st = status(d)
    assert st["store"]["used_bytes"] == st["store"]["quarantined_bytes"] >= len(run) * 4096, st["store"]
    assert_audit(st)


@pytest.mark.parametrize("backing,outcome", [("nfs", "failed"), ("file", "failed"), ("file", "written")],
                         indirect=["backing"])
def test_region_closed_while_forgetting_discarded_pages_leaks_no_slot(backing, outcome, start_daemon, tmp_path):
    """A failed write on nfs:// has its run quarantined, freed once the store
    takes writes again and slot_quarantine passed; on a file store at once."""
    fail = outcome == "failed"
    hooks = str(tmp_path / "hooks")
    d = _start(start_daemon, backing, hooks, "close",
               {"slot_quarantine": "1s", "write_retry_min": "20ms", "write_retry_max": "200ms"})
    c, first, half = _discard_half_of_a_write(d, hooks, fail=fail)
    try:
        closed = wait_for("the region closed by the hook", lambda: _read_json(os.path.join(hooks, "closed.json")), 60)
        assert closed["slot"] == first["slot"] and set(closed["discarded"]) == set(half), (closed, first)
        assert closed["failed"] == fail, closed
    finally:
        c.kill()

    # Every write returned, the client gone: the only slots in use are the
    # quarantined ones, and the recount (evicting too) agrees.
    st = wait_for("the region released", lambda: (lambda s: s if not s["clients"] and s["writeback_inflight"] == 0
                                                  and s["audit"] is not None else None)(status(d)), 60)
    # The run's pages were reclaim's (F_EVICT): taken off regions.evicting
    # once, when the write returned, not again by close_region.
    assert st["audit"]["evicting_ok"], st["audit"]
    assert st["store"]["used_bytes"] == st["store"].get("quarantined_bytes", 0), st["store"]
    assert_audit(st)
    if fail and backing.startswith("nfs://"):
        assert st["store"]["quarantined_bytes"] >= len(first["pages"]) * 4096, st["store"]
    if fail:
        inject(d, {"fail_writes": []})  # the store heals: the quarantine's clock starts
    wait_clean(d, 60)
