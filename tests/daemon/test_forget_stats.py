"""`forget.py` `Forget.forget_range`'s counts (status `forgotten_pages_total`,
`forgotten_after_io_total`): a page is counted once however many times its
range is forgotten while its I/O is in flight -- the client unmaps it, maps
the range again in place (the realloc pattern) and unmaps it again, or
discards it and unmaps it, or an adopted region's unmapped and discarded
runs overlap (adoption.py after_live). Before, each forget of a page still
under I/O (WRITEBACK, or PUNCHING by an eviction or by the first forget's
own punch) added one to `forgotten_after_io_total`, while the completion
forgets it once: the count of "the pages forgotten only when their I/O
returned" passed the pages so forgotten (a page the first forget counted in
`forgotten_pages_total` at once, and punched, was counted there too).

Real Forget, Puncher, RegionSet, SlotAllocator, CopyOnWrite and page table;
the punch pool is a stand-in that keeps the jobs (their completions are
given by the test, as test_punch_batch.py does), and no uffd (the wakes go
to fd -1 and fail, as they are not checked).
"""
from __future__ import annotations

import numpy as np

from uswap import config
from uswap.daemon import fastpath
from uswap.daemon import pagetable as pt
from uswap.daemon.budget import Budget
from uswap.daemon.cow import CopyOnWrite
from uswap.daemon.forget import Forget
from uswap.daemon.punch import Puncher
from uswap.daemon.region import Region
from uswap.daemon.regionset import RegionSet
from uswap.daemon.slots import SlotAllocator

PAGE = 4096
N = 8
RESIDENT, WRITING, EVICTING = 1, 2, 3  # page roles


class KeptJobs:
    """The punch pool: jobs kept, completed by the test."""

    def __init__(self) -> None:
        self.jobs = []

    def submit(self, work, on_done) -> None:
        self.jobs.append(on_done)


def test_a_page_forgotten_twice_during_its_io_is_counted_once(tmp_path):
    cfg = config.load(None, {"backing": str(tmp_path / "store"), "state_dir": str(tmp_path / "state")})
    slots = SlotAllocator(64)
    regions = RegionSet(cfg, slots, None, fastpath.plain_shared())
    io = KeptJobs()
    puncher = Puncher(regions, slots, io)
    forget = Forget(regions, slots, CopyOnWrite(regions, Budget(cfg, regions, None), slots), puncher)
    region = Region(-1, -1, 1 << 30, N * PAGE, owner=None)
    table = region.table
    first, n = slots.alloc(3)
    assert n == 3
    table.move(np.array([RESIDENT, WRITING, EVICTING]), pt.RESIDENT)
    regions.charged = 3
    table.slot[[RESIDENT, WRITING, EVICTING]] = [first, first + 1, first + 2]
    table.move(np.array([WRITING]), pt.WRITEBACK)
    puncher.drop(region, np.array([EVICTING]))  # an eviction's punch in flight
    assert len(io.jobs) == 1

    forget.forget_range(region, 0, N)  # munmap
    stats = regions.stats
    # The 6 idle pages and RESIDENT (punched by the forget) at once; WRITING
    # and EVICTING when their I/O returns.
    assert (stats["forgotten_pages"], stats["forgotten_after_io"]) == (N - 2, 2)
    assert table.state[RESIDENT] == pt.PUNCHING and len(io.jobs) == 2

    forget.forget_range(region, 0, N)  # mapped again in place, unmapped again before the I/O returned
    # The idle pages are a range unmapped again; the three under I/O are
    # forgotten already (F_DISCARD): not again.
    assert stats["forgotten_after_io"] == 2, f"{stats['forgotten_after_io']} pages forgotten after their I/O, of 2"
    assert stats["forgotten_pages"] == 2 * (N - 3) + 1

    # The I/O returns: the write (writeback.py _write_done forgets its
    # F_DISCARD pages once RESIDENT again), then every punch.
    table.move(np.array([WRITING]), pt.RESIDENT)
    forget.forget_pages(region, np.array([WRITING]))
    for on_done in list(io.jobs):
        on_done(None, None)
    io.jobs.clear()
    puncher.apply_done()
    assert stats["forgotten_after_io"] == 2
    assert stats["forgotten_pages"] == 2 * (N - 3) + 1 + 2  # WRITING and EVICTING, once each
    assert (table.state == pt.EMPTY).all() and slots.references == 0
    assert regions.charged == 0 and puncher.punching == 0
