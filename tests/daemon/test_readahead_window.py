"""ReadAhead._window, the rule of a stream's window, on a page table built
by hand: which pages the load owns (every SWAPPED page, whatever its slot),
its runs of adjacent slots, the pages it reads through, the runs split at a
slot being written (invariant 3), and the budget's cut."""
from __future__ import annotations

import numpy as np

from uswap.daemon import pagetable as pt
from uswap.daemon.pagetable import PageTable
from uswap.daemon.readahead import ReadAhead
from uswap.daemon.slots import SlotAllocator

R, S = pt.RESIDENT, pt.SWAPPED

class Budget:
    def __init__(self, room: int) -> None:
        self.room_left, self.charged = room, 0

    def room(self) -> int:
        return self.room_left

    def charge_leading(self, ok: np.ndarray) -> int:
        n = min(len(ok), self.room_left)
        self.room_left -= n
        self.charged += n
        return n

def window(states: list[int], slots: list[int], writing: tuple[int, ...] = (), room: int = 1 << 20,
           limit: int | None = None):
    """_window from page 0 of a table of these states and slots: (last page,
    skip as a list or None, runs as lists or None, pages charged -- page 0
    aside, which the caller charged)."""
    table = PageTable(len(states))
    table.state[:] = states
    table.slot[:] = slots
    ra = ReadAhead.__new__(ReadAhead)
    ra.slots = SlotAllocator(256)  # its writes in flight: one run per slot of `writing`
    for slot in writing:
        ra.slots.start_write(slot, 1)
    ra.budget = Budget(room)
    last, skip, runs = ra._window(table, 0, int(table.slot[0]), len(states) if limit is None else limit)
    return (last, None if skip is None else skip.tolist(), None if runs is None else runs.tolist(),
            ra.budget.charged)

def test_ordered_slots_are_one_plain_read():
    assert window([S] * 6, [10, 11, 12, 13, 14, 15]) == (5, None, None, 5)

def test_scattered_slots_stay_one_window_of_runs():
    # The old rule ended this window at page 1 (slot 50 is not 12).
    got = window([S] * 8, [10, 11, 50, 51, 52, 20, 90, 91])
    assert got == (7, None, [[0, 10, 2], [2, 50, 3], [5, 20, 1], [6, 90, 2]], 7)

def test_runs_read_through_resident_pages_between_their_slots_only():
    # Page 1 resident between slots 10 and 12: read through (slot 11). Page
    # 3 resident between slots 12 and 77: not read at all (another run).
    got = window([S, R, S, R, S, S], [10, 11, 12, -1, 77, 78])
    assert got == (5, [0, 1, 0, 1, 0, 0], [[0, 10, 3], [4, 77, 2]], 3)

def test_a_slot_read_through_being_written_splits_the_run():
    # Invariant 3: slot 11 (page 1's once, now another page's being written)
    # is not read: the run ends before it and the next begins after it.
    got = window([S, R, S, R, S, S], [10, -1, 12, -1, 77, 78], writing=(11,))
    assert got == (5, [0, 1, 0, 1, 0, 0], [[0, 10, 1], [2, 12, 1], [4, 77, 2]], 3)
    # The same on ordered slots (the old code ended the window there).
    got = window([S, R, S, S], [10, -1, 12, 13], writing=(11,))
    assert got == (3, [0, 1, 0, 0], [[0, 10, 1], [2, 12, 2]], 2)
    # Not being written: one plain read through it.
    assert window([S, R, S, S], [10, -1, 12, 13]) == (3, [0, 1, 0, 0], None, 2)

def test_the_budget_and_the_limit_cut_the_window():
    # Room for two more pages: the window ends at the third own page, the
    # resident page after it not included.
    assert window([S, S, R, S, S, S], [10, 40, 41, 42, 60, 61], room=2) == (3, [0, 0, 1, 0],
                                                                            [[0, 10, 1], [1, 40, 3]], 2)
    assert window([S, S, S, S], [10, 40, 41, 42], room=0) == (0, None, None, 0)
    assert window([S, S, S, S], [10, 40, 41, 42], limit=2) == (1, None, [[0, 10, 1], [1, 40, 1]], 1)

def test_an_own_slot_being_written_ends_the_window():
    # Never expected (a SWAPPED page's slot holds its copy), but no slot
    # being written is read: the window ends before it, nothing charged past.
    assert window([S, S, S, S], [10, 30, 31, 50], writing=(31,)) == (1, None, [[0, 10, 1], [1, 30, 1]], 1)
