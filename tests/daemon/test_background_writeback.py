"""Issue 14 item 1: background writeback (uswap/daemon/cleaner.py).

A client rewrites every page of a region 8x its budget in random order, pass
after pass, while every store write takes 5 ms: at the budget every victim
reclaim meets was written since it last left memory, so without writing
ahead a fault parked for room waits for a store write. With it, reclaim's
next victims are written ahead between the watermarks and a fault parked for
room only waits for a clean page's punch. The workload checks every page's
content each pass (never lost, never stale), and the audit and the store's
overlap counters stay exact.
"""
from __future__ import annotations

import time

import pytest

from tests.harness import Workload, assert_audit, assert_no_io_overlap, finish_clean, status

PAGE = 4096
BUDGET = 4 << 20


def rewrite_at_budget(start_daemon, backing, config: dict) -> tuple[dict, list[dict]]:
    """The steady dirtying workload above, to its end; the daemon's final
    status and the status samples taken while it ran."""
    d = start_daemon(backing, store_size="128M", max_resident=str(BUDGET), inject={"write_delay": 0.005},
                     config=config)
    w = Workload(d.socket, "--size", "32M", "--order", "random", "--passes", "3")
    samples = []
    try:
        deadline = time.monotonic() + 240
        while w.poll() is None:
            assert time.monotonic() < deadline, f"workload still running; status {status(d)}"
            samples.append(status(d))
            time.sleep(0.05)  # sampling period, not synchronisation
        lines = w.finish_ok(timeout=30)
    finally:
        w.kill()
    assert all(line["errors"] == 0 for line in lines if "errors" in line), lines
    for st in samples:
        assert_audit(st)
    st = status(d)
    assert st["write_errors_total"] == 0 and st["illegal_transitions_total"] == 0, st
    assert_no_io_overlap(st)
    finish_clean(d)
    return st, samples


def at_budget(samples: list[dict]) -> list[dict]:
    """The samples taken once the region filled the budget."""
    return [s for s in samples if s["resident_bytes"] >= 0.95 * BUDGET and s["pages_written_total"] > 0]


def test_faults_never_wait_for_a_dirty_write(start_daemon, file_backing):
    st, samples = rewrite_at_budget(start_daemon, file_backing, {})
    assert st["pages_cleaned_total"] > 0, st  # pages were written ahead
    faults = st["faults_total"]
    # Background writeback keeps reclaim's victims clean: a fault parked for
    # room waits for a punch, not for a 5 ms store write.
    # (Measured: about 1 fault in 3000 here, the reserve grown by feedback,
    # cleaner.py; 1 in 50 with background writeback off, the test below.)
    assert st["dirty_waits_total"] <= faults // 400, st
    # Free room plus clean resident pages stay at the reserve clean_watermark
    # (0.9 by default) keeps: the budget's last tenth, less what the clock
    # lets the reserve fall behind between two looks (cleaner.CLEAN_STEP)
    # and the writes in flight.
    steady = at_budget(samples)
    assert len(steady) >= 10, samples
    ready = sorted(s["max_resident_bytes"] - s["resident_bytes"] + s["clean_resident_bytes"] for s in steady)
    assert ready[len(ready) // 2] >= 0.05 * BUDGET, ready


def test_without_writing_ahead_faults_wait_for_dirty_writes(start_daemon, file_backing):
    """The same workload with background writeback off (clean_watermark: 1):
    the counter the test above holds at 0 counts faults that waited for a
    store write, here many of them."""
    st, _ = rewrite_at_budget(start_daemon, file_backing, {"clean_watermark": 1})
    assert st["pages_cleaned_total"] == 0, st
    # More than the test above allows (1 in 400); measured 1 in 50 to 1 in
    # 260 (a CI-like run: 217 of 56 379, under the 1 in 200 asked before).
    assert st["dirty_waits_total"] > st["faults_total"] // 400, st


def test_reclaim_itself_meets_few_dirty_victims(start_daemon, file_backing):
    """What writing ahead is for (cleaner.py): the victims reclaim takes
    were written ahead, so reclaim punches them and seldom writes a dirty
    victim itself. Pages written by reclaim are those written and not
    cleaned ahead (pages_cleaned_total counts the cleaner's; no write fails
    here). Measured on this workload: 166-348 of about 24 500 before
    f4e5226 (6 runs), 2 095-3 536 after it (6 runs); only judged pages on
    probation (not those sampled at the latest scan) gave 658-899."""
    st, _ = rewrite_at_budget(start_daemon, file_backing, {})
    own = st["pages_written_total"] - st["pages_cleaned_total"]
    assert own <= st["pages_written_total"] // 25, st
