"""Slot allocator over the store: which 4 KiB slots hold a page copy.

Slot 0 holds the store header and is never handed out. Allocation is
next-fit from a cursor, returning runs of adjacent free slots so pages
evicted together are written with one call and read back together.

Reference counts (like the kernel's swap_map count): a forked child's page
table shares the parent's slots, so a slot may be named by several page
table entries. `alloc` hands out a slot with one reference; `share` adds
one; `free` and `free_many` drop one each, and the slot returns to the
free map only when its last reference is dropped. A shared slot is never
written again: only slots with no reference are handed out by `alloc`, and
a slot is written only right after its allocation (invariant 3).
"""
from __future__ import annotations

import numpy as np

RESERVED = 1  # slot 0: the store header
MAX_REFS = np.iinfo(np.uint16).max


class SlotAllocator:
    def __init__(self, nslots: int) -> None:
        if nslots <= RESERVED:
            raise ValueError(f"store has {nslots} slots; it needs at least {RESERVED + 1}")
        self.nslots = nslots
        self.free_map = np.ones(nslots, bool)
        self.free_map[:RESERVED] = False
        # refs[s]: page table entries (and quarantine entries) naming slot s.
        # Invariant: free_map[s] == (refs[s] == 0) for every s >= RESERVED.
        self.refs = np.zeros(nslots, np.uint16)
        self.used = 0        # slots with at least one reference
        self.references = 0  # sum of refs: what the engine's audit recounts
        self.cursor = RESERVED
        # writing[s]: a store write to slot s is in flight (set and cleared by
        # writeback.py): a read-ahead window never reads through such a slot
        # (readahead.py _window; invariant 3: no read of a slot being written).
        self.writing = np.zeros(nslots, bool)

    @property
    def nbytes(self) -> int:
        """The per-slot maps' size: free_map, refs and writing."""
        return self.free_map.nbytes + self.refs.nbytes + self.writing.nbytes

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
        self.refs[first:first + count] = 1
        self.used += count
        self.references += count
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

    def share(self, slots: np.ndarray) -> None:
        """One more reference to each slot of `slots` (no duplicates; each in use)."""
        slots = slots[slots >= 0]
        if len(slots) == 0:
            return
        held = self.refs[slots]
        if (held == 0).any():
            raise AssertionError("sharing a free slot")
        if (held >= MAX_REFS).any():
            raise OverflowError(f"a slot is already shared by {MAX_REFS} page tables")
        self.refs[slots] = held + 1
        self.references += len(slots)

    def free(self, first: int, count: int = 1) -> None:
        """Drop one reference to each slot of a run. The caller guarantees no
        write to them is in flight (invariant 3)."""
        seg = self.refs[first:first + count]
        if (seg == 0).any():
            raise AssertionError(f"double free of slots {first}..{first + count - 1}")
        seg -= 1
        self.references -= count
        released = seg == 0
        self.free_map[first:first + count] |= released
        self.used -= int(np.count_nonzero(released))

    def free_many(self, slots: np.ndarray) -> None:
        """Drop one reference to each slot of `slots` (negative entries
        ignored). The slots come from one page table, which names a slot at
        most once: no duplicates (a sort to allow them cost 16 ms for 200k
        slots, on every region close)."""
        slots = slots[slots >= 0]
        if len(slots) == 0:
            return
        held = self.refs[slots]
        if (held == 0).any():
            raise AssertionError("double free of slots")
        left = held - 1
        self.refs[slots] = left
        released = slots[left == 0]
        self.free_map[released] = True
        self.used -= len(released)
        self.references -= len(slots)

    def free_slots(self, slots: list[int]) -> None:
        """Drop one reference per entry of `slots`, which may repeat (pages of
        forked children's tables sharing one slot). A few at a time (the
        fast path's dirtied pages, engine.py): scalar steps, as numpy's
        per-call cost was most of the time for one slot."""
        if len(slots) > 16 and len(set(slots)) == len(slots):
            self.free_many(np.asarray(slots, dtype=np.int64))
            return
        refs = self.refs
        for slot in slots:
            held = int(refs[slot])
            if held == 0:
                raise AssertionError(f"double free of slot {slot}")
            refs[slot] = held - 1
            self.references -= 1
            if held == 1:
                self.free_map[slot] = True
                self.used -= 1

    def claim(self, slots: np.ndarray) -> None:
        """Adoption (adoption.py): one reference to each slot a dead daemon's
        page table names (`slots`: one table's entries, negatives ignored; a
        slot named by several tables, as after a fork, is claimed once by
        each). Raises ValueError for a slot outside the store."""
        slots = slots[slots >= 0]
        if len(slots) == 0:
            return
        if int(slots.min()) < RESERVED or int(slots.max()) >= self.nslots:
            raise ValueError(f"a page table names slots {int(slots.min())}..{int(slots.max())}, outside"
                             f" the store's {RESERVED}..{self.nslots - 1}")
        was_free = self.refs[slots] == 0
        np.add.at(self.refs, slots, 1)
        self.free_map[slots] = False
        self.used += len(np.unique(slots[was_free]))
        self.references += len(slots)

    def claim_run(self, first: int, count: int) -> None:
        """Adoption: one reference to each slot of a run (first, count) --
        a quarantined run the previous daemon saved. Slice arithmetic: a run
        of millions of slots (claim_free's, saved) costs milliseconds, where
        claim's np.add.at over an array of them cost seconds. Raises
        ValueError for a run outside the store."""
        if count <= 0:
            return
        if first < RESERVED or first + count > self.nslots:
            raise ValueError(f"a quarantined run names slots {first}..{first + count - 1}, outside"
                             f" the store's {RESERVED}..{self.nslots - 1}")
        seg = self.refs[first:first + count]
        if (seg >= MAX_REFS).any():
            raise OverflowError(f"a slot is already named {MAX_REFS} times")
        self.used += int(np.count_nonzero(seg == 0))
        seg += 1
        self.free_map[first:first + count] = False
        self.references += count

    def claim_free(self) -> list[tuple[int, int]]:
        """Adoption when the dead daemon's quarantine file is behind
        (statedir.py quarantine_incomplete): every slot no table names must
        be held, for the quarantine to hold; returns the runs (first,
        count) claimed. One run over the whole store, one more reference to
        each slot: the slots tables name are held a little longer (their
        page's next write does not free them before the quarantine ends),
        but the quarantine is one entry and quarantine.json one line
        whatever the store's fragmentation (as one run per free gap, a
        64 GiB store with scattered free slots made 8 million entries:
        8 s here, 20 s of every settle's expiry loop, a 120 MB file). Only
        if some slot is at MAX_REFS, one run per free gap."""
        if not (self.refs[RESERVED:] >= MAX_REFS).any():
            self.claim_run(RESERVED, self.capacity)
            return [(RESERVED, self.capacity)]
        free = np.flatnonzero(self.free_map)
        if len(free) == 0:
            return []
        cuts = np.flatnonzero(np.diff(free) != 1) + 1
        firsts = free[np.concatenate(([0], cuts))]
        lasts = free[np.concatenate((cuts - 1, [len(free) - 1]))]
        runs = [(int(a), int(b) - int(a) + 1) for a, b in zip(firsts, lasts)]
        for first, count in runs:
            self.claim_run(first, count)
        return runs
