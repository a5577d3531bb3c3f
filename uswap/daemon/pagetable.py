"""Compact per-page state: five numpy arrays, 14 bytes per managed page.

No Python object exists per page (docs/design.md §4). The kernel keeps one byte per
swap slot; we keep state, flags, slot number, a use stamp for victim choice
and the checksum of the slot copy (CRC32C, native/pagesum.h: 4 bytes, every
value valid; only pages with a slot are ever checked). The stamp is the tick of the page's last
fault while it is in memory, and of its eviction once it is out.
"""
from __future__ import annotations

import ctypes
import logging
import os

import numpy as np

from uswap import native
from uswap._fastpath_cffi import ffi, lib

log = logging.getLogger("uswap.pagetable")

# States, flags and NO_SLOT are declared once, in native/pagestate.h (docs/design.md
# §4 says what each means); these names are that header's values.
EMPTY = lib.US_EMPTY          # never populated (or dropped as a zero page): reads as zeros
RESIDENT = lib.US_RESIDENT    # in memory; clean (write-protected, slot copy current) or dirty
WRITEBACK = lib.US_WRITEBACK  # resident, write-protected, a store write of it in flight
SWAPPED = lib.US_SWAPPED      # only on the store, in `slot`
LOADING = lib.US_LOADING      # a swap-in read (or a fast-path zero fill) in flight
POISONED = lib.US_POISONED    # swap-in gave up (read_failure: sigbus); the client gets SIGBUS
AT_PARENT = lib.US_AT_PARENT  # a forked child's page held by its parent region (daemon/cow.py)
PUNCHING = lib.US_PUNCHING    # clean, being punched out of the memfd (Puncher.punch, punch.py)

# Indexed by state value: "EMPTY", "RESIDENT", ...
STATE_NAMES = [name[len("US_"):] for _, name in sorted(ffi.typeof("enum us_state").elements.items())]

F_DIRTY = lib.US_F_DIRTY      # resident and writable: the slot copy, if any, is stale
F_WAITERS = lib.US_F_WAITERS  # a write parked until its writeback ends (PUNCHING: any fault)
F_EVICT = lib.US_F_EVICT      # drop the page once its writeback succeeds
F_ACTIVE = lib.US_F_ACTIVE    # refaulted soon after eviction: working set
F_DISCARD = lib.US_F_DISCARD  # unmapped by the client during its I/O: forget it when the I/O ends

NO_SLOT = lib.US_NO_SLOT

# LEGAL[from, to]: pagestate.h's table of legal transitions, read from the
# compiled header (us_legal_from), not retyped. Every byte value has a row and
# a column, so that a corrupt state or target indexes the table (and is
# illegal) instead of raising. ILLEGAL_FROM[to] and LEGAL_FROM[to] (a bitmask
# of predecessors) are the same table arranged for move's two quick paths.
LEGAL_FROM = [lib.us_legal_from(to) for to in range(256)]
LEGAL = np.array([[(LEGAL_FROM[to] >> frm) & 1 for to in range(256)] for frm in range(256)], dtype=bool)
ILLEGAL_FROM = np.ascontiguousarray(~LEGAL.T)
# ILLEGAL_BYTES[to]: a bytes.translate table mapping each state byte to 1
# when it may not precede `to`, else 0: a run of pages' states checked in one
# C pass over their bytes (numpy's fancy indexing of a few pages by uint8
# costs several microseconds, a large part of a swap-in's engine time).
ILLEGAL_BYTES = [bytes(ILLEGAL_FROM[to].astype(np.uint8)) for to in range(256)]


class IllegalTransition(AssertionError):
    """A page was moved from a state pagestate.h does not allow before the
    new one: a bug in the daemon (raised only in strict mode)."""


