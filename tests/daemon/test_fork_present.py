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

import pytest

from tests.daemon.test_swapin_present import (_held, _plant, _release, answer, hooked_daemon, neighbours_and_exit,
                                              swapped_client, write_held)
from tests.harness import wait_for

HOLD = 400  # swapped out (test_swapin_present.py)


def _lines(c, *keys: str, got: dict | None = None) -> dict:
    """CLIENT's lines until one with each of `keys` is among them (`got`:
    those read before), in any order: every line read is kept by each of
    its keys, so a line that comes early (a child's, printed before the
    parent's "forked") is not lost to the wait for another."""
    got = {} if got is None else got
    while not all(k in got for k in keys):
        line = c.wait_line(lambda x: True, 60)
        assert "wrong" not in line, line
        got.update({k: line for k in line})
    return got


def test_child_forked_during_a_load_gets_the_store_copy_not_a_planted_page(file_backing, start_daemon, tmp_path):
    d, hooks = hooked_daemon(start_daemon, file_backing, tmp_path, HOLD, at="io", pool="python")
    c = swapped_client(d)
    try:
        c.send(f"readbg {HOLD}\n")  # faults; the load's I/O thread waits before its read
        held = wait_for("the swap-in held by the hook", lambda: _held(hooks), 30)
        _plant(d.pid, held["view"])  # HOLD is LOADING and in the memfd: zeros
        c.send(f"fork {HOLD}\n")
        got = _lines(c, "forked")
        child = got["forked"]["forked"]
        _release(hooks)
        # The parent's load (the store copy wins) and the child's read, in
        # either order; before, the child read {"400": 0}.
        got = _lines(c, "read", "child", got=got)
        assert got["read"]["value"] == HOLD + 1 and got["child"]["child"] == {str(HOLD): HOLD + 1}, got
        c.send(f"reap {child}\n")
        assert answer(c, "reaped")["reaped"] == 0
        neighbours_and_exit(c, HOLD)
    finally:
        c.kill()


@pytest.mark.parametrize("dontneed", [False, True])
def test_child_forked_after_a_write_to_a_page_its_load_mapped_gets_the_write(file_backing, start_daemon, tmp_path,
                                                                            dontneed):
    """The other side of the rule: a write fault's load maps its page
    writable, the client writes it, and a fork comes before the engine hears
    the load ended (the page still LOADING). The client's page tables hold
    the page, so the child gets a copy of it, with the write -- not the
    slot. `dontneed`: the client then took the page out of its own page
    tables (madvise(MADV_DONTNEED) of its MAP_SHARED mapping: the data stays
    in the memfd; the daemon asks for no EVENT_REMOVE) before the fork: not
    in pagemap, yet written (not zeros), the child still gets the write --
    on pp it took the slot and read HOLD + 1."""
    d, hooks = hooked_daemon(start_daemon, file_backing, tmp_path, HOLD, at="io_after", pool="python")
    c = swapped_client(d)
    try:
        write_held(c, hooks, HOLD, 777)
        if dontneed:
            c.send(f"madvise {HOLD} 4\n")
            answer(c, "madvised")
        c.send(f"fork {HOLD}\n")
        # The child's line and the parent's, in either order (the child may
        # print first: a wait for "forked" alone skipped its line, ci31).
        got = _lines(c, "forked", "child")
        child = got["forked"]["forked"]
        assert got["child"]["child"] == {str(HOLD): 777}  # dontneed, before: {"400": 401}
        _release(hooks)
        c.send(f"reap {child}\n")
        assert answer(c, "reaped")["reaped"] == 0
        c.send(f"readbg {HOLD}\n")
        assert answer(c, "read")["value"] == 777
        c.send("exit\n")
        answer(c, "done")
    finally:
        c.kill()

