"""Victim choice for reclaim: two lists, like the kernel's inactive/active LRU.

The daemon sees a page's use only when it faults (first touch, swap-in, the
first write after write-protection), so a page's stamp is its last fault.
Pages that refault soon after eviction come back ACTIVE (the engine measures
the refault distance, as Linux's workingset code does). Victims are the oldest
inactive pages; active pages are taken only when too few inactive ones are
left, and the oldest active pages are demoted whenever the active share
passes ACTIVE_SHARE, so a page that stopped being hot loses its protection.
With the store unable to take writes, only clean pages are candidates.

Pages in the client's mlocked ranges are never candidates: a page that is the
target of in-flight O_DIRECT, io_uring or RDMA I/O is pinned by the kernel,
and evicting it mid-transfer loses what the device writes after the copy was
taken (kernel swap skips pinned pages). Pins cannot be seen from userspace
(/proc/kpageflags has no pin bit; /proc/kpagecount is the map count), so the
rule is that such a buffer must be mlocked for the duration of the I/O, and
this is what the daemon can see and enforce (README "Known limits").
"""
from __future__ import annotations

from typing import Callable, Iterable

import numpy as np

from uswap.daemon import pagetable as pt

ACTIVE_SHARE = 0.75  # most of resident memory that active pages may hold