class TransitionCheck:
    """What an illegal transition does: it is counted (`illegal`, in the
    daemon's status), logged with region, pages, from and to, and raised as
    IllegalTransition when `strict` (USWAP_STRICT_TRANSITIONS=1: the tests
    run every daemon so). The move is made all the same when not strict, so
    behaviour never depends on the check."""

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.illegal = 0

    def report(self, table: PageTable, pages: np.ndarray, old: np.ndarray, to: np.ndarray) -> None:
        self.illegal += len(pages)
        moves = ", ".join(f"page {p}: {_name(f)} -> {_name(t)}"
                          for p, f, t in zip(pages[:8].tolist(), old[:8].tolist(), to[:8].tolist()))
        more = f" (and {len(pages) - 8} more)" if len(pages) > 8 else ""
        msg = f"illegal page transition: region {table.region_id}: {moves}{more} (native/pagestate.h)"
        log.error("%s", msg)
        if self.strict:
            raise IllegalTransition(msg)


def _name(state: int) -> str:
    return STATE_NAMES[state] if state < len(STATE_NAMES) else f"<{state}>"


# The daemon's check: one per process, as there is one engine per process.
CHECK = TransitionCheck(strict=os.environ.get("USWAP_STRICT_TRANSITIONS") == "1")


class _Mapping:
    """A MAP_SHARED mapping of a file, kept with no fd open: np.memmap keeps
    one per mapping, and a table per region made the daemon run out of fds
    (a region already takes two: its uffd and memfd). Unmapped when the last
    array over it is gone."""

    def __init__(self, path: str, size: int) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            self.addr = native.mmap_shared(fd, size)
        finally:
            os.close(fd)
        self.size = size

    def __del__(self) -> None:
        native.munmap(self.addr, self.size)


def _shared_bytes(path: str, size: int) -> np.ndarray:
    """The `size` bytes of the file at `path` as a uint8 array, mapped shared.
    The array's base is the ctypes buffer, which holds the mapping: views of
    it keep it mapped, as np.memmap's do."""
    mapping = _Mapping(path, size)
    buf = (ctypes.c_uint8 * size).from_address(mapping.addr)
    buf._mapping = mapping
    return np.frombuffer(buf, dtype=np.uint8)


