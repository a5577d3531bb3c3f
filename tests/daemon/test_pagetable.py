"""Page tables (uswap/daemon/pagetable.py): the per-page metadata stays compact."""
from __future__ import annotations

import os

import numpy as np

from uswap.daemon import pagetable as pt
from uswap.daemon.pagetable import PageTable


def test_metadata_is_compact():
    t = PageTable(1 << 16)
    assert t.nbytes / (1 << 16) <= 16
    assert t.nbytes / (1 << 16) == 14


def test_a_fresh_tables_file_holds_only_its_slot_numbers(tmp_path):
    """A region nothing was written to: its state file has blocks for the
    slot array (every entry NO_SLOT) and not for the arrays of zeros, which
    read back as zeros all the same; a page written later is kept."""
    npages = 1 << 20
    table = PageTable(npages)
    path = str(tmp_path / "table")
    table.persist(path)
    allocated = os.stat(path).st_blocks * 512
    assert allocated <= npages * 4 + (1 << 20), f"{allocated} bytes allocated for a fresh table of {npages} pages"
    assert not table.state.any() and not table.flags.any() and not table.stamp.any() and not table.sum.any()
    assert (table.slot == pt.NO_SLOT).all()
    table.move(npages // 2, pt.RESIDENT)
    table.stamp[npages // 2] = 7
    again = PageTable.load(path, npages)
    assert again.state[npages // 2] == pt.RESIDENT and again.stamp[npages // 2] == 7
    assert np.count_nonzero(again.state) == 1


def test_a_tables_content_is_copied_into_its_file(tmp_path):
    table = PageTable(4096)
    table.state[10] = pt.SWAPPED
    table.slot[10] = 99
    table.sum[10] = 0xDEADBEEF
    table.persist(str(tmp_path / "table"))
    again = PageTable.load(str(tmp_path / "table"), 4096)
    assert (again.state[10], again.slot[10], again.sum[10]) == (pt.SWAPPED, 99, 0xDEADBEEF)
    assert np.count_nonzero(again.state) == 1 and np.count_nonzero(again.slot != pt.NO_SLOT) == 1


def test_run_end_is_past_the_run_going_on_from_an_index():
    """Dirtying.unprotect_runs retries the rest of a failing page's run."""
    pages = np.array([1, 2, 3, 7, 8, 20], np.int64)
    assert [pt.run_end(pages, i) for i in range(len(pages))] == [3, 3, 3, 5, 5, 6]
