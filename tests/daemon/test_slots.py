"""The slot allocator (uswap/daemon/slots.py): pages evicted together get
adjacent slots; slot 0, the store header, is never handed out."""
from __future__ import annotations

import numpy as np
import pytest

from uswap.daemon.slots import MAX_REFS, SlotAllocator


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
    assert got[1] <= 20 and s.counts(slice(got[0], got[0] + got[1])).tolist() == [1] * got[1]
    assert got[0] >= 1  # header slot never handed out


# ------------------------------------------- one byte per slot (issue 14)

def test_the_slot_map_is_one_byte_per_slot():
    # The scale row's metadata goal (<= 16 B per touched page) leaves the
    # allocator 1 B per slot beside the page table's 14: no free map beside
    # the counts, counts in a byte, no per-slot map of writes in flight.
    s = SlotAllocator(1 << 16)
    assert s.nbytes == 1 << 16
    s.start_write(*s.alloc(64))
    assert s.nbytes == 1 << 16


def _model_check(s: SlotAllocator, model: dict[int, int]) -> None:
    want = np.zeros(s.nslots, np.int64)
    for slot, n in model.items():
        want[slot] = n
    np.testing.assert_array_equal(s.counts(slice(0, s.nslots)), want)
    assert s.used == np.count_nonzero(want) and s.references == want.sum()


def test_counts_past_254_spill_and_come_back():
    s = SlotAllocator(64)
    first, n = s.alloc(4)
    assert (first, n) == (1, 4)
    model = {1: 1, 2: 1, 3: 1, 4: 1}
    # Slot 2 shared by 300 tables, slot 3 by 255: past a byte.
    for i in range(299):
        s.share(np.array([2] + ([3] if i < 254 else []), np.int64))
        model[2] += 1
        model[3] += i < 254
    assert (model[2], model[3]) == (300, 255)
    _model_check(s, model)
    # Dropped back one at a time, by each way of freeing.
    for i in range(299):
        both = model[3] > 1
        if i % 3 == 0:
            s.free(2, 2 if both else 1)
        elif i % 3 == 1:
            s.free_many(np.array([2, 3] if both else [2], np.int64))
        else:
            s.free_slots([2, 3] if both else [2])
        model[2] -= 1
        model[3] -= both
        _model_check(s, model)
    assert not s.spilled
    assert s.counts([2, 3]).tolist() == [1, 1]
    # The last reference frees the slot: handed out again.
    s.free(2)
    s.cursor = 1
    assert s.alloc(8) == (2, 1)


def test_a_run_holding_a_spilled_count_costs_its_own_slots_not_the_stores():
    # free / claim_run go through counts and _set with a slice; a spilled
    # count there once built np.arange(nslots) (int64: 8 bytes per store
    # slot, 128 MiB for a 64 GiB store) to find one run's slot numbers.
    # numpy reports its buffers to tracemalloc.
    import tracemalloc
    nslots = 1 << 22  # 16 GiB of store: the arange was 32 MiB
    s = SlotAllocator(nslots)
    first, n = s.alloc(8)
    spilled = first + 3
    for _ in range(300):
        s.share(np.array([spilled], np.int64))
    assert s.spilled == {spilled: 301}
    tracemalloc.start()
    try:
        assert s.counts(slice(first, first + n)).tolist() == [1, 1, 1, 301, 1, 1, 1, 1]
        s.free(first, n)  # counts and _set over the run
        s.claim_run(first, n)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert s.spilled == {spilled: 301} and s.counts([first, spilled]).tolist() == [1, 301]
    assert peak < 64 << 10, f"{peak} bytes to handle a run of {n} slots"
    # Slices with a step or negative bounds name the same slots as on an array.
    s.share(np.array([first + 5], np.int64))
    assert s.counts(slice(first + 5, first - 1, -2)).tolist() == [2, 301, 1]
    assert s.counts(slice(-nslots + first, first + 8, 3)).tolist() == [1, 301, 1]


def test_shares_past_max_refs_are_refused_and_change_nothing():
    s = SlotAllocator(64)
    for _ in range(MAX_REFS - 1):  # MAX_REFS - 1 tables naming 7 (forks of forks)
        s.claim(np.array([-1, 7], np.int64))
    s.share(np.array([7], np.int64))
    assert s.counts([7]).tolist() == [MAX_REFS]
    with pytest.raises(OverflowError):
        s.share(np.array([7], np.int64))
    with pytest.raises(OverflowError):
        s.claim_run(5, 4)
    with pytest.raises(OverflowError):
        s.claim(np.array([7], np.int64))
    assert s.counts([7]).tolist() == [MAX_REFS] and (s.used, s.references) == (1, MAX_REFS)
    # claim_free cannot add one to slot 7: one run per free gap instead.
    assert s.claim_free() == [(1, 6), (8, 56)]
    assert s.alloc(1) is None


