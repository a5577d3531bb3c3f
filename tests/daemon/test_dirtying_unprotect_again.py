"""`dirtying.py` `Dirtying.unprotect_runs` when UFFDIO_WRITEPROTECT answers
EAGAIN for real, in this process on a real userfaultfd-registered memfd (the
client's region, tests/uffd_region.py): a thread of the "client" unmaps a
page of the region, and until the UNMAP event it queued is read (and the
thread has returned from munmap) the kernel's mmap_changing is set and
every UFFDIO_WRITEPROTECT of that uffd fails EAGAIN -- no timing involved,
the test waits for the event to be readable (poll) before the call.

The un-protect is then retried on a timer (`_unprotect_later`); the timer's
function is called here directly once the event is read. What the kernel did
is read back from pagemap's uffd-wp bit. The region is a real Region, a
real RegionSet, Budget (its clock) and CopyOnWrite (no fork: nothing to
copy).

- the retry un-protects and wakes exactly the pages left protected;
- the retry takes each page as it is then: one written back meanwhile
  (kept resident clean with its slot copy: cleaner.py) is dirtied again
  before its parked write goes through -- un-protected clean, the write
  would reach the memfd unseen and be lost when reclaim drops the clean
  page (invariant 4); one under writeback stays protected, its write
  parked until the writeback returns. Failed before: the retry looked at
  RESIDENT alone.
"""
from __future__ import annotations

import select
import threading

import numpy as np
import pytest

from tests.uffd_region import registered_memfd, write_protected
from uswap import config, native, uffd
from uswap.daemon import fastpath
from uswap.daemon import pagetable as pt
from uswap.daemon.budget import Budget
from uswap.daemon.cow import CopyOnWrite
from uswap.daemon.dirtying import Dirtying
from uswap.daemon.region import Region
from uswap.daemon.regionset import RegionSet
from uswap.daemon.slots import SlotAllocator

PAGE = 4096
N = 16
UNMAPPED = N - 1  # the page the client unmaps (its UNMAP event makes the EAGAIN)


@pytest.fixture
def setup(tmp_path):
    with registered_memfd(N, "test-dirtying-again") as (fd, memfd, addr):
        zeros = native.AlignedBuffer(N * PAGE)
        try:
            assert uffd.zero_fill(fd, addr, N * PAGE, zeros.addr, True) == N * PAGE  # all write-protected
        finally:
            zeros.free()
        cfg = config.load(None, {"backing": str(tmp_path / "store"), "state_dir": str(tmp_path / "state")})
        slots = SlotAllocator(1024)
        regions = RegionSet(cfg, slots, None, fastpath.plain_shared())
        region = Region(fd, memfd, addr, N * PAGE, owner=None)
        table = region.table
        budget = Budget(cfg, regions, None)  # the clock only: nothing is charged here
        dirtying = Dirtying(regions, slots, budget, CopyOnWrite(regions, budget, slots))
        table.move(np.arange(N), pt.RESIDENT)
        yield fd, addr, regions, region, dirtying, slots


def _unprotect_while_unmapping(fd: int, addr: int, dirtying: Dirtying, region, pages: np.ndarray) -> None:
    """unprotect_runs(pages) while a thread's munmap of page UNMAPPED waits
    for its UNMAP event to be read; then the event is read and the munmap
    returns."""
    unmapper = threading.Thread(target=native.munmap, args=(addr + UNMAPPED * PAGE, PAGE))
    unmapper.start()
    try:
        assert select.select([fd], [], [], 30)[0], "no UNMAP event queued"
        dirtying.unprotect_runs(region, pages)
    finally:
        events = uffd.EventReader().read(fd)
        unmapper.join(30)
    assert len(events) == 1 and not unmapper.is_alive()


def _run_retries(regions: RegionSet) -> int:
    """The timers the EAGAIN left (one per run that got it), called now
    (their delay is the engine's business; what they do is this test's)."""
    retries = sorted(regions.timers)
    regions.timers.clear()
    for _, _, retry in retries:
        retry()
    return len(retries)


def test_again_is_retried_on_exactly_the_pages_given(setup):
    fd, addr, regions, region, dirtying, _ = setup
    pages = np.array([1, 2, 3, 6, 9, 10], np.int64)
    region.table.flags[pages] = pt.F_DIRTY
    _unprotect_while_unmapping(fd, addr, dirtying, region, pages)
    assert write_protected(addr, N - 1) == [True] * (N - 1)  # EAGAIN: nothing done yet
    assert regions.stats["ioctl_retries"] >= 1
    # One retry per run (1-3, 6, 9-10), each un-protecting its run once.
    assert _run_retries(regions) == 3
    assert write_protected(addr, N - 1) == [p not in pages for p in range(N - 1)]
    assert not regions.timers  # done: no retry left


def test_a_retry_takes_each_page_as_it_is_then(setup):
    """Between the EAGAIN and its retry, page 4 was written ahead and its
    write returned (RESIDENT, clean, its slot the copy: cleaner.py, as
    Writeback._write_done leaves it) and page 5's write is in flight
    (WRITEBACK). The parked write on 4 dirties it again (its slot freed)
    before it is let through; 5 stays protected, its write parked until the
    writeback returns (F_WAITERS). Before: 4 was un-protected clean with
    its slot (the write unseen, lost when the clean page is dropped), and 5
    skipped with nothing parked."""
    fd, addr, regions, region, dirtying, slots = setup
    pages = np.array([2, 3, 4, 5], np.int64)
    table = region.table
    table.flags[pages] = pt.F_DIRTY
    _unprotect_while_unmapping(fd, addr, dirtying, region, pages)
    slot, _ = slots.alloc(2)
    table.slot[4], table.slot[5] = slot, slot + 1
    table.flags[4] = 0
    table.move(np.array([5]), pt.WRITEBACK)
    table.flags[5] = pt.F_EVICT
    assert _run_retries(regions) == 1
    assert [write_protected(addr, N)[p] for p in (2, 3, 4, 5)] == [False, False, False, True]
    assert table.flags[4] & pt.F_DIRTY and table.slot[4] == pt.NO_SLOT
    assert table.flags[5] & pt.F_WAITERS and table.slot[5] == slot + 1
