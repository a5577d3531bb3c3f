"""`status`'s `metadata`: the daemon's per-page arrays sized from their own
definitions, not a constant. The page tables grow by exactly
PageTable.BYTES_PER_PAGE per page of each live region and shrink when a
region is freed; the slot map is 1 byte per slot of the store."""
from __future__ import annotations

import uswap
from tests.harness import status, wait_for
from uswap.daemon.pagetable import PageTable

PAGE = 4096


def test_metadata_counts_the_live_regions_and_the_store(start_daemon, file_backing):
    d = start_daemon(file_backing, store_size="64M", max_resident="8M")
    meta = status(d)["metadata"]
    assert meta["page_table_bytes_per_page"] == PageTable.BYTES_PER_PAGE == 14
    assert meta["page_tables_bytes"] == 0
    # A reference count in a byte per slot (slots.py: no free map, counts
    # past 254 spilled to a dict, writes in flight kept as runs).
    assert meta["slot_map_bytes"] == (64 << 20) // PAGE
    with uswap.connect(d.socket, name="meta-client") as c:
        small = c.alloc(3 * PAGE)
        big = c.alloc(1000 * PAGE)
        assert status(d)["metadata"]["page_tables_bytes"] == 1003 * PageTable.BYTES_PER_PAGE
        big.close()  # a region is dropped once its I/O is done: polled with a deadline
        wait_for("the freed region's table", lambda: tables(d) == 3 * PageTable.BYTES_PER_PAGE, timeout=30)
        small.close()
        wait_for("every table gone", lambda: tables(d) == 0, timeout=30)


def tables(d) -> int:
    return status(d)["metadata"]["page_tables_bytes"]
