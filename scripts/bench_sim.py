"""Exact LRU and FIFO page-replacement simulators for scripts/bench.py.

They replay what the zipf-read child did to its memory: the fill (every page
written once, front to back), the warm-up pass traces[0], then the measured
passes traces[1:], with room for `capacity` pages, and count the faults
(misses) of each measured pass.
"""
from __future__ import annotations

from collections import OrderedDict, deque

import numpy as np


def _lru():
    resident: OrderedDict[int, None] = OrderedDict()

    def access(p: int, capacity: int) -> bool:
        if p in resident:
            resident.move_to_end(p)
            return False
        resident[p] = None
        if len(resident) > capacity:
            resident.popitem(last=False)
        return True
    return access


def _fifo():
    resident: set[int] = set()
    order: deque[int] = deque()

    def access(p: int, capacity: int) -> bool:
        if p in resident:
            return False
        resident.add(p)
        order.append(p)
        if len(order) > capacity:
            resident.discard(order.popleft())
        return True
    return access


def simulate(policy: str, npages: int, capacity: int, traces: list[np.ndarray]) -> list[int]:
    """Faults of each measured pass (traces[1:])."""
    access = {"lru": _lru, "fifo": _fifo}[policy]()
    for p in range(npages):          # the fill
        access(p, capacity)
    out = []
    for k, trace in enumerate(traces):
        faults = 0
        for p in trace.tolist():
            faults += access(p, capacity)
        if k:                        # traces[0] is the warm-up pass
            out.append(faults)
    return out
