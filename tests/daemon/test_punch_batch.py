"""Punch completions are applied together (punch.py Puncher.apply_done).

Issue 14 (mt-mix p99): a reclaim step evicts up to 256 scattered clean
pages, one punch job each, and the engine applied their completions one by
one under the page lock that the fast path's fault threads wait for (turns
of 3-7 ms). Now the completions of a turn are applied in one pass per
region: one state move for all of them, with the same result as applying
them one at a time -- states, slots, stamps, flags, counters and the wakes
of faults parked on them -- including a failed punch in the middle (it
closes the region; the punches after it take the closing path).
"""
from __future__ import annotations

import types

import numpy as np

from uswap.daemon import pagetable as pt
from uswap.daemon import punch as punch_mod
from uswap.daemon.punch import Puncher
from uswap.daemon.slots import SlotAllocator

NPAGES = 4096
# Punch jobs (by submission order) that return this error.
_FAIL: dict[int, OSError] = {}


class FakeIo:
    def __init__(self) -> None:
        self.jobs = []

    def submit(self, work, on_done) -> None:
        self.jobs.append(on_done)


class FakeRegions:
    def __init__(self) -> None:
        self.charged = 0
        self.tick = 1
        self.stats = {"swapouts": 0, "zero_drops": 0, "forgotten_pages": 0}
        self.closed = []
        self.released = 0

    def close_region(self, region, reason: str) -> None:
        region.closing = True
        self.closed.append(reason)

    def maybe_release(self, region) -> None:
        self.released += 1


def scenario(monkeypatch):
    """A region with scattered and adjacent clean pages punched in several
    reclaim steps (different eviction stamps), some discarded or with a
    parked fault, one forget's punch (evicted=False); returns the puncher
    and its fakes (the jobs' on_done callbacks are in puncher.io.jobs)."""
    wakes = []
    monkeypatch.setattr(punch_mod.uffd, "wake", lambda fd, start, length: wakes.append((start, length)) or 0)
    slots = SlotAllocator(2 * NPAGES)
    regions = FakeRegions()
    io = FakeIo()
    puncher = Puncher(regions, slots, io)
    rng = np.random.default_rng(7)
    table = pt.PageTable(NPAGES)
    region = types.SimpleNamespace(id=1, table=table, closing=False, memfd=-1, inflight=0, uffd=-1,
                                   addr=1 << 30, npages=NPAGES)
    pages = np.sort(rng.choice(NPAGES, 900, replace=False))
    pages = np.unique(np.concatenate([pages, np.arange(100, 140)]))   # a run of adjacent pages too
    table.move(pages, pt.RESIDENT)
    regions.charged = len(pages)
    with_slot = pages[rng.random(len(pages)) < 0.8]   # the rest are clean zero pages (no slot)
    slot, n = slots.alloc(len(with_slot))
    assert n == len(with_slot)
    table.slot[with_slot] = np.arange(slot, slot + n, dtype=np.int32)
    table.stamp[pages] = rng.integers(1, 1000, len(pages))
    table.flags[pages] = np.where(rng.random(len(pages)) < 0.3, pt.F_ACTIVE, 0)
    steps = np.array_split(pages, 4)
    for i, step in enumerate(steps):
        regions.tick += 500
        puncher.punch(region, step, evicted=i != 3)
    # Meanwhile: faults parked on some, the client unmapped others.
    punched = np.concatenate(steps)
    table.flags[punched[rng.random(len(punched)) < 0.1]] |= pt.F_WAITERS
    table.flags[punched[rng.random(len(punched)) < 0.05]] |= pt.F_DISCARD
    return puncher, regions, region, slots, wakes


def outcome(puncher, regions, region, slots, wakes) -> dict:
    t = region.table
    return {"state": t.state.copy(), "flags": t.flags.copy(), "slot": t.slot.copy(), "stamp": t.stamp.copy(),
            "charged": regions.charged, "punching": puncher.punching, "stats": dict(regions.stats),
            "jobs": dict(puncher.jobs), "inflight": region.inflight, "closed": list(regions.closed),
            "released": regions.released, "references": slots.references, "closing": region.closing,
            "woken": sorted(a + i * 4096 for a, n in wakes for i in range(n // 4096))}


def run(monkeypatch, batched: bool, counts: dict | None = None) -> dict:
    """The scenario's punches all return (those in _FAIL with that error);
    batched: applied by one apply_done, else each by _punch_done as it returns."""
    puncher, regions, region, slots, wakes = scenario(monkeypatch)
    for k, on_done in enumerate(puncher.io.jobs):
        on_done(None, _FAIL.get(k))
        if not batched:
            # One at a time by the per-punch function, as the engine applied them before.
            entry, = puncher.done
            puncher.done.clear()
            puncher._punch_done(*entry)
    if batched:
        moves = 0
        orig = pt.PageTable.move

        def counting(self, pages, to):
            nonlocal moves
            moves += 1
            return orig(self, pages, to)
        monkeypatch.setattr(pt.PageTable, "move", counting)
        puncher.apply_done()
        monkeypatch.setattr(pt.PageTable, "move", orig)
        if counts is not None:
            counts["moves"] = moves
    assert not puncher.done
    return outcome(puncher, regions, region, slots, wakes)



def same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], np.ndarray):
            assert np.array_equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def test_a_turn_of_punch_completions_is_one_state_move(monkeypatch):
    counts = {}
    together = run(monkeypatch, batched=True, counts=counts)
    one_by_one = run(monkeypatch, batched=False)
    same(together, one_by_one)
    # Over 900 punch jobs (scattered pages: one run each) applied with one move.
    assert counts["moves"] == 1
    assert together["punching"] == 0 and together["charged"] == 0 and not together["jobs"]
    assert together["stats"]["swapouts"] > 0 and together["stats"]["zero_drops"] > 0
    assert together["stats"]["forgotten_pages"] > 0 and together["woken"]
    st = together["state"]
    assert set(np.unique(st).tolist()) <= {pt.EMPTY, pt.SWAPPED}


def test_a_failed_punch_in_the_batch_closes_the_region_as_before(monkeypatch):
    _FAIL.clear()
    _FAIL[400] = OSError(5, "punch failed")
    try:
        together = run(monkeypatch, batched=True)
        one_by_one = run(monkeypatch, batched=False)
    finally:
        _FAIL.clear()
    same(together, one_by_one)
    assert together["closing"] and together["closed"] and together["released"] > 0
