"""Slot allocator over the store: which 4 KiB slots hold a page copy.

Slot 0 holds the store header and is never handed out. Allocation is
next-fit from a cursor, returning runs of adjacent free slots so pages
evicted together are written with one call and read back together.

Reference counts (like the kernel's swap_map count): a forked child's page
table shares the parent's slots, so a slot may be named by several page
table entries. `alloc` hands out a slot with one reference; `share` adds
one; `free` and `free_many` drop one each, and the slot is free again only
when its last reference is dropped. A shared slot is never written again:
only slots with no reference are handed out by `alloc`, and a slot is
written only right after its allocation (invariant 3).

Memory: one byte per slot (the issue 14 scale row: metadata per touched
page). `refs[s]` is slot s's count up to 254; the value SPILLED (255) says
the count is in the dict `spilled` (a slot shared by 255 or more tables:
forks of forks; rare, so the dict stays small). A slot is free exactly
when `refs[s] == 0`: there is no separate free map to keep in step. The
writes in flight (set and cleared by writeback.py) are kept as runs
{first: count}, as many as writes in flight (max_inflight_writes), not
a map per slot: `writing_at` answers read-ahead's question "is a write to
this slot in flight" (invariant 3) from them, exactly.
"""
from __future__ import annotations

import numpy as np

RESERVED = 1  # slot 0: the store header
MAX_REFS = np.iinfo(np.uint16).max  # references one slot may have (share / claim_run refuse more)
SPILLED = np.iinfo(np.uint8).max    # refs[s] == SPILLED: the count is spilled[s] (>= SPILLED)


