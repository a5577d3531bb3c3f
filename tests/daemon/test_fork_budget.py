"""A fork's copies are charged to the budget like any other page: resident
memory passes max_resident only by the overcommitted pages the daemon counts.

A parent page a forked child still reads from it (AT_PARENT) is copied into
the child before the parent's write goes through (cow.py). The copy cannot
wait for room, so it may take memory over the budget; it was charged without
being counted as overcommit, so `resident_bytes` went over
`max_resident_bytes` with `overcommit_pages_total` 0 (test_exec's numpy test
under a 32 MiB budget peaked 2 pages over).

The store's writes fail (injected EIO) while the parent writes, so reclaim
can free nothing: every copy stays charged, and the check does not depend
on how fast reclaim runs.
"""
from __future__ import annotations

import os
import sys

import numpy as np

from tests.daemon.test_fork import _fill, _hear, _say, _value, _wait, fork_after_fill
from tests.harness import run_scenario, scenario_main, wait_forks_released

BUDGET = 8 << 20


def scenario_parent_writes_shared(c, size: int) -> dict:
    """Fill `size` (under the budget), fork a child that keeps reading the
    pages from the parent, then rewrite every page in the parent: each write
    first copies the page into the child. Status is taken while both sides
    hold every page."""
    _, pages, n, pid, _, p2c = fork_after_fill(c, size)  # the child runs: attached, reading the parent's pages
    if pid == 0:
        _hear(p2c)  # the parent has rewritten its pages and read the status
        os._exit(0 if int(np.count_nonzero(pages[:, 0] != _value(n, 1))) == 0 else 1)
    _fill(pages, 2)
    st = c.status()
    c.inject({"fail_writes": []})  # the store takes writes again: the pages settle
    _say(p2c)
    child = _wait(pid)
    return {"child": child, "resident_bytes": st["resident_bytes"], "max_resident_bytes": st["max_resident_bytes"],
            "overcommit_pages_total": st["overcommit_pages_total"], "audit_during": st["audit"]}


if __name__ == "__main__":
    scenario_main(globals(), sys.argv[1:])


def test_copies_for_a_forked_child_over_the_budget_are_counted_overcommit(file_backing, start_daemon):
    d = start_daemon(file_backing, store_size="64M", max_resident=str(BUDGET), inject={"fail_writes": ["EIO"]})
    size = BUDGET * 3 // 4  # under the clean watermark: nothing is written before the fork
    result = run_scenario(__name__, d, "parent_writes_shared", size, timeout=180)
    assert result["child"] == 0, result
    # Both sides hold every page: the copies took memory over the budget.
    assert result["resident_bytes"] > result["max_resident_bytes"], result
    # Invariant (budget.py): charged pages <= budget + counted overcommit.
    allowed = result["max_resident_bytes"] + result["overcommit_pages_total"] * 4096
    assert result["resident_bytes"] <= allowed, result
    assert result["audit_during"]["charged_ok"] and result["audit"]["charged_ok"], result
    wait_forks_released(d)
