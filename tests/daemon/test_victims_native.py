"""The victim choice in C (native/victims.h us_choose_victims, us_oldest)
against what the rules say, at their edges: the stamp wrap at 2^32, every
page active, clean_only with every page dirty, mlocked masks, more wanted
than there are candidates, several regions, closing regions, scratch too
small. Called the way the engine calls it (victims.choose_victims), plus a
randomized comparison with the rules written out as a sort."""
from __future__ import annotations

import types

import numpy as np
import pytest

from uswap._fastpath_cffi import ffi, lib
from uswap.daemon import pagetable as pt
from uswap.daemon.victims import ACTIVE_SHARE, _split_oldest, choose_victims


def region(npages: int, rid: int = 1, closing: bool = False) -> types.SimpleNamespace:
    r = types.SimpleNamespace(id=rid, table=pt.PageTable(npages), closing=closing)
    r.table.state[:] = pt.RESIDENT
    return r


def flat(got) -> list[tuple[int, int]]:
    return [(r.id, int(p)) for r, pages in got for p in pages]


def test_stamp_wrap_at_2_32_counts_the_age_modulo():
    """Stamps just before the wrap are older than those just after it, and
    a tick that wrapped past zero sees them so."""
    r = region(4)
    r.table.stamp[:] = [0xFFFFFFFE, 0xFFFFFFFF, 0, 1]
    assert flat(choose_victims([r], 2, tick=3)) == [(1, 0), (1, 1)]
    # Ages 1, 0, 2^32 - 1, 2^32 - 2 at tick 0xFFFFFFFF: the pages stamped
    # "after" it are a whole wrap old.
    assert flat(choose_victims([r], 2, tick=0xFFFFFFFF)) == [(1, 2), (1, 3)]
    # A tick past 2^32 is taken modulo 2^32, as the stamps are.
    assert flat(choose_victims([r], 2, tick=(1 << 32) + 3)) == [(1, 0), (1, 1)]


def test_all_active_demotes_the_oldest_and_takes_them():
    r = region(100)
    r.table.stamp[:] = np.arange(100)
    r.table.flags[:] = pt.F_ACTIVE
    got = flat(choose_victims([r], 10, tick=1000))
    assert got == [(1, p) for p in range(10)]
    keep = int(100 * ACTIVE_SHARE)
    assert list(np.flatnonzero(r.table.flags & pt.F_ACTIVE)) == list(range(100 - keep, 100))


def test_no_demotion_when_nothing_is_wanted():
    r = region(8)
    r.table.flags[:] = pt.F_ACTIVE
    assert choose_victims([r], 0, tick=10) == []
    assert (r.table.flags == pt.F_ACTIVE).all()


def test_clean_only_with_every_page_dirty_takes_none_but_still_demotes():
    r = region(16)
    r.table.stamp[:] = np.arange(16)
    r.table.flags[:] = pt.F_DIRTY | pt.F_ACTIVE
    assert choose_victims([r], 8, tick=100, clean_only=True) == []
    # The active share counts dirty pages too: the 4 oldest lost F_ACTIVE.
    assert list(np.flatnonzero((r.table.flags & pt.F_ACTIVE) == 0)) == [0, 1, 2, 3]
    assert (r.table.flags & pt.F_DIRTY).all()


def test_clean_only_skips_dirty_inactive_and_falls_back_to_clean_active():
    r = region(10)
    r.table.stamp[:] = np.arange(10)
    r.table.flags[:5] = pt.F_DIRTY           # the oldest inactive pages are dirty
    r.table.flags[8:] = pt.F_ACTIVE
    got = flat(choose_victims([r], 5, tick=100, clean_only=True))
    assert got == [(1, 5), (1, 6), (1, 7), (1, 8), (1, 9)]


