"""The policy rules of native/policy.h, through uswap/daemon/policy.py: the
functions the engine and the fast path's threads both call."""
from __future__ import annotations

import numpy as np
import pytest

from uswap.daemon import pagetable as pt
from uswap.daemon import policy
from uswap.daemon.region import new_ra_streams


@pytest.mark.parametrize("page, last_fault, ra_expect, ra_window, expected", [
    (100, 50, -1, 1, policy.RANDOM),     # no stream, far from the last fault
    (58, 50, -1, 1, policy.NEAR),        # exactly ra_pages after the last fault
    (42, 50, -1, 1, policy.NEAR),        # exactly ra_pages before it
    (59, 50, -1, 1, policy.RANDOM),      # one past
    (41, 50, -1, 1, policy.RANDOM),
    (3, -1, -1, 1, policy.NEAR),         # a region's first faults are near the "last" one at -1
    (200, 10, 200, 16, policy.STREAM),   # where the last window ended
    (184, 10, 200, 16, policy.STREAM),   # inside the last window (the budget cut it short)
    (183, 195, 200, 16, policy.RANDOM),  # before the window, behind the latest fault
    (208, 10, 200, 16, policy.STREAM),   # a little past its end (resident pages stopped it)
    (209, 10, 200, 16, policy.RANDOM),
    (100, 10, 200, 16, policy.STREAM),   # inside the windows ahead of the stream's latest fault (a page they
    (19, 10, 200, 16, policy.STREAM),    # read through, evicted since, or one the budget left out)
    (60, 80, 200, 16, policy.RANDOM),    # behind the latest fault, far from it
    (0, 100, 0, 1, policy.RANDOM),       # ra_expect 0: no stream yet
])
def test_ra_locality(page, last_fault, ra_expect, ra_window, expected):
    assert policy.ra_locality(page, last_fault, ra_expect, ra_window, 8) == expected


@pytest.mark.parametrize("tick, stamp, expected", [
    (1000, 1000, True),                  # refault at once
    (1100, 1000, True),                  # exactly a budget's worth later
    (1101, 1000, False),                 # one more
    (40, (1 << 32) - 50, True),          # the clock wrapped: 90 faults apart
    (60, (1 << 32) - 50, False),         # 110 apart
    (1000, 1001, False),                 # stamp ahead of the clock: a full lap apart
])
def test_refault_active(tick, stamp, expected):
    assert policy.refault_active(tick, stamp, 100) is expected


@pytest.mark.parametrize("page, fill_expect, window, expected", [
    (10, 11, 8, 1),                      # not where the last fill ended: start again
    (10, -1, 1, 1),                      # no stream yet
    (10, 10, 1, 2),                      # the stream goes on: doubles
    (10, 10, 16, 32),
    (10, 10, 32, 32),                    # 64 would pass fill_max
    (10, 10, 20, 32),                    # capped, not doubled to 40
])
def test_fill_window(page, fill_expect, window, expected):
    assert policy.fill_window(page, fill_expect, window, 32) == expected


@pytest.mark.parametrize("charged, n, draining, expected", [
    (90, 5, False, 5),                   # room for all
    (95, 5, False, 5),                   # exactly to the budget
    (96, 5, False, 4),                   # a window takes what is admitted
    (100, 1, False, 0),                  # full
    (120, 3, False, 0),                  # over budget (overcommitted)
    (120, 3, True, 3),                   # draining: everything comes home
])
def test_admit(charged, n, draining, expected):
    assert policy.admit(charged, 100, n, draining) == expected


def test_must_overcommit():
    assert policy.must_overcommit(0, 0, 0, 0, 0)
    for busy in range(5):
        counts = [0] * 5
        counts[busy] = 1   # anything in flight that frees or settles memory: wait for it
        assert not policy.must_overcommit(*counts)


@pytest.mark.parametrize("before, after, expected", [
    (10, 11, False),    # far under both: no wake
    (90, 91, True),     # first past clean_pages (90): background writeback starts
    (85, 95, True),     # a fill window across it
    (91, 92, False),    # already past it: the engine runs the cleaner when it runs anyway
    (98, 99, False),    # at the high watermark (99), not past it
    (99, 100, True),    # past it: reclaim is due
    (100, 101, True),   # and every charge after
])
def test_kick_due(before, after, expected):
    """When a fault thread's charge wakes the engine (fastpath.c; the engine
    itself never needs waking, so there is no policy.py wrapper)."""
    from uswap._fastpath_cffi import lib
    assert bool(lib.us_kick_due(before, after, 99, 90)) == expected


