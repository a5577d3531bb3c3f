"""Adoption of a region whose loading page got a zero page planted in the
memfd before its daemon died (resolve.py _not_loaded).

A read of the daemon's own mapping of a region's memfd at a swapped page
(/proc/DAEMON/mem, a debugger, py-spy) plants a page of zeros there
(tests/daemon/test_swapin_present.py). A daemon killed with such a page
LOADING left its successor a page "in the memfd", which resolve took for
the load's copy; failing its checksum, it was kept as the client's data,
dirty: the client read zeros. A page in the memfd that the client's page
tables do not hold was mapped by no load: the store copy wins (SWAPPED,
punched as a stray page at the next touch).

Made by construction: the daemon runs through tests/swapin_hooks.py, which
holds the load of page HOLD on the engine thread with its pages LOADING;
the test plants the zero page, kills the daemon (SIGKILL) and starts a
successor on the same state directory, which the client's keeper
reconnects to (adopt). The client's thread that faulted on HOLD is woken
into the successor."""
from __future__ import annotations

import pytest

from tests.daemon.test_swapin_present import (_held, _plant, answer, hooked_daemon, neighbours_and_exit, swapped_client,
                                              write_held)
from tests.harness import assert_audit, status, wait_for

HOLD = 400  # swapped out (test_swapin_present.py)


def test_planted_page_of_a_dead_daemons_load_is_not_adopted_as_data(file_backing, start_daemon, tmp_path):
    d, hooks = hooked_daemon(start_daemon, file_backing, tmp_path, HOLD, adopt_timeout="60s")
    c = swapped_client(d)
    try:
        c.send(f"readbg {HOLD}\n")  # faults; its load is held, LOADING
        held = wait_for("the swap-in held by the hook", lambda: _held(hooks), 30)
        _plant(d.pid, held["view"])
        d.kill()  # the engine thread still holds the load: HOLD is LOADING in the table
        d.restart(module="uswap.cli")
        wait_for("the region adopted", lambda: status(d)["adopted_regions_total"] == 1, 60)
        assert answer(c, "read")["value"] == HOLD + 1  # before: 0, the planted page kept as dirty data
        assert "reads_planted 1" in d.log_text(), d.log_text()[-3000:]
        neighbours_and_exit(c, HOLD)
    finally:
        c.kill()


def test_write_through_a_dead_daemons_load_is_adopted(file_backing, start_daemon, tmp_path):
    """The other side of the rule: a write fault's load mapped its page
    writable and the client wrote it; the daemon died before it heard the
    load ended (the page LOADING, its bytes not the slot copy's). The
    client's page tables hold the page: its load mapped it, so it is the
    client's data, kept dirty -- not replaced by the slot copy."""
    d, hooks = hooked_daemon(start_daemon, file_backing, tmp_path, HOLD, at="io_after", pool="python",
                             adopt_timeout="60s")
    c = swapped_client(d)
    try:
        write_held(c, hooks, HOLD, 777)
        d.kill()
        d.restart(module="uswap.cli")
        wait_for("the region adopted", lambda: status(d)["adopted_regions_total"] == 1, 60)
        c.send(f"readbg {HOLD}\n")
        assert answer(c, "read")["value"] == 777
        assert "reads_planted" not in d.log_text(), d.log_text()[-3000:]
        c.send("exit\n")
        answer(c, "done")
    finally:
        c.kill()


@pytest.mark.parametrize("advice", [4])  # MADV_DONTNEED (MADV_PAGEOUT skips a page mapped twice)
def test_write_through_then_unmapped_by_the_client_is_adopted(file_backing, start_daemon, tmp_path, advice):
    """As above, but the client then took the page out of its own page
    tables (madvise(2) of its MAP_SHARED mapping: MADV_DONTNEED or
    MADV_PAGEOUT, which leave the data in the memfd; the daemon asks for no
    EVENT_REMOVE, faults.py) before the successor read its pagemap. Absent
    from the page tables but written: the client's data, kept -- on pp it
    became SWAPPED and the client read the slot copy (HOLD + 1), its write
    lost."""
    d, hooks = hooked_daemon(start_daemon, file_backing, tmp_path, HOLD, at="io_after", pool="python",
                             adopt_timeout="60s")
    c = swapped_client(d)
    try:
        write_held(c, hooks, HOLD, 777)
        c.send(f"madvise {HOLD} {advice}\n")
        answer(c, "madvised")
        d.kill()
        d.restart(module="uswap.cli")
        wait_for("the region adopted", lambda: status(d)["adopted_regions_total"] == 1, 60)
        c.send(f"readbg {HOLD}\n")
        assert answer(c, "read")["value"] == 777  # before: HOLD + 1, the write thrown away
        assert "reads_planted" not in d.log_text(), d.log_text()[-3000:]
        c.send("exit\n")
        answer(c, "done")
    finally:
        c.kill()


def test_a_page_discarded_during_a_dead_daemons_load_reads_zeros(file_backing, start_daemon, tmp_path):
    """The client discards a page whose load is in flight (held in its I/O
    thread, nothing read yet: USWAP_TEST_HOLD_AT=io): the daemon marks it
    F_DISCARD, to be forgotten when the load returns, and holds the answer.
    It is killed first. The successor cleared F_DISCARD with the dead
    daemon's other flags and resolved the page from the memfd as any
    LOADING page (nothing there: SWAPPED on its slot), so the client,
    which still maps the memfd there, read the page's old data. Now resolve
    hands the page to forget once the region is live: EMPTY, slot freed,
    zeros.

    The discard is sent with no wait for its answer: uswap/client.py sends
    a discard it waits for again to the next daemon (docs/protocol.md),
    which then forgets the page itself and hides the loss; a client of the
    protocol that does not (or whose request died with the daemon's
    connection before it was read) relied on the table alone."""
    d, hooks = hooked_daemon(start_daemon, file_backing, tmp_path, HOLD, at="io", pool="python",
                             adopt_timeout="60s")
    c = swapped_client(d)
    try:
        c.send(f"readbg {HOLD}\n")  # faults; its load is held in its I/O thread, LOADING
        wait_for("the swap-in held by the hook", lambda: _held(hooks), 30)
        before = status(d)["forgotten_after_io_total"]
        c.send(f"discard_unanswered {HOLD}\n")
        answer(c, "sent")
        wait_for("the discard marked on the loading page",
                 lambda: status(d)["forgotten_after_io_total"] == before + 1, 30)
        d.kill()
        d.restart(module="uswap.cli")
        wait_for("the region adopted", lambda: status(d)["adopted_regions_total"] == 1, 60)
        # The thread that faulted before the discard reads after it (woken
        # into the successor once the region is live), and so does a new one.
        assert answer(c, "read")["value"] == 0  # before: HOLD + 1, the discarded data
        c.send(f"readbg {HOLD}\n")
        assert answer(c, "read")["value"] == 0
        assert "discarded 1" in d.log_text(), d.log_text()[-3000:]
        c.send(f"touch {HOLD - 1} {HOLD + 1}\n")
        answer(c, "touched")
        assert_audit(status(d))
        c.send("exit\n")
        answer(c, "done")
    finally:
        c.kill()