def test_mlocked_masks_are_never_taken_nor_counted():
    r = region(8)
    r.table.stamp[:] = np.arange(8)
    never = np.zeros(8, bool)
    never[:4] = True
    got = flat(choose_victims([r], 8, tick=100, locked={1: never}))
    assert got == [(1, 4), (1, 5), (1, 6), (1, 7)]
    # Locked pages are no candidates, so not in the active share either:
    # 4 candidates, 3 active allowed, all 4 active: one (the oldest) demoted.
    r.table.flags[:] = pt.F_ACTIVE
    assert flat(choose_victims([r], 1, tick=100, locked={1: never})) == [(1, 4)]
    assert list(np.flatnonzero((r.table.flags & pt.F_ACTIVE) == 0)) == [4]


def test_want_larger_than_candidates_takes_every_candidate():
    r = region(20)
    r.table.state[::2] = pt.SWAPPED
    r.table.flags[1::4] = pt.F_ACTIVE
    got = flat(choose_victims([r], 1000, tick=5))
    assert got == [(1, p) for p in range(1, 20, 2)]


def test_several_regions_oldest_across_them_sorted_within_each():
    a, b, c = region(6, 1), region(6, 2), region(6, 3)
    a.table.stamp[:] = [10, 50, 20, 60, 30, 70]
    b.table.stamp[:] = [15, 55, 25, 65, 35, 75]
    c.table.stamp[:] = 5
    c.table.state[:] = pt.SWAPPED
    got = choose_victims([a, b, c], 5, tick=100)
    assert [(r.id, list(p)) for r, p in got] == [(1, [0, 2, 4]), (2, [0, 2])]


def test_closing_regions_are_skipped():
    a, b = region(4, 1, closing=True), region(4, 2)
    a.table.stamp[:] = 0                      # the oldest, but closing
    b.table.stamp[:] = 50
    a.table.flags[:] = pt.F_ACTIVE
    got = flat(choose_victims([a, b], 3, tick=100))
    assert got == [(2, 0), (2, 1), (2, 2)]
    assert (a.table.flags == pt.F_ACTIVE).all()  # nothing of it demoted


def test_equal_ages_go_to_the_page_met_first():
    a, b = region(4, 1), region(4, 2)
    a.table.stamp[:] = b.table.stamp[:] = 7
    assert flat(choose_victims([b, a], 3, tick=9)) == [(2, 0), (2, 1), (2, 2)]


def test_too_small_a_scratch_changes_nothing_and_says_how_much():
    r = region(64)
    r.table.stamp[:] = np.arange(64)
    r.table.flags[:] = pt.F_ACTIVE
    vr = ffi.new("struct us_vregion[]", 1)
    bufs = [ffi.from_buffer("uint8_t[]", r.table.state), ffi.from_buffer("uint8_t[]", r.table.flags),
            ffi.from_buffer("uint32_t[]", r.table.stamp)]
    vr[0].state, vr[0].flags, vr[0].stamp = bufs
    vr[0].never = ffi.NULL
    vr[0].npages = 64
    keys, cands, out = np.zeros(10, np.uint64), np.zeros(10, np.int64), np.zeros(8, np.int64)
    n = lib.us_choose_victims(vr, 1, 8, 100, 0, ffi.from_buffer("uint64_t[]", keys),
                              ffi.from_buffer("int64_t[]", cands), 10, ffi.from_buffer("int64_t[]", out))
    assert n == -64
    assert (r.table.flags == pt.F_ACTIVE).all()


def test_sparse_state_with_residents_between_runs_of_empty():
    """The pass skips eight EMPTY state bytes at a time: pages right before
    and after such runs, and in a tail shorter than eight, are still seen."""
    r = region(1003)
    r.table.state[:] = pt.EMPTY
    pages = [0, 7, 8, 15, 16, 500, 999, 1000, 1002]
    r.table.state[pages] = pt.RESIDENT
    assert flat(choose_victims([r], 100, tick=1)) == [(1, p) for p in pages]


