"""The paging policy rules, each written once, in C (native/policy.h), and
called from here by the engine and directly by the fast path's threads, so
the two cannot drift apart. Pure functions: no I/O, no lock, no state.
"""
from __future__ import annotations

import numpy as np

from uswap._fastpath_cffi import ffi, lib

# What a swap-in fault is to the region's read-ahead (ra_locality).
RANDOM = lib.US_RA_RANDOM   # no locality with the last swap-in: read the page alone
NEAR = lib.US_RA_NEAR       # near the last swap-in fault: read its aligned window
STREAM = lib.US_RA_STREAM   # past a stream's latest fault, not past its windows: its window doubles


def ra_locality(page: int, last_fault: int, ra_expect: int, ra_window: int, ra_pages: int) -> int:
    """RANDOM, NEAR or STREAM: a swap-in fault at `page` against the region's
    read-ahead stream (a row of Region.ra_streams)."""
    return lib.us_ra_locality(page, last_fault, ra_expect, ra_window, ra_pages)


# A region's read-ahead streams (Region.ra_streams): rows of RA_COLS, latest used first.
RA_STREAMS = lib.US_RA_STREAMS
RA_COLS = lib.US_RA_COLS
RA_LAST, RA_EXPECT, RA_WINDOW, RA_FLAGS = lib.US_RA_LAST, lib.US_RA_EXPECT, lib.US_RA_WINDOW, lib.US_RA_FLAGS
RA_F_STREAMING = lib.US_RA_F_STREAMING   # its last fault continued a sequential stream
RA_F_WRITING = lib.US_RA_F_WRITING       # and a write continued it


def _streams_ptr(streams: np.ndarray):
    assert streams.dtype == np.int64 and streams.shape == (RA_STREAMS, RA_COLS) and streams.flags.c_contiguous
    return ffi.from_buffer("int64_t[]", streams)  # not .ctypes.data: 0.3 us, not 1.6


def ra_find(page: int, streams: np.ndarray, ra_pages: int) -> tuple[int, int]:
    """(the row of `streams` the swap-in fault at `page` belongs to, or -1
    for none; its locality: RANDOM, NEAR or STREAM): the first row, latest
    used first, with locality (us_ra_find)."""
    locality = ffi.new("int *")
    which = lib.us_ra_find(page, _streams_ptr(streams), ra_pages, locality)
    return which, locality[0]


def ra_use(streams: np.ndarray, which: int) -> None:
    """A swap-in starts on row `which` (ra_find's answer): it becomes row 0;
    -1: a new stream, row 0 the caller's to set, the least recently used
    dropped (us_ra_use)."""
    lib.us_ra_use(_streams_ptr(streams), which)


def refault_active(tick: int, stamp: int, max_pages: int) -> bool:
    """A page swapped in at fault clock `tick`, evicted at `stamp`, returns
    active (F_ACTIVE): it came back within a budget's worth of faults."""
    return bool(lib.us_refault_active(tick & 0xFFFFFFFF, stamp & 0xFFFFFFFF, max_pages))


def fill_window(page: int, fill_expect: int, window: int, fill_max: int) -> int:
    """The zero-fill window of a first touch at `page`: doubled up to
    fill_max where the last fill ended, else 1."""
    return lib.us_fill_window(page, fill_expect, window, fill_max)


def admit(charged: int, max_pages: int, n: int, draining: bool) -> int:
    """How many of n pages the budget admits now (all of them while draining)."""
    return lib.us_admit(charged, max_pages, n, draining)


def must_overcommit(writes_inflight: int, loads_inflight: int, loads_queued: int,
                    fast_loads_inflight: int, young_punches: int) -> bool:
    """A fault the budget refuses is charged anyway: nothing in flight would
    free or settle memory (the store cannot take writes)."""
    return bool(lib.us_must_overcommit(writes_inflight, loads_inflight, loads_queued, fast_loads_inflight,
                                       young_punches))


def minor_use(flags: int) -> int:
    """A page's flags after a MINOR fault on it while in memory (its first
    use since it left the client's page tables): made active."""
    return lib.us_minor_use(flags)


def minor_writable(state: int, flags: int, children: int) -> bool:
    """A MINOR fault maps its page again writable (else write-protected):
    RESIDENT, dirty, and no forked child still reading it (`children`:
    CopyOnWrite.children_at)."""
    return bool(lib.us_minor_writable(state, flags, children))
