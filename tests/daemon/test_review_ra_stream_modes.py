"""Each read-ahead stream's windows mapped as that stream asks (a
reviewer's): a region keeps several streams (native/policy.h us_ra_find;
readahead.py), and a stream that writes continue has its windows mapped
writable (dirty, their slots freed) while a read stream's are mapped
write-protected (clean copies of their slots). The mode is the stream's at
the time it queued the window -- not that of whichever stream of the
region faulted last when the queued load got a bounce buffer (swapin.py
pump_loads): two streams keep more windows queued than there are buffers,
and a read stream's windows taken from the write stream's row 0 came home
dirty, every page of them written back again on eviction.

One client thread interleaves three read streams (pages 0..3K-1) with a
write stream over 3K..4K-1 (each fault comes after another stream's); the page
table file in the state directory says which pages are dirty afterwards:
none of the read stream's, and none of them has a new slot (a dirty
page's slot is freed; written back, it gets another). Real daemon, real O_DIRECT file store and
nfs:// server."""
from __future__ import annotations

import numpy as np

from tests.daemon.test_readahead import CLIENT   # its "mix" command: r:P and w:P in the order given
from tests.daemon.test_review_ra_inside import _table
from tests.harness import status
from tests.stream_client import assert_daemon_sound, cmd, fill_swapped, running, settled
from uswap.daemon import pagetable as pt

NPAGES = 16384         # 64 MiB region
BUDGET = "32M"         # 8192 pages: the fill leaves pages 0..8191 swapped; depth 4 windows of 128
K = 1536               # each stream's pages
READERS = 3            # read streams over 0..K-1, K..2K-1, 2K..3K-1; the write stream over 3K..4K-1
# One I/O thread: 8 bounce buffers (swapin.py), fewer than the windows the
# four streams keep queued, so loads wait in the queue for a buffer.
CONFIG = {"high_watermark": 0.5, "low_watermark": 0.45, "io_threads": 1}


def test_a_read_streams_windows_stay_clean_beside_a_write_stream(backing, start_daemon):
    d = start_daemon(backing, store_size="160M", max_resident=BUDGET, config=CONFIG)
    with running(d, CLIENT, NPAGES) as c:
        fill_swapped(d, c, 8192)
        settled(d)
        table = _table(d, NPAGES)
        span = (READERS + 1) * K
        assert (table.state[:span] == pt.SWAPPED).all(), np.unique(table.state[:span], return_counts=True)
        slots = table.slot[:READERS * K].copy()
        streams = [("r", s) for s in range(READERS)] + [("w", READERS)]
        ops = [f"{kind}:{s * K + i}" for i in range(K) for kind, s in streams]
        st0 = status(d)
        cmd(c, "mix " + " ".join(ops), "mixed", timeout=180)
        st1 = settled(d)
        resident = np.isin(table.state, (pt.RESIDENT, pt.WRITEBACK))
        dirty = resident & ((table.flags & pt.F_DIRTY) != 0)
        # A read stream's page mapped writable is dirty now, or was and has
        # been written back since (to a new slot: a dirty page's slot is freed).
        read_dirty = np.flatnonzero(dirty[:READERS * K] | (table.slot[:READERS * K] != slots))
        assert read_dirty.tolist() == [], (len(read_dirty), read_dirty[:20].tolist())
        # The write stream's windows come home writable: its writes take
        # a few faults, not one each (a window write-protected because a
        # read stream faulted last costs a WP fault a page). MINOR faults
        # aside: the sampler's (pages it drops from the page tables).
        faults = (st1["faults_total"] - st1["minor_faults_total"]) - (st0["faults_total"] - st0["minor_faults_total"])
        assert faults <= K // 4, faults
        cmd(c, f"seq 0 {NPAGES}", "seq", timeout=120)
    assert_daemon_sound(d)
