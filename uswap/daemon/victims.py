"""Victim choice for reclaim: the least recently faulted resident pages.

The daemon sees a page's use only when it faults (first touch, swap-in, the
first write after write-protection), so the stamp is "last fault". Among the
candidates the oldest go first; with the store unable to take writes, only
clean pages (which need no I/O) are candidates.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from uswap.daemon import pagetable as pt


def choose_victims(regions: Iterable, want: int, tick: int, clean_only: bool = False) -> list[tuple[object, np.ndarray]]:
    """Up to `want` RESIDENT pages as [(region, sorted page numbers)]."""
    cands = []
    for region in regions:
        if region.closing:
            continue
        table = region.table
        mask = table.state == pt.RESIDENT
        if clean_only:
            mask &= (table.flags & pt.F_DIRTY) == 0
        idx = np.flatnonzero(mask)
        if len(idx):
            cands.append((region, idx))
    if not cands or want <= 0:
        return []
    total = sum(len(idx) for _, idx in cands)
    if want >= total:
        return cands
    # Age since last fault, modulo the 32-bit stamp wrap.
    ages = np.concatenate([(np.uint32(tick) - r.table.stamp[idx]).astype(np.uint32) for r, idx in cands])
    chosen = np.zeros(total, bool)
    chosen[np.argpartition(ages, total - want)[total - want:]] = True
    out = []
    pos = 0
    for region, idx in cands:
        sel = idx[chosen[pos:pos + len(idx)]]
        pos += len(idx)
        if len(sel):
            out.append((region, sel))
    return out
