"""The read-ahead locality rule that takes a fault inside a stream's
windows (past its latest fault, not past where they end) for the stream's
(native/policy.h us_ra_locality), adversarially (a reviewer's).

A WRITE fault there is not the stream being rewritten: a read stream's
windows ahead may hold pages evicted since they were read through, and
another writer (a thread updating records, say) faults on one of them. It
must map that one page writable, not turn the stream into a write stream
(readahead.py region.write_stream), whose windows are mapped writable:
dirty, their slots freed, every page of them written back again on
eviction for one 4 KiB write.

Set up without timing: a stream over 0..K-1 leaves its windows loaded
ahead of it, up to STREAM_DEPTH windows past its latest fault (ra_expect);
passes over a second region evict those pages again, unused -- a swap-in of
another region leaves the first one's read-ahead state as the stream left
it -- and the write lands on page K + 16, past the stream's latest fault
and well behind where its windows end. The page table file in the state
directory says which pages are dirty; real daemon, real O_DIRECT file store and nfs:// server."""
from __future__ import annotations

import glob
import json
import os

import numpy as np

from tests.daemon.test_readahead import CLIENT
from tests.stream_client import assert_daemon_sound, cmd, fill_swapped, running, settled
from uswap.daemon import pagetable as pt

NPAGES = 6144          # the stream's region: 24 MiB
BUDGET = "16M"         # 4096 pages; read-ahead depth min(4 * 128, 4096 / 8) = 512 pages
K = 2048               # the stream reads 0..K-1
WRITE = K + 16         # inside the stream's windows, well behind where they end
PRESS = 8192           # the second region, filled: evicts the first one's pages
CONFIG = {"high_watermark": 0.5, "low_watermark": 0.45}


def _table(d, npages: int) -> pt.PageTable:
    """The page table of the daemon's region of `npages` pages, read from
    its state directory (the arrays the daemon itself maps)."""
    for meta in glob.glob(os.path.join(d.state_dir, "region-*.json")):
        with open(meta) as f:
            if json.load(f)["size"] == npages * 4096:
                return pt.PageTable.load(meta[:-len(".json")] + ".table", npages)
    raise AssertionError(f"no region of {npages} pages in {d.state_dir}")


def test_a_write_inside_a_read_streams_windows_dirties_its_page_only(backing, start_daemon):
    d = start_daemon(backing, store_size="128M", max_resident=BUDGET, config=CONFIG)
    with running(d, CLIENT, NPAGES) as c:
        fill_swapped(d, c, K + 512)   # the stream's range and its windows past it
        cmd(c, f"seq 0 {K}", "seq", timeout=120)
        settled(d)
        with running(d, CLIENT, PRESS) as press:
            cmd(press, "fill", "filled", timeout=120)
            table = _table(d, NPAGES)
            # The premise: passes over the second region evict the written
            # page and most of those past it (which victims a pass takes is
            # reclaim's choice: repeated until they are out).
            for _ in range(20):
                settled(d)
                ahead = table.state[WRITE:WRITE + 256] == pt.SWAPPED
                if ahead[0] and ahead.sum() >= 192:
                    break
                cmd(press, f"seq 0 {PRESS}", "seq", timeout=120)
            else:
                raise AssertionError(np.unique(table.state[WRITE:WRITE + 256], return_counts=True))
            cmd(c, f"dirty {WRITE}", "dirtied")
            settled(d)
            resident = np.isin(table.state, (pt.RESIDENT, pt.WRITEBACK))
            dirty = np.flatnonzero(resident & ((table.flags & pt.F_DIRTY) != 0))
            # The written page, and no other: its neighbours, if read along,
            # are clean copies of their slots.
            assert dirty.tolist() == [WRITE], (len(dirty), dirty[:20].tolist())
        # Every page again: the written one holds its new word.
        cmd(c, f"seq 0 {NPAGES}", "seq", timeout=120)
    assert_daemon_sound(d)