class SlotAllocator:
    def __init__(self, nslots: int) -> None:
        if nslots <= RESERVED:
            raise ValueError(f"store has {nslots} slots; it needs at least {RESERVED + 1}")
        self.nslots = nslots
        # refs[s]: page table entries (and quarantine entries) naming slot s,
        # up to SPILLED - 1; SPILLED: the count is in spilled[s]. Slot 0
        # stays at 0 (freeing it is a double free) and is never handed out:
        # searches start at RESERVED. np.zeros: pages of it are touched as
        # slots are used.
        self.refs = np.zeros(nslots, np.uint8)
        self.spilled: dict[int, int] = {}
        self.used = 0        # slots with at least one reference
        self.references = 0  # sum of refs: what the engine's audit recounts
        self.cursor = RESERVED
        # Store writes in flight: first slot -> slot count (start_write,
        # end_write); the runs never overlap (a slot is written only right
        # after its allocation).
        self.inflight: dict[int, int] = {}
        self._bounds: tuple[np.ndarray, np.ndarray] | None = None  # inflight's runs sorted: (firsts, ends)

    @property
    def nbytes(self) -> int:
        """The per-slot map's size: refs, one byte per slot (the spilled
        counts and the writes in flight are dicts sized by shares past 254
        and by writes in flight, not by the store)."""
        return self.refs.nbytes

    @property
    def capacity(self) -> int:
        return self.nslots - RESERVED

    # ------------------------------------------------------------ counts

    def counts(self, slots) -> np.ndarray:
        """The reference counts (int64) of `slots`: a slice or an index array."""
        held = self.refs[slots].astype(np.int64)
        if self.spilled:
            at = np.flatnonzero(held == SPILLED)
            if len(at):
                idx = self._index(slots)
                held[at] = [self.spilled[int(s)] for s in idx[at]]
        return held

    def _index(self, slots) -> np.ndarray:
        """The slot numbers `slots` (a slice or an index array) names. A
        slice's own range only: np.arange(nslots)[slots] built an int64 array
        of the whole store (128 MiB for a 64 GiB one) to free one run holding
        a spilled count."""
        if isinstance(slots, slice):
            return np.arange(*slots.indices(self.nslots))
        return np.asarray(slots)

    def _set(self, slots, held: np.ndarray, new: np.ndarray) -> None:
        """Set the counts of `slots` (their counts now `held`) to `new`,
        spilling counts past 254 to the dict and taking back those that
        fall under it."""
        self.refs[slots] = np.minimum(new, SPILLED)
        moved = np.flatnonzero((held >= SPILLED) | (new >= SPILLED))
        if len(moved):
            idx = self._index(slots)
            for s, n in zip(idx[moved].tolist(), new[moved].tolist()):
                if n >= SPILLED:
                    self.spilled[s] = n
                else:
                    del self.spilled[s]

    # ------------------------------------------------------ alloc / free

    def alloc(self, want: int) -> tuple[int, int] | None:
        """A run (first, count) of 1..want adjacent free slots, or None when full."""
        if self.used >= self.capacity:
            return None
        first = self._first_free(self.cursor)
        if first is None:
            first = self._first_free(RESERVED)
            if first is None:
                return None
        window = self.refs[first:first + want]
        taken = np.flatnonzero(window)
        count = int(taken[0]) if len(taken) else len(window)
        window[:count] = 1
        self.used += count
        self.references += count
        self.cursor = first + count
        return first, count

    def _first_free(self, start: int) -> int | None:
        """The first slot at or after `start` with no reference. A small
        window first (next-fit: the cursor is usually at free slots), then
        chunks of 64 Ki slots."""
        pos, chunk = start, 1 << 10
        while pos < self.nslots:
            window = self.refs[pos:pos + chunk]
            idx = int(np.argmin(window))
            if window[idx] == 0:
                return pos + idx
            pos += chunk
            chunk = 1 << 16
        return None

    def share(self, slots: np.ndarray) -> None:
        """One more reference to each slot of `slots` (no duplicates; each in use)."""
        slots = slots[slots >= 0]
        if len(slots) == 0:
            return
        held = self.refs[slots]
        if not held.all():
            raise AssertionError("sharing a free slot")
        if held.max() < SPILLED - 1:  # every count stays in its byte
            self.refs[slots] = held + 1
            self.references += len(slots)
            return
        held = self.counts(slots)
        if (held >= MAX_REFS).any():
            raise OverflowError(f"a slot is already shared by {MAX_REFS} page tables")
        self._set(slots, held, held + 1)
        self.references += len(slots)

    def free(self, first: int, count: int = 1) -> None:
        """Drop one reference to each slot of a run. The caller guarantees no
        write to them is in flight (invariant 3)."""
        seg = self.refs[first:first + count]
        if not seg.all():
            raise AssertionError(f"double free of slots {first}..{first + count - 1}")
        self.references -= count
        if seg.max() < SPILLED:  # no spilled count among them
            seg -= 1
            self.used -= count - int(np.count_nonzero(seg))
            return
        held = self.counts(slice(first, first + count))
        self._set(slice(first, first + count), held, held - 1)
        self.used -= int(np.count_nonzero(held == 1))

    def free_many(self, slots: np.ndarray) -> None:
        """Drop one reference to each slot of `slots` (negative entries
        ignored). The slots come from one page table, which names a slot at
        most once: no duplicates (a sort to allow them cost 16 ms for 200k
        slots, on every region close)."""
        slots = slots[slots >= 0]
        if len(slots) == 0:
            return
        held = self.refs[slots]
        if not held.all():
            raise AssertionError("double free of slots")
        self.references -= len(slots)
        if held.max() < SPILLED:  # no spilled count among them
            self.refs[slots] = held - 1
            self.used -= int(np.count_nonzero(held == 1))
            return
        held = self.counts(slots)
        self._set(slots, held, held - 1)
        self.used -= int(np.count_nonzero(held == 1))

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
            if held == SPILLED:
                left = self.spilled[slot] - 1
                if left < SPILLED:
                    del self.spilled[slot]
                    refs[slot] = left
                else:
                    self.spilled[slot] = left
            else:
                refs[slot] = held - 1
            self.references -= 1
            if held == 1:
                self.used -= 1

    # ---------------------------------------------------------- adoption

    def claim(self, slots: np.ndarray) -> None:
        """Adoption (adoption.py): one reference to each slot a dead daemon's
        page table names (`slots`: one table's entries, indexed by page,
        negatives ignored; a slot named by several tables, as after a fork,
        is claimed once by each). Nothing is claimed when it raises:
        ValueError for a slot outside the store, or for a slot the table
        names at more than one page (damage: a table names a slot once, as
        every free path assumes -- free_many drops one reference per slot
        however often it is given; claiming each repeat leaked the slot
        when the table was freed); OverflowError for one that would pass
        MAX_REFS."""
        pages = np.flatnonzero(slots >= 0)
        if len(pages) == 0:
            return
        named = slots[pages]
        if int(named.min()) < RESERVED or int(named.max()) >= self.nslots:
            raise ValueError(f"a page table names slots {int(named.min())}..{int(named.max())}, outside"
                             f" the store's {RESERVED}..{self.nslots - 1}")
        unique, times = np.unique(named, return_counts=True)
        if len(unique) < len(named):
            raise ValueError(f"a page table names {int(np.count_nonzero(times > 1))} slots at more than one"
                             f" page: {repeated_slots(slots, unique[times > 1])}")
        held = self.counts(unique)
        if (held + 1 > MAX_REFS).any():
            raise OverflowError(f"a slot would be named more than {MAX_REFS} times")
        self._set(unique, held, held + 1)
        self.used += int(np.count_nonzero(held == 0))
        self.references += len(unique)

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
        seg = slice(first, first + count)
        held = self.counts(seg)
        if (held >= MAX_REFS).any():
            raise OverflowError(f"a slot is already named {MAX_REFS} times")
        self.used += int(np.count_nonzero(held == 0))
        self._set(seg, held, held + 1)
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
        if not any(n >= MAX_REFS for n in self.spilled.values()):
            self.claim_run(RESERVED, self.capacity)
            return [(RESERVED, self.capacity)]
        free = np.flatnonzero(self.refs[RESERVED:] == 0) + RESERVED
        if len(free) == 0:
            return []
        cuts = np.flatnonzero(np.diff(free) != 1) + 1
        firsts = free[np.concatenate(([0], cuts))]
        lasts = free[np.concatenate((cuts - 1, [len(free) - 1]))]
        runs = [(int(a), int(b) - int(a) + 1) for a, b in zip(firsts, lasts)]
        for first, count in runs:
            self.claim_run(first, count)
        return runs

    # ---------------------------------------------------- writes in flight

    def start_write(self, first: int, count: int) -> None:
        """A store write to slots first..first+count-1 is queued (writeback.py)."""
        self.inflight[first] = count
        self._bounds = None

    def end_write(self, first: int, count: int) -> None:
        """That write returned, whatever its outcome."""
        if self.inflight.get(first) != count:
            raise AssertionError(f"no write of slots {first}..{first + count - 1} in flight")
        del self.inflight[first]
        self._bounds = None

    def write_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """The store writes in flight as two int64 arrays, (firsts, ends):
        runs [first, end) of slots, sorted and disjoint (native/window.h
        reads them; writing_at answers from them too)."""
        if self._bounds is None:
            firsts = np.fromiter(sorted(self.inflight), np.int64, len(self.inflight))
            self._bounds = firsts, firsts + np.array([self.inflight[f] for f in firsts.tolist()], np.int64)
        return self._bounds

    def writing_at(self, slots: np.ndarray) -> np.ndarray:
        """Per entry of `slots` (any integers; those outside the store are
        never written): whether a store write to that slot is in flight
        (readahead.py _window; invariant 3: no read of a slot being written)."""
        slots = np.asarray(slots)
        if not self.inflight:
            return np.zeros(slots.shape, bool)
        firsts, ends = self.write_bounds()
        at = np.searchsorted(firsts, slots, side="right") - 1
        return (at >= 0) & (slots < ends[np.maximum(at, 0)])


def repeated_slots(slots: np.ndarray, repeated: np.ndarray, most: int = 4) -> str:
    """For a log line: each of the first `most` slots of `repeated` and the
    pages of `slots` (a table's slot array, indexed by page) naming it."""
    parts = [f"slot {int(s)} at pages {', '.join(map(str, np.flatnonzero(slots == s)[:8].tolist()))}"
             for s in repeated[:most].tolist()]
    more = f" (and {len(repeated) - most} more)" if len(repeated) > most else ""
    return "; ".join(parts) + more