@pytest.mark.parametrize("flags", [0, pt.F_DIRTY, pt.F_ACTIVE, pt.F_DIRTY | pt.F_ACTIVE, pt.F_WAITERS])
def test_minor_use_activates_and_keeps_every_other_flag(flags):
    """A MINOR fault on a page in memory is a use: F_ACTIVE is set, and no
    other flag -- dirtiness above all -- is touched."""
    assert policy.minor_use(flags) == flags | pt.F_ACTIVE


@pytest.mark.parametrize("state", [pt.RESIDENT, pt.WRITEBACK, pt.LOADING, pt.PUNCHING, pt.SWAPPED, pt.EMPTY])
@pytest.mark.parametrize("flags", [0, pt.F_DIRTY, pt.F_ACTIVE, pt.F_DIRTY | pt.F_ACTIVE])
@pytest.mark.parametrize("children", [0, 1, 65535])
def test_minor_writable_only_dirty_resident_unshared(state, flags, children):
    """A MINOR fault maps its page writable only when it is RESIDENT, dirty
    and read by no forked child; every other page write-protected (a clean
    page's first write, a page under writeback, a child's snapshot must fault)."""
    want = state == pt.RESIDENT and bool(flags & pt.F_DIRTY) and children == 0
    assert policy.minor_writable(state, flags, children) == want


def streams(*rows: tuple[int, int, int]) -> np.ndarray:
    """A region's read-ahead streams: these (last fault, ra_expect, window)
    rows first, the rest none yet."""
    s = new_ra_streams()
    for i, (last, expect, window) in enumerate(rows):
        s[i, :3] = (last, expect, window)
    return s


def test_ra_find_takes_the_first_stream_with_locality():
    # Two streams, each continued between the other's faults: a fault is
    # each one's, not random to the latest one (row 0).
    s = streams((1000, 1001, 1), (5, 6, 1))
    assert policy.ra_find(1001, s, 8) == (0, policy.STREAM)
    assert policy.ra_find(6, s, 8) == (1, policy.STREAM)
    assert policy.ra_find(500, s, 8) == (-1, policy.RANDOM)
    # An older row that is not a stream yet (one random fault's page) is
    # continued only where it ended: near it, or a little past, is random
    # (row 0 would take both), so a random pass over every 8th page does
    # not load windows around the pages of the last eight faults.
    assert policy.ra_find(3, s, 8) == (-1, policy.RANDOM)
    assert policy.ra_find(13, s, 8) == (-1, policy.RANDOM)
    assert policy.ra_find(1009, s, 8) == (0, policy.STREAM)
    # An older row that is a stream: by the stream rule (inside its windows,
    # or a little past where they end), never near.
    s = streams((1000, 1001, 1), (64, 96, 32))
    s[1, policy.RA_FLAGS] = policy.RA_F_STREAMING
    assert policy.ra_find(80, s, 8) == (1, policy.STREAM)
    assert policy.ra_find(100, s, 8) == (1, policy.STREAM)
    assert policy.ra_find(60, s, 8) == (-1, policy.RANDOM)
    # Row 0 wins where two have locality: with one stream, the one-stream rule.
    assert policy.ra_find(1000, streams((999, 1000, 1), (1000, 1001, 1)), 8) == (0, policy.STREAM)


def test_ra_use_keeps_streams_latest_used_first():
    s = streams(*[(i * 1000, i * 1000 + 1, 1) for i in range(policy.RA_STREAMS)])
    policy.ra_use(s, 2)  # row 2's fault: it moves to the front, rows 0 and 1 one down
    assert s[:4, 0].tolist() == [2000, 0, 1000, 3000]
    policy.ra_use(s, 0)
    assert s[:4, 0].tolist() == [2000, 0, 1000, 3000]
    last = int(s[-1, 0])
    policy.ra_use(s, -1)  # a new stream: every row one down, the least recently used dropped
    assert s[:5, 0].tolist() == [2000, 2000, 0, 1000, 3000]
    assert last not in s[1:, 0].tolist()
