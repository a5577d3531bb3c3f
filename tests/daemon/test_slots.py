"""The slot allocator (uswap/daemon/slots.py): pages evicted together get
adjacent slots; slot 0, the store header, is never handed out."""
from __future__ import annotations

import numpy as np

from uswap.daemon.slots import SlotAllocator


def test_slots_are_adjacent_for_pages_evicted_together():
    s = SlotAllocator(1000)
    first, n = s.alloc(64)
    assert (first, n) == (1, 64)
    assert s.alloc(64) == (65, 64)
    s.free(1, 64)
    s.free(65, 64)
    assert s.used == 0
    # Fragmented: the next run stops at the first used slot.
    a = s.alloc(10)
    s.alloc(5)
    s.free(a[0], a[1])
    got = s.alloc(20)
    assert got[1] <= 20 and s.free_map[got[0]:got[0] + got[1]].sum() == 0
    np.testing.assert_equal(s.free_map[0], False)  # header slot never handed out