def _oldest(ages: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of the k largest ages."""
    mask = np.zeros(len(ages), bool)
    if k >= len(ages):
        mask[:] = True
    elif k > 0:
        mask[np.argpartition(ages, len(ages) - k)[len(ages) - k:]] = True
    return mask


def choose_victims(regions: Iterable, want: int, tick: int, clean_only: bool = False,
                   locked: dict | None = None) -> list[tuple[object, np.ndarray]]:
    """Up to `want` RESIDENT pages as [(region, sorted page numbers)];
    `locked` maps a region's id to the mask of its pages never to take."""
    cands = []
    for region in regions:
        if region.closing:
            continue
        table = region.table
        mask = table.state == pt.RESIDENT
        never = locked.get(region.id) if locked else None
        if never is not None:
            mask &= ~never
        idx = np.flatnonzero(mask)
        if len(idx):
            cands.append((region, idx))
    if not cands or want <= 0:
        return []
    idx_all = [idx for _, idx in cands]
    flags = np.concatenate([r.table.flags[idx] for r, idx in cands])
    # Age since last fault, modulo the 32-bit stamp wrap.
    ages = np.concatenate([(np.uint32(tick) - r.table.stamp[idx]).astype(np.uint32) for r, idx in cands])
    active = (flags & pt.F_ACTIVE) != 0
    # Demote the oldest active pages beyond their share.
    excess = int(np.count_nonzero(active)) - int(len(active) * ACTIVE_SHARE)
    if excess > 0:
        act_pos = np.flatnonzero(active)
        demote = act_pos[_oldest(ages[act_pos], excess)]
        active[demote] = False
        pos = 0
        for (region, idx) in cands:
            local = demote[(demote >= pos) & (demote < pos + len(idx))] - pos
            region.table.flags[idx[local]] &= ~np.uint8(pt.F_ACTIVE)
            pos += len(idx)
    eligible = np.ones(len(ages), bool)
    if clean_only:
        eligible &= (flags & pt.F_DIRTY) == 0
    inactive_pos = np.flatnonzero(eligible & ~active)
    chosen = np.zeros(len(ages), bool)
    chosen[inactive_pos[_oldest(ages[inactive_pos], want)]] = True
    short = want - int(np.count_nonzero(chosen))
    if short > 0:
        active_pos = np.flatnonzero(eligible & active)
        chosen[active_pos[_oldest(ages[active_pos], short)]] = True
    out = []
    pos = 0
    for (region, _), idx in zip(cands, idx_all):
        sel = idx[chosen[pos:pos + len(idx)]]
        pos += len(idx)
        if len(sel):
            out.append((region, sel))
    return out


class VictimQueue:
    """Victims chosen ahead, a batch at a time, so that one scan of the page
    tables serves several reclaim steps.

    Why: choose_victims looks at every resident page of every region; run
    once per 256-page reclaim step it was the engine's largest cost during
    sequential swap-in (py-spy: ~40% of the engine thread's busy time on a
    512 MiB stream under a 128 MiB budget). A batch is the `batch` oldest
    pages at the time of the scan; pages faulted in later are younger than
    all of them, so taking the batch in any order before scanning again
    keeps the policy's order up to the batch's granularity.

    A queued page is handed out only if, now, it is still RESIDENT and
    carries the stamp it was queued with (no fault since, so it was not used
    and did not change hands), is clean when only clean pages may go, and is
    not in a range the client has mlocked.

    Locked ranges: lock_key(region) is cheap and changes when the client's
    locked ranges do (its VmLck with the region's VMA boundaries, as an
    mlock or munlock of part of a VMA splits or merges it; 0: nothing
    locked) -- all but the one move README "Known limits" names;
    read_locked(region) reads the ranges themselves (a page mask, or None),
    which costs a walk of the client's mappings. They are read at each
    refill, and again before a region's queued pages are handed out if its
    key changed since: an mlock made while its pages sit in the queue is
    seen before any of them is taken.
    """

    def __init__(self, batch: int, lock_key: Callable[[object], object] | None = None,
                 read_locked: Callable[[object], np.ndarray | None] | None = None) -> None:
        self.batch = batch
        self.pending: list[tuple[object, np.ndarray, np.ndarray]] = []  # (region, pages, stamps)
        self.lock_key = lock_key
        self.read_locked = read_locked
        self.locked: dict[int, tuple[object, np.ndarray | None]] = {}  # region id -> (key, mask)

    def clear(self) -> None:
        self.pending = []

    def _read(self, region, key: object) -> np.ndarray | None:
        mask = self.read_locked(region) if key else None
        self.locked[region.id] = (key, mask)
        return mask

    def _refresh_locked(self, regions: list) -> dict:
        """Every live region's mlocked pages, read now (at a refill)."""
        self.locked = {}
        if self.lock_key is None:
            return {}
        return {r.id: self._read(r, self.lock_key(r)) for r in regions if not r.closing}

    def _locked_now(self, region) -> np.ndarray | None:
        if self.lock_key is None:
            return None
        key = self.lock_key(region)
        cached = self.locked.get(region.id)
        if cached is not None and cached[0] == key:
            return cached[1]
        return self._read(region, key)

    def take(self, regions: Iterable, want: int, tick: int, clean_only: bool = False) -> list[tuple[object, np.ndarray]]:
        """Up to `want` RESIDENT pages as [(region, sorted page numbers)]."""
        out: list[tuple[object, np.ndarray]] = []
        got = 0
        scanned = False
        while got < want:
            if not self.pending:
                if scanned or got:
                    # A scan now would see the pages taken so far as still
                    # resident and hand them out twice: the caller asks again.
                    break
                scanned = True
                regions = list(regions)
                locked = self._refresh_locked(regions)
                self.pending = [(region, pages, region.table.stamp[pages].copy())
                                for region, pages in choose_victims(regions, max(want - got, self.batch),
                                                                    tick, clean_only, locked)]
                continue
            region, pages, stamps = self.pending[0]
            if region.closing:
                self.pending.pop(0)
                continue
            n = min(len(pages), want - got)
            head, head_stamps = pages[:n], stamps[:n]
            if n == len(pages):
                self.pending.pop(0)
            else:
                self.pending[0] = (region, pages[n:], stamps[n:])
            table = region.table
            ok = (table.state[head] == pt.RESIDENT) & (table.stamp[head] == head_stamps)
            if clean_only:
                ok &= (table.flags[head] & pt.F_DIRTY) == 0
            never = self._locked_now(region)
            if never is not None:
                ok &= ~never[head]
            sel = head[ok]
            if len(sel):
                out.append((region, sel))
                got += len(sel)
        return out
