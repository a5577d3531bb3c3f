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
  parked until the writeback returns; a write parked on a page evicted
  meanwhile is woken to fault again. Failed before: the retry looked at
  RESIDENT alone.
"""
from __future__ import annotations

import ctypes
import select
import threading

import numpy as np
import pytest

from tests.uffd_region import fill_zeros, registered_memfd, write_protected
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
        fill_zeros(fd, addr, N, write_protect=True)  # all write-protected
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


def _write_page(addr: int, page: int) -> None:
    ctypes.memmove(addr + page * PAGE, b"w", 1)


def test_a_retry_wakes_a_write_parked_on_a_page_evicted_meanwhile(setup):
    """A write parked on page 6 (its un-protect got EAGAIN); meanwhile the
    page was written back and evicted (punched from the memfd: SWAPPED).
    The retry has nothing to un-protect, but must wake the write, which
    faults again (MISSING) and is served; before, nothing woke it (a punch
    wakes only F_WAITERS pages) and it waited for ever."""
    fd, addr, regions, region, dirtying, slots = setup
    table = region.table
    writer = threading.Thread(target=_write_page, args=(addr, 6))
    writer.start()
    try:
        assert select.select([fd], [], [], 30)[0], "the write did not fault"
        assert [e[0] for e in uffd.EventReader().read(fd)] == [uffd.EVENT_PAGEFAULT]
        table.flags[6] = pt.F_DIRTY  # make_dirty's, whose un-protect gets the EAGAIN here
        _unprotect_while_unmapping(fd, addr, dirtying, region, np.array([6], np.int64))
        # Written back and evicted meanwhile (the page punched from the memfd).
        slot, _ = slots.alloc(1)
        table.slot[6] = slot
        table.move(np.array([6]), pt.WRITEBACK)
        table.move(np.array([6]), pt.RESIDENT)
        table.move(np.array([6]), pt.PUNCHING)
        native.punch_hole(region.memfd, 6 * PAGE, PAGE)
        table.move(np.array([6]), pt.SWAPPED)
        table.flags[6] = 0
        assert _run_retries(regions) == 1
        # Woken, the write faults again: a new fault on page 6 (bounded wait:
        # before the fix none ever came).
        assert select.select([fd], [], [], 10)[0], "the parked write was never woken"
        events = uffd.EventReader().read(fd)
        assert [(e[0], e[2] // PAGE * PAGE) for e in events] == [(uffd.EVENT_PAGEFAULT, addr + 6 * PAGE)]
    finally:
        # Served (a zero page), so the writer returns.
        zeros = native.AlignedBuffer(PAGE)
        try:
            uffd.zero_fill(fd, addr + 6 * PAGE, PAGE, zeros.addr, False)
            uffd.writeprotect(fd, addr + 6 * PAGE, PAGE, protect=False)
        finally:
            zeros.free()
        writer.join(30)
    assert not writer.is_alive()
