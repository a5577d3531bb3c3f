"""Review of the vectored stream windows: ReadAhead._window and
SwapIn._slot_runs on random hand-built page tables (as
test_readahead_window.py), checked against their contracts rather than
worked examples:

  - every SWAPPED page up to the window's last is the load's own, each
    read by exactly one run into its place, from its own slot;
  - no run reads a slot with a write in flight (invariant 3) for a page
    that is not the load's, and runs begin and end on own pages;
  - the pages charged are the own pages less the first (the caller's);
  - with room and no slot being written, the window ends at the last
    SWAPPED page of its range (it is not cut short);
  - _slot_runs splits indices into runs of consecutive pages in adjacent
    slots, each at most max_len, covering them exactly once."""
from __future__ import annotations

import random

import numpy as np

from tests.daemon.test_readahead_window import R, S, window
from uswap.daemon import pagetable as pt
from uswap.daemon.pagetable import PageTable
from uswap.daemon.swapin import SwapIn

L = pt.LOADING


def _table(rng: random.Random) -> tuple[list[int], list[int], tuple[int, ...], int]:
    n = rng.randint(1, 20)
    states = [S] + [rng.choice([S, S, R, L]) for _ in range(n - 1)]
    used: set[int] = set()
    slots = []
    cur = rng.randint(1, 200)
    for st in states:
        if st == R and rng.random() < 0.5:
            slots.append(-1)
            continue
        if rng.random() < 0.6 and cur + 1 < 250 and cur + 1 not in used:
            cur += 1
        else:
            while cur in used:
                cur = rng.randint(1, 249)
        used.add(cur)
        slots.append(cur)
    own_slots = {sl for st, sl in zip(states, slots) if st == S}
    writing = tuple(w for w in rng.sample(range(1, 256), rng.randint(0, 30)) if w not in own_slots)
    return states, slots, writing, rng.choice([0, 1, 2, 5, 1 << 20])


def test_window_contract_on_random_tables():
    rng = random.Random(20261202)
    for _ in range(4000):
        states, slots, writing, room = _table(rng)
        last, skip, runs, charged = window(states, slots, writing, room)
        m = last + 1
        own = [states[i] == S for i in range(m)]
        ctx = (states, slots, writing, room, last, skip, runs)
        assert (skip is None and all(own)) or (skip is not None and [not s for s in skip] == own), ctx
        assert charged == sum(own) - 1, ctx
        covered: dict[int, int] = {}
        for idx, sl, k in runs if runs is not None else [[0, slots[0], m]]:
            assert own[idx] and own[idx + k - 1], ctx
            for j in range(k):
                p = idx + j
                assert p < m and p not in covered, ctx
                covered[p] = sl + j
                if own[p]:
                    assert slots[p] == sl + j, ctx
                else:
                    assert sl + j not in writing, ctx
        assert all(p in covered for p in range(m) if own[p]), ctx
        if room == 1 << 20:
            assert m == max(i for i, st in enumerate(states) if st == S) + 1, ctx


def test_slot_runs_contract_on_random_tables():
    rng = random.Random(7)
    for _ in range(3000):
        n = rng.randint(1, 40)
        table = PageTable(n)
        table.slot[:] = rng.sample(range(1, 60), n) if rng.random() < 0.5 else \
            [s + rng.choice([0, 0, 0, 5]) for s in range(1, n + 1)]
        idx = np.array(sorted(rng.sample(range(n), rng.randint(0, n))), np.int64)
        max_len = rng.choice([1, 2, 3, n])
        got = SwapIn._slot_runs(table, 0, idx, max_len)
        seen = []
        for a, k in got:
            assert 1 <= k <= max_len
            for j in range(k):
                seen.append(a + j)
                assert table.slot[a + j] == table.slot[a] + j
        assert seen == idx.tolist(), (idx, table.slot, got)
