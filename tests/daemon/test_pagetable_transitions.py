"""Checked page transitions: native/pagestate.h's table of legal predecessors,
enforced by PageTable.move in Python and by us_set_state in the fast path.

An illegal transition is a bug: counted, logged, and fatal in strict mode
(USWAP_STRICT_TRANSITIONS=1, which conftest.py sets for every daemon the
tests start; its teardown asserts none was logged)."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests.daemon_proc import ILLEGAL_TRANSITION, REPO
from uswap._fastpath_cffi import ffi, lib
from uswap.daemon import pagetable as pt


def table(strict: bool, npages: int = 16) -> tuple[pt.PageTable, pt.TransitionCheck]:
    check = pt.TransitionCheck(strict=strict)
    t = pt.PageTable(npages, check=check)
    t.region_id = 7
    return t, check


def test_names_come_from_the_header():
    assert pt.STATE_NAMES == ["EMPTY", "RESIDENT", "WRITEBACK", "SWAPPED", "LOADING", "POISONED",
                              "AT_PARENT", "PUNCHING"]
    assert [getattr(pt, n) for n in pt.STATE_NAMES] == list(range(lib.US_NSTATES))
    assert (pt.F_DIRTY, pt.F_WAITERS, pt.F_EVICT, pt.F_ACTIVE, pt.F_DISCARD, pt.NO_SLOT) == (1, 2, 4, 8, 16, -1)


def test_table_edges():
    """A few edges the design depends on (docs/design.md §4)."""
    legal = pt.LEGAL
    assert legal[pt.SWAPPED, pt.LOADING] and legal[pt.EMPTY, pt.LOADING]
    assert legal[pt.LOADING, pt.RESIDENT] and legal[pt.RESIDENT, pt.WRITEBACK]
    # Invariant 2: only a write's return leaves WRITEBACK, and only for RESIDENT (or EMPTY on a closed region).
    assert [pt.STATE_NAMES[s] for s in np.flatnonzero(legal[pt.WRITEBACK])] == ["EMPTY", "RESIDENT"]
    # WRITEBACK is entered only from RESIDENT.
    assert [pt.STATE_NAMES[s] for s in np.flatnonzero(legal[:, pt.WRITEBACK])] == ["RESIDENT"]
    assert not legal[pt.SWAPPED, pt.RESIDENT]    # a swapped page is mapped only through LOADING
    assert not legal[pt.PUNCHING, pt.RESIDENT]   # a punched page comes back through its slot
    assert not legal[200, pt.EMPTY]              # a byte that is no state


def test_legal_moves_are_made_and_not_counted():
    t, check = table(strict=True)
    t.move(3, pt.LOADING)                                    # EMPTY -> LOADING
    t.move(np.array([3]), pt.RESIDENT)                       # LOADING -> RESIDENT
    t.move(slice(3, 4), pt.WRITEBACK)
    t.move(t.state == pt.WRITEBACK, pt.RESIDENT)             # a mask
    t.move(np.array([2, 3]), np.array([pt.EMPTY, pt.PUNCHING], np.uint8))  # one target per page
    assert t.state[2] == pt.EMPTY and t.state[3] == pt.PUNCHING
    assert check.illegal == 0


def test_illegal_move_raises_in_strict_mode(caplog):
    t, check = table(strict=True)
    t.move(5, pt.LOADING)
    with caplog.at_level(logging.ERROR, logger="uswap.pagetable"):
        with pytest.raises(pt.IllegalTransition, match="region 7: page 5: LOADING -> WRITEBACK"):
            t.move(5, pt.WRITEBACK)
    assert t.state[5] == pt.LOADING  # not made
    assert check.illegal == 1
    assert ILLEGAL_TRANSITION in caplog.text


def test_illegal_move_counts_and_is_made_otherwise(caplog):
    """Not strict (production): counted and logged, the move made all the
    same, so behaviour never depends on the check."""
    t, check = table(strict=False)
    t.move(np.array([1, 2]), pt.SWAPPED)       # EMPTY -> SWAPPED (a fork's child table): legal
    with caplog.at_level(logging.ERROR, logger="uswap.pagetable"):
        t.move(np.array([0, 1, 2]), pt.RESIDENT)   # page 0 EMPTY -> RESIDENT is legal; 1, 2 are not
    assert check.illegal == 2
    assert (t.state[:3] == pt.RESIDENT).all()
    assert "page 1: SWAPPED -> RESIDENT" in caplog.text and "page 2: SWAPPED -> RESIDENT" in caplog.text
    assert "page 0" not in caplog.text


def test_each_way_of_moving_is_checked():
    """move's quick paths (a translate of the states' bytes for many pages
    with one target, a target array with one value taken as that state, a
    numpy lookup for targets that differ) reject what the table does: every
    illegal page is counted, with a corrupt state byte among them."""
    t, check = table(strict=False)
    t.state[:] = pt.SWAPPED
    t.state[4] = 200                                                 # no state at all
    t.move(slice(0, 6), pt.LOADING)                                  # one target: 4 is illegal
    assert check.illegal == 1
    t.move(np.array([0, 1]), np.array([pt.RESIDENT, pt.RESIDENT]))    # one value: both legal
    t.move(np.array([2, 3]), np.array([pt.RESIDENT, pt.RESIDENT], np.int64))
    assert check.illegal == 1
    t.move(np.array([6, 7]), np.array([pt.LOADING, pt.RESIDENT]))     # differ: SWAPPED -> RESIDENT illegal
    assert check.illegal == 2
    t.move(np.zeros(0, np.intp), np.zeros(0, np.uint8))               # nothing to move
    t.move(t.state == pt.LOADING, pt.RESIDENT)                        # a mask, one target: all legal
    assert check.illegal == 2
    assert t.state[:8].tolist() == [pt.RESIDENT] * 8


def _fast_path_with_states(states: np.ndarray):
    """A real fast path engine (its threads running) with region slot 0's
    page table pointing at `states`."""
    efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    e = lib.fp_new(1, efd, -1)
    assert e != ffi.NULL
    r = e.regions[0]
    r.id = 3
    r.npages = len(states)
    r.state = ffi.cast("uint8_t *", states.ctypes.data)
    return e, efd


def test_fast_path_check_counts_illegal_moves():
    states = np.zeros(8, np.uint8)
    e, efd = _fast_path_with_states(states)
    try:
        lib.fp_test_set_state(e, 0, 2, pt.LOADING)    # EMPTY -> LOADING: a zero fill
        lib.fp_test_set_state(e, 0, 2, pt.RESIDENT)   # LOADING -> RESIDENT
        assert e.illegal_transitions == 0
        lib.fp_test_set_state(e, 0, 2, pt.SWAPPED)    # RESIDENT -> SWAPPED is legal (vanished clean)
        lib.fp_test_set_state(e, 0, 2, pt.RESIDENT)   # SWAPPED -> RESIDENT: never legal
        assert e.illegal_transitions == 1
        assert states[2] == pt.RESIDENT   # made all the same when not strict
    finally:
        lib.fp_stop(e)
        os.close(efd)


def test_fast_path_check_aborts_in_strict_mode():
    """Strict: the C check abort()s with a message naming region, page, from
    and to. Run in a child process, which it kills."""
    code = textwrap.dedent("""
        import os
        import numpy as np
        from uswap._fastpath_cffi import ffi, lib
        states = np.full(4, 3, np.uint8)   # SWAPPED
        e = lib.fp_new(1, os.eventfd(0), -1)
        r = e.regions[0]
        r.id, r.npages, r.state = 5, 4, ffi.cast("uint8_t *", states.ctypes.data)
        e.strict_transitions = 1
        lib.fp_test_set_state(e, 0, 1, 4)   # SWAPPED -> LOADING: legal
        print("legal move made", flush=True)
        lib.fp_test_set_state(e, 0, 1, 2)   # LOADING -> WRITEBACK: illegal
        print("not reached", flush=True)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == -signal.SIGABRT, (out.returncode, out.stdout, out.stderr)
    assert "legal move made" in out.stdout and "not reached" not in out.stdout
    assert f"{ILLEGAL_TRANSITION}: region 5 page 1 state 4 -> 2" in out.stderr


def test_daemon_status_counts_illegal_transitions(start_daemon, file_backing):
    """A daemon reports the count (Python and fast path together) in its
    status; the fixture's teardown checks its log for any it made."""
    d = start_daemon(file_backing)
    assert d.status()["illegal_transitions_total"] == 0