def test_a_table_naming_a_slot_at_two_pages_is_refused_whole():
    # One table names a slot once (a fork's share is another table's): a
    # repeat is damage. Claiming each repeat while free_many drops one
    # reference per slot leaked the slot when the table was freed.
    s = SlotAllocator(64)
    table = np.array([-1, 5, 9, 5, 12, 9, 9], np.int64)
    with pytest.raises(ValueError, match=r"names 2 slots at more than one page: slot 5 at pages 1, 3;"
                                         r" slot 9 at pages 2, 5, 6"):
        s.claim(table)
    assert (s.used, s.references, s.counts(slice(0, 64)).any()) == (0, 0, False)
    # Two tables naming one slot each once: claimed once by each.
    s.claim(np.array([-1, 5, 9], np.int64))
    s.claim(np.array([5, -1, 12], np.int64))
    assert s.counts([5, 9, 12]).tolist() == [2, 1, 1] and (s.used, s.references) == (3, 4)
    s.free_many(np.array([-1, 5, 9], np.int64))
    s.free_many(np.array([5, -1, 12], np.int64))
    assert (s.used, s.references) == (0, 0)


def test_alloc_is_next_fit_in_runs_of_free_slots():
    s = SlotAllocator(100)
    assert s.alloc(30) == (1, 30)
    assert s.alloc(30) == (31, 30)
    s.free(10, 5)
    s.share(np.array([20], np.int64))
    s.free(20)  # shared: still held
    assert s.alloc(80) == (61, 39)  # next fit: on from the cursor, up to the end
    assert s.alloc(80) == (10, 5)   # wrapped: the first gap, up to the next used slot
    assert s.alloc(1) is None and s.used == s.capacity
    s.free_many(np.array([3, 50, -1, 99], np.int64))
    got = [s.alloc(8) for _ in range(4)]
    assert sorted(got[:3]) == [(3, 1), (50, 1), (99, 1)] and got[3] is None
    with pytest.raises(AssertionError):
        s.free(0)  # the header is never held: freeing it is a double free
    with pytest.raises(AssertionError):
        s.free_many(np.array([20, 21], np.int64)) or s.free(20)


def test_random_operations_match_a_model():
    rng = np.random.default_rng(14)
    s = SlotAllocator(700)
    model: dict[int, int] = {}
    for _ in range(1500):
        op = rng.integers(0, 4)
        held = [k for k, v in model.items() if v]
        if op == 0:
            got = s.alloc(int(rng.integers(1, 40)))
            if got is None:
                assert len(held) == s.capacity
                continue
            for slot in range(got[0], got[0] + got[1]):
                assert model.get(slot, 0) == 0, "handed out a held slot"
                model[slot] = 1
        elif op == 1 and held:
            pick = rng.choice(held, min(len(held), 5), replace=False)
            for _ in range(int(rng.integers(1, 300))):
                s.share(pick)
            for slot in pick.tolist():
                model[slot] = s.counts([slot])[0]
        elif op in (2, 3) and held:
            pick = rng.choice(held, min(len(held), int(rng.integers(1, 60))), replace=False)
            s.free_many(pick) if op == 2 else s.free_slots(pick.tolist())
            for slot in pick.tolist():
                model[slot] -= 1
        _model_check(s, {k: v for k, v in model.items() if v})


def test_writing_at_is_exact_for_writes_in_flight():
    s = SlotAllocator(1 << 12)
    probe = np.arange(-3, (1 << 12) + 3)
    assert not s.writing_at(probe).any()
    runs = [(5, 1), (6, 10), (100, 64), (4094, 2)]
    for first, n in runs:
        s.start_write(first, n)
    want = np.zeros(len(probe), bool)
    for first, n in runs:
        want[(probe >= first) & (probe < first + n)] = True
    np.testing.assert_array_equal(s.writing_at(probe), want)
    s.end_write(6, 10)
    want[(probe >= 6) & (probe < 16)] = False
    np.testing.assert_array_equal(s.writing_at(probe), want)
    np.testing.assert_array_equal(s.writing_at(probe.reshape(-1, 2)), want.reshape(-1, 2))
    with pytest.raises(AssertionError):
        s.end_write(100, 63)  # not the run started
    for first, n in runs:
        if first != 6:
            s.end_write(first, n)
    assert not s.writing_at(probe).any() and not s.inflight
