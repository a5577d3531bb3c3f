"""Slot allocator over the store: which 4 KiB slots hold a page copy.

Slot 0 holds the store header and is never handed out. Allocation is
next-fit from a cursor, returning runs of adjacent free slots so pages
evicted together are written with one call and read back together.
"""
from __future__ import annotations

import numpy as np

RESERVED = 1  # slot 0: the store header


class SlotAllocator:
    def __init__(self, nslots: int) -> None:
        if nslots <= RESERVED:
            raise ValueError(f"store has {nslots} slots; it needs at least {RESERVED + 1}")
        self.nslots = nslots
        self.free_map = np.ones(nslots, bool)
        self.free_map[:RESERVED] = False
        self.used = 0
        self.cursor = RESERVED

    @property
    def capacity(self) -> int:
        return self.nslots - RESERVED

    def alloc(self, want: int) -> tuple[int, int] | None:
        """A run (first, count) of 1..want adjacent free slots, or None when full."""
        if self.used >= self.capacity:
            return None
        first = self._first_free(self.cursor)
        if first is None:
            first = self._first_free(RESERVED)
            if first is None:
                return None
        window = self.free_map[first:first + want]
        taken = np.flatnonzero(~window)
        count = int(taken[0]) if len(taken) else len(window)
        self.free_map[first:first + count] = False
        self.used += count
        self.cursor = first + count
        return first, count

    def _first_free(self, start: int) -> int | None:
        chunk = 1 << 16
        pos = start
        while pos < self.nslots:
            window = self.free_map[pos:pos + chunk]
            idx = int(np.argmax(window))
            if window[idx]:
                return pos + idx
            pos += chunk
        return None

    def free(self, first: int, count: int = 1) -> None:
        """Return slots. The caller guarantees no write to them is in flight (invariant 3)."""
        seg = self.free_map[first:first + count]
        if seg.any():
            raise AssertionError(f"double free of slots {first}..{first + count - 1}")
        seg[:] = True
        self.used -= count

    def free_many(self, slots: np.ndarray) -> None:
        slots = slots[slots >= 0]
        if len(slots) == 0:
            return
        if self.free_map[slots].any():
            raise AssertionError("double free of slots")
        self.free_map[slots] = True
        self.used -= len(slots)