class PageTable:
    """State of every page of one region."""

    def __init__(self, npages: int, check: TransitionCheck | None = None) -> None:
        self.npages = npages
        self.region_id = -1  # for the log line of an illegal transition; set by the engine
        self.check = CHECK if check is None else check
        self.state = np.zeros(npages, np.uint8)
        self.flags = np.zeros(npages, np.uint8)
        self.slot = np.full(npages, NO_SLOT, np.int32)
        self.stamp = np.zeros(npages, np.uint32)
        self.sum = np.zeros(npages, np.uint32)
        self.path: str | None = None  # the state file the arrays live in (persist()), if any

    # The arrays, in the order a state file lays them out (persist(), load()).
    ARRAYS = (("state", np.uint8), ("flags", np.uint8), ("slot", np.int32), ("stamp", np.uint32),
              ("sum", np.uint32))
    # What one page of a region costs in the table: the sum of ARRAYS' item sizes.
    BYTES_PER_PAGE = sum(np.dtype(dtype).itemsize for _, dtype in ARRAYS)

    @staticmethod
    def _layout(npages: int) -> tuple[list[int], int]:
        """Offsets of ARRAYS in a state file of `npages`, each aligned to
        its item size (the C fast path reads them as typed arrays), and the file's size."""
        offsets, pos = [], 0
        for _, dtype in PageTable.ARRAYS:
            size = np.dtype(dtype).itemsize
            pos = (pos + size - 1) // size * size
            offsets.append(pos)
            pos += npages * size
        return offsets, max(pos, 1)

    def _map(self, path: str, create: bool) -> None:
        """Make the arrays views of the file at `path` (MAP_SHARED). Every
        store to them -- by Python or by the fast path's C threads, which
        hold pointers to the same memory -- is the file's content at once,
        so a daemon killed at any instruction leaves in the file exactly
        what its memory held (the successor reads it: statedir.py)."""
        offsets, size = self._layout(self.npages)
        if create:
            with open(path, "wb") as f:
                f.truncate(size)
        elif os.path.getsize(path) != size:
            raise ValueError(f"{path}: {os.path.getsize(path)} bytes, a table of {self.npages} pages has {size}")
        mem = _shared_bytes(path, size)
        for (name, dtype), off in zip(self.ARRAYS, offsets):
            view = mem[off:off + self.npages * np.dtype(dtype).itemsize].view(dtype)
            # The new file reads as zeros: an array of zeros (a fresh table's
            # state, flags, stamps and sums) is not copied, so its file pages
            # stay unallocated until a page of it is written -- a sparse
            # region's table costs memory for its touched pages only.
            if create and getattr(self, name).any():
                view[:] = getattr(self, name)
            setattr(self, name, view)
        self.path = path

    def persist(self, path: str) -> None:
        """From now on keep this table in the file at `path` (created; the
        current content copied in). Called before any thread but the engine's
        holds a pointer to the arrays (RegionSet.add_region, before the fast
        path is given the region)."""
        self._map(path, create=True)

    @classmethod
    def load(cls, path: str, npages: int, check: TransitionCheck | None = None) -> "PageTable":
        """The table a dead daemon kept in `path` (persist()), mapped again."""
        table = cls(0, check)
        table.npages = npages
        table._map(path, create=False)
        return table

    def unlink(self) -> None:
        """The region is gone: its state file goes too (the mapping stays valid
        until the arrays are dropped)."""
        path, self.path = getattr(self, "path", None), None
        if path:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    @property
    def nbytes(self) -> int:
        """The arrays' size (BYTES_PER_PAGE per page): what the table holds
        when every page was touched; a sparse region's file pages stay
        unallocated until touched (_map), so its memory can be less."""
        return sum(a.nbytes for a in (self.state, self.flags, self.slot, self.stamp, self.sum))

    def count(self, state: int) -> int:
        return int(np.count_nonzero(self.state == state))

    def move(self, pages, to) -> None:
        """Set the state of `pages` (a page number, a slice, an index or mask
        array) to `to` (a state, or an array of states, one per page), each
        page's current state checked against pagestate.h's table of legal
        predecessors. Every state change in the daemon's Python is made here.
        Cost: a bit test for one page; for many, one translate of their state
        bytes (an array `to` with one value is taken as that state; only one
        with several values takes a numpy lookup)."""
        state = self.state
        target = to
        if type(to) is not int:
            tb = np.asarray(to, np.uint8).tobytes()
            if tb.count(tb[:1]) == len(tb):  # one state for every page (or no page)
                target = tb[0] if tb else None
        if type(target) is int:
            if type(pages) is int:
                if not (LEGAL_FROM[target] >> int(state[pages])) & 1:
                    self._illegal(pages, to)
            elif b"\x01" in state[pages].tobytes().translate(ILLEGAL_BYTES[target]):
                self._illegal(pages, to)
        elif target is not None and not LEGAL[state[pages], to].all():
            self._illegal(pages, to)
        state[pages] = to

    def _illegal(self, pages, to) -> None:
        """Report the pages of a move that pagestate.h forbids."""
        old = np.atleast_1d(self.state[pages])
        to = np.broadcast_to(to, old.shape)
        bad = ~LEGAL[old, to]
        which = np.atleast_1d(np.arange(self.npages)[pages])
        self.check.report(self, which[bad], old[bad], to[bad])


def run_end(pages: np.ndarray, i: int) -> int:
    """The index in sorted `pages` just past the run of consecutive pages
    that goes on from pages[i]."""
    gaps = np.flatnonzero(np.diff(pages[i:]) != 1)
    return i + (int(gaps[0]) + 1 if len(gaps) else len(pages) - i)


def runs(pages: np.ndarray, max_len: int) -> list[tuple[int, int]]:
    """Split sorted page numbers into (first, count) runs of consecutive pages,
    each at most max_len long."""
    if len(pages) == 0:
        return []
    breaks = np.flatnonzero(np.diff(pages) != 1) + 1
    out = []
    for chunk in np.split(pages, breaks):
        first = int(chunk[0])
        n = len(chunk)
        while n > 0:
            k = min(n, max_len)
            out.append((first, k))
            first += k
            n -= k
    return out