def _expected(regions, want, tick, clean_only, locked):
    """The rules of choose_victims as a plain sort: (region id, page) of
    the victims, and each region's flags afterwards."""
    cands = []  # (age, order met, region, page, active, dirty)
    for region in regions:
        if region.closing:
            continue
        t = region.table
        never = locked.get(region.id)
        for p in np.flatnonzero(t.state == pt.RESIDENT):
            if never is not None and never[p]:
                continue
            cands.append([(tick - int(t.stamp[p])) % (1 << 32), len(cands), region, int(p),
                          bool(t.flags[p] & pt.F_ACTIVE), bool(t.flags[p] & pt.F_DIRTY)])
    flags = {r.id: r.table.flags.copy() for r in regions}
    if not cands or want <= 0:
        return [], flags
    oldest_first = lambda cs: sorted(cs, key=lambda c: (-c[0], c[1]))  # noqa: E731
    active = [c for c in cands if c[4]]
    excess = len(active) - len(cands) * 3 // 4
    for c in oldest_first(active)[:max(excess, 0)]:
        c[4] = False
        flags[c[2].id][c[3]] &= ~np.uint8(pt.F_ACTIVE)
    ok = [c for c in cands if not (clean_only and c[5])]
    chosen = oldest_first([c for c in ok if not c[4]])[:want]
    chosen += oldest_first([c for c in ok if c[4]])[:want - len(chosen)]
    return [(c[2].id, c[3]) for c in sorted(chosen, key=lambda c: c[1])], flags


def test_matches_the_rules_on_random_tables():
    rng = np.random.default_rng(14)
    for trial in range(300):
        regions = []
        locked = {}
        for rid in range(1, int(rng.integers(1, 4)) + 1):
            n = int(rng.integers(0, 60))
            r = region(n, rid, closing=bool(rng.random() < 0.15))
            r.table.state[:] = rng.choice([pt.EMPTY, pt.RESIDENT, pt.RESIDENT, pt.WRITEBACK, pt.SWAPPED], n)
            r.table.flags[:] = rng.choice([0, pt.F_DIRTY, pt.F_ACTIVE, pt.F_ACTIVE | pt.F_DIRTY], n)
            # Few distinct stamps (ties), some across the wrap.
            r.table.stamp[:] = (rng.integers(-8, 8, n) % (1 << 32)).astype(np.uint32)
            if rng.random() < 0.3:
                locked[rid] = rng.random(n) < 0.3
            regions.append(r)
        want = int(rng.integers(0, 50))
        tick = int(rng.integers(0, 6)) % (1 << 32)
        clean_only = bool(rng.random() < 0.3)
        expect, flags = _expected(regions, want, tick, clean_only, locked)
        got = flat(choose_victims(regions, want, tick, clean_only, locked))
        assert got == expect, (trial, got, expect)
        for r in regions:
            assert (r.table.flags == flags[r.id]).all(), trial


def test_split_oldest_takes_the_k_oldest_across_groups():
    a, b = region(8, 1), region(8, 2)
    a.table.stamp[:] = np.arange(8) * 2           # 0, 2, ... 14
    b.table.stamp[:] = np.arange(8) * 2 + 1       # 1, 3, ... 15
    a.table.stamp[7] = 0xFFFFFFFF                 # stamped before the wrap: oldest of all
    groups = [(a, np.arange(8)), (b, np.arange(8))]
    oldest, rest = _split_oldest(groups, 4, tick=20)
    assert [(r.id, list(p)) for r, p in oldest] == [(1, [0, 1, 7]), (2, [0])]
    assert [(r.id, list(p)) for r, p in rest] == [(1, [2, 3, 4, 5, 6]), (2, list(range(1, 8)))]


