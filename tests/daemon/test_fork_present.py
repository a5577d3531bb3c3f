"""A fork while a swap-in is in flight, with a zero page planted in the
memfd at the loading page (fork.py _loaded, _child_of).

A read of the daemon's own mapping of a region's memfd at a swapped page
(/proc/DAEMON/mem, a debugger, py-spy) plants a page of zeros there
(tests/daemon/test_swapin_present.py). fork_begin used to take a LOADING
page found in the memfd as loaded and copy it into the child from the
parent's mapping: the child got the planted zeros (or, while the load's
I/O thread wrote the store copy over them, a torn page). A LOADING page is
copied only once the client's page tables hold it (its load mapped it);
otherwise the child takes the slot.

Made by construction: the daemon runs through tests/swapin_hooks.py with
USWAP_TEST_HOLD_AT=io (the Python pool, under the fault injector), so the
load of page HOLD waits in its I/O thread before its store read while the
engine serves the fork; the test plants the zero page, the client forks,
the child reads HOLD; then the held read goes."""
from __future__ import annotations

from tests.daemon.test_swapin_present import _held, _plant, _release, answer, hooks_dir, neighbours_and_exit, swapped_client
from tests.harness import wait_for

HOLD = 400  # swapped out (test_swapin_present.py)


def test_child_forked_during_a_load_gets_the_store_copy_not_a_planted_page(file_backing, start_daemon, tmp_path):
    hooks = hooks_dir(tmp_path)
    d = start_daemon(file_backing, store_size="64M", max_resident="2M", inject={}, module="tests.swapin_hooks",
                     config={"fault_threads": 0},
                     extra_env={"USWAP_TEST_HOOKS": hooks, "USWAP_TEST_HOLD_PAGE": str(HOLD),
                                "USWAP_TEST_HOLD_AT": "io"})
    c = swapped_client(d)
    try:
        c.send(f"readbg {HOLD}\n")  # faults; the load's I/O thread waits before its read
        held = wait_for("the swap-in held by the hook", lambda: _held(hooks), 30)
        _plant(d.pid, held["view"])  # HOLD is LOADING and in the memfd: zeros
        c.send(f"fork {HOLD}\n")
        child = answer(c, "forked")["forked"]
        _release(hooks)
        # The parent's load (the store copy wins) and the child's read, in
        # either order; before, the child said {"wrong": {"400": 0}, "in": "child"}.
        got = {}
        while "value" not in got or "child" not in got:
            line = c.wait_line(lambda x: "read" in x or "child" in x or "wrong" in x, 60)
            assert "wrong" not in line, line
            got.update(line)
        assert got["value"] == HOLD + 1 and got["child"] == [HOLD], got
        c.send(f"reap {child}\n")
        assert answer(c, "reaped")["reaped"] == 0
        neighbours_and_exit(c, HOLD)
    finally:
        c.kill()