def test_known_keeps_probation_and_judged_pages_still_victims_once():
    """VictimQueue._known (us_known): the union of the pages on probation
    and the judged ones, each kept while RESIDENT or written ahead with its
    stamp unchanged and not mlocked; a page in both lists once."""
    from uswap.daemon.victims import VictimQueue
    r = region(16)
    r.table.stamp[:] = 7
    r.table.state[3] = pt.WRITEBACK                      # written ahead: still known
    r.table.state[4] = pt.WRITEBACK
    r.table.flags[4] = pt.F_EVICT                         # on its way out: forgotten
    r.table.state[5] = pt.SWAPPED                         # gone: forgotten
    r.table.stamp[6] = 8                                  # used since: forgotten
    r.table.flags[9] = pt.F_DIRTY                         # dirty: still known
    q = VictimQueue(batch=4)
    q.probation = {1: (np.array([1, 3, 4, 5, 6, 9, 12], np.int64), np.full(7, 7, np.uint32))}
    stamps = np.full(4, 7, np.uint32)
    stamps[1] = 6                                         # judged with an older stamp: that entry is stale
    q.judged = {1: (np.array([2, 9, 12, 14], np.int64), stamps)}
    never = np.zeros(16, bool)
    never[14] = True                                      # mlocked now: forgotten
    (pages, got_stamps), = q._known([r], {1: never}).values()
    assert list(pages) == [1, 2, 3, 9, 12]
    assert list(got_stamps) == [7] * 5
    # Only judged, and a stamp that matches only the second list's entry.
    q.probation = {1: (np.array([9], np.int64), np.array([6], np.uint32))}
    q.judged = {1: (np.array([9], np.int64), np.array([7], np.uint32))}
    (pages, got_stamps), = q._known([r], {}).values()
    assert list(pages) == [9] and list(got_stamps) == [7]
    q.judged = {}
    assert q._known([r], {}) == {}
    r.closing = True
    q.probation = {1: (np.array([1], np.int64), np.array([7], np.uint32))}
    assert q._known([r], {}) == {}


def test_untouched_and_usable_read_the_stamps_now():
    from uswap.daemon.victims import VictimQueue
    r = region(10)
    r.table.stamp[:] = 3
    r.table.stamp[4] = 9                                  # faulted since it was held
    held = (np.array([1, 4, 6, 8], np.int64), np.full(4, 3, np.uint32))
    mask = VictimQueue._untouched(held, r, np.array([0, 1, 4, 5, 6, 9], np.int64))
    assert list(mask) == [False, True, False, False, True, False]
    assert not VictimQueue._untouched(None, r, np.array([1], np.int64)).any()
    q = VictimQueue(batch=4)
    r.table.flags[6] = pt.F_DIRTY
    pages, stamps = np.array([1, 4, 6, 8], np.int64), np.full(4, 3, np.uint32)
    assert list(q._usable(r, pages, stamps, False, None)) == [True, False, True, True]
    assert list(q._usable(r, pages, stamps, True, None)) == [True, False, False, True]
    never = np.zeros(10, bool)
    never[8] = True
    assert list(q._usable(r, pages, stamps, False, never)) == [True, False, True, False]


def test_sorted_minus_and_merge():
    from uswap.daemon.victims import _merge, _minus
    a = np.array([1, 3, 5, 7, 9], np.int64)
    assert list(_minus(a, np.array([0, 3, 4, 9, 11], np.int64))) == [1, 5, 7]
    assert list(_minus(a, np.array([], np.int64))) == list(a)
    assert list(_minus(np.array([], np.int64), a)) == []
    assert list(_merge(a, np.array([0, 2, 10], np.int64))) == [0, 1, 2, 3, 5, 7, 9, 10]
    assert list(_merge(np.array([], np.int64), a)) == list(a)


def test_a_locked_mask_of_another_dtype_is_read_per_page():
    """C reads one byte per page of the mask: a mask of another dtype is
    converted first, and one of the wrong length is refused."""
    r = region(8)
    never = np.zeros(8, np.int64)
    never[1] = 1
    assert flat(choose_victims([r], 8, tick=1, locked={1: never})) == [(1, p) for p in range(8) if p != 1]
    with pytest.raises(ValueError):
        choose_victims([r], 8, tick=1, locked={1: np.zeros(7, bool)})
