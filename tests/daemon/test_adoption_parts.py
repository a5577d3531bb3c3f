"""The parts adoption is built from, each against the real thing: page
tables kept in state files (pagetable.py), the state directory's rules
(statedir.py), slots claimed from tables (slots.py), and which pages a
memfd really holds (resolve.memfd_pages)."""
from __future__ import annotations

import os
import types

import numpy as np
import pytest

from uswap import native
from uswap.daemon import pagetable as pt
from uswap.daemon.adoption import Adoption
from uswap.daemon.resolve import memfd_pages
from uswap.daemon.cow import CopyOnWrite
from uswap.daemon.slots import SlotAllocator
from uswap.daemon.statedir import StateBusy, StateDir, StateRefused

PAGE = 4096
STORE = {"url": "/srv/swapfile", "size_bytes": 1 << 26, "id": "a1"}


def test_a_persisted_table_is_the_file(tmp_path):
    """Every store to the arrays is in the file at once: what a daemon
    killed right after it leaves for its successor."""
    t = pt.PageTable(100)
    t.move(np.arange(10), pt.RESIDENT)
    t.slot[:10] = np.arange(5, 15)
    path = str(tmp_path / "region-1.table")
    t.persist(path)
    t.move(np.arange(5), pt.WRITEBACK)  # after persist: in the file too
    t.sum[3] = 0xDEADBEEF
    again = pt.PageTable.load(path, 100)
    assert again.state[:5].tolist() == [pt.WRITEBACK] * 5 and again.state[5:10].tolist() == [pt.RESIDENT] * 5
    assert again.slot[:10].tolist() == list(range(5, 15)) and again.slot[10] == pt.NO_SLOT
    assert again.sum[3] == 0xDEADBEEF
    with pytest.raises(ValueError, match="a table of 99 pages"):
        pt.PageTable.load(path, 99)


def region(rid: int, memfd: int, npages: int = 4) -> types.SimpleNamespace:
    return types.SimpleNamespace(id=rid, addr=0x10000 * rid, size=npages * PAGE, npages=npages,
                                 memfd=memfd, table=pt.PageTable(npages))


def test_state_dir_keeps_regions_and_refuses_another_store(tmp_path):
    path = str(tmp_path / "state")
    sd = StateDir(path, STORE)
    memfd = os.memfd_create("t")
    try:
        r = region(3, memfd)
        sd.record(r, pid=42, uid=1000)
        with pytest.raises(StateBusy, match="in use by another running daemon"):
            StateDir(path, STORE)
        os.close(sd.lock_fd)  # the daemon is gone
        with pytest.raises(StateRefused, match="holds the regions of a daemon of another store"):
            StateDir(path, dict(STORE, id="b2"))
        sd = StateDir(path, STORE)
        (meta,) = sd.orphans()
        st = os.fstat(memfd)
        assert meta == {"id": 3, "addr": 0x30000, "size": 4 * PAGE, "npages": 4, "pid": 42, "uid": 1000,
                        "memfd": [st.st_dev, st.st_ino]}
        # A table whose metadata is gone (forget stopped half-way) is a leftover.
        os.unlink(sd.meta_path(3))
        assert sd.orphans() == [] and not os.path.exists(sd.table_path(3))
        # With no region left, another store may use the directory.
        os.close(sd.lock_fd)
        StateDir(path, dict(STORE, id="b2"))
    finally:
        os.close(memfd)


def test_state_dir_keeps_the_orphan_clock_and_the_quarantine(tmp_path):
    """An orphan's clock is noted once and kept (a time ahead of now, from
    another boot, starts again); the quarantine is this store's only."""
    import time
    path = str(tmp_path / "state")
    sd = StateDir(path, STORE)
    memfd = os.memfd_create("t")
    try:
        sd.record(region(3, memfd), pid=42, uid=1000)
        (meta,) = sd.orphans()
        since = sd.mark_orphaned(meta)
        assert abs(since - time.clock_gettime(time.CLOCK_BOOTTIME)) < 5
        (again,) = sd.orphans()
        assert again["orphaned_at"] == since and sd.mark_orphaned(again) == since
        again["orphaned_at"] = since + 10 ** 6  # another boot's
        assert sd.mark_orphaned(again) < since + 10
        sd.adopted(again)
        (live,) = sd.orphans()
        assert "orphaned_at" not in live
        sd.save_quarantine([(70, 2), (90, 1)])
        os.close(sd.lock_fd)  # the daemon is gone; its successor reads them
        successor = StateDir(path, STORE)
        assert successor.quarantine() == [(70, 2), (90, 1)]
        os.close(successor.lock_fd)
    finally:
        os.close(memfd)
    sd2 = StateDir(str(tmp_path / "other"), dict(STORE, id="b2"))
    os.replace(os.path.join(path, "quarantine.json"), os.path.join(sd2.path, "quarantine.json"))
    assert sd2.quarantine() == []  # another store's slots


def test_quarantine_unsaved_marker_says_the_file_is_behind(tmp_path):
    """quarantine-ID.unsaved (statedir.py): "1" with the store after a failed
    rewrite, "0" after the next good one; read by the next daemon of the
    same store only (another store's marker is not its business; a torn
    one is taken as its own); held at "1" while keep_unsaved_mark is set."""
    path = str(tmp_path / "state")
    qfile = os.path.join(path, "quarantine.json")

    def successor(store=STORE) -> StateDir:
        nxt = StateDir(path, store)
        os.close(nxt.lock_fd)  # let the next one take the directory
        return nxt

    sd = StateDir(path, STORE)
    os.makedirs(qfile + ".tmp")  # the rewrite fails for real (EISDIR), as with a full tmpfs
    assert not sd.save_quarantine([(70, 2)])
    os.close(sd.lock_fd)
    assert successor().quarantine_incomplete()
    assert not successor(dict(STORE, id="b2")).quarantine_incomplete()  # another store's
    sd = StateDir(path, STORE)
    assert sd.quarantine_incomplete()
    os.rmdir(qfile + ".tmp")
    sd.keep_unsaved_mark(True)
    assert sd.save_quarantine([(70, 2)])  # saved, but the marker is kept
    os.close(sd.lock_fd)
    assert successor().quarantine_incomplete()
    sd = StateDir(path, STORE)
    assert sd.save_quarantine([(70, 2)])
    os.close(sd.lock_fd)
    assert not successor().quarantine_incomplete()
    marker = os.path.join(path, "quarantine-a1.unsaved")
    with open(marker, "r+b") as f:
        f.write(b'1{"url": "/srv/swa')  # a kill within the marker's write
    assert successor().quarantine_incomplete()
    assert os.path.getsize(marker) == 4096  # its page, allocated at start
    sd = StateDir(path, STORE)
    sd.clear()  # a drain: the marker says "1" still (this daemon wrote nothing), so it stays
    assert os.path.exists(marker)
    assert sd.save_quarantine([])
    sd.clear()  # the file is complete: the marker goes
    assert not os.path.exists(marker)
    os.close(sd.lock_fd)


def test_claim_free_holds_every_slot_no_table_names():
    slots = SlotAllocator(64)
    slots.claim(np.array([5, 6, 7, 30, -1], np.int32))
    runs = slots.claim_free()
    # One run over the store (test_review_quarantine_marker.py: one entry
    # per free gap cost seconds on a large fragmented store).
    assert runs == [(1, 63)]
    assert (slots.used, slots.references) == (63, 67)
    assert slots.alloc(1) is None
    slots.free_many(np.array([5, 6, 7], np.int32))  # a table frees: still held
    assert slots.alloc(1) is None
    for first, n in runs:
        slots.free(first, n)
    assert (slots.used, slots.references) == (1, 1)
    assert np.count_nonzero(slots.counts(slice(1, 64)) == 0) == 62 and slots.counts([30]).tolist() == [1]
    assert slots.claim_free() == [(1, 63)]


def test_slots_claimed_from_tables_count_references():
    slots = SlotAllocator(64)
    parent = np.array([5, 6, 7, -1], np.int32)
    child = np.array([5, -1, 7, -1], np.int32)  # a fork shares two of them
    slots.claim(parent)
    slots.claim(child)
    assert (slots.used, slots.references) == (3, 5)
    assert slots.counts([5, 6, 7]).tolist() == [2, 1, 2]
    first, n = slots.alloc(8)
    assert not {5, 6, 7} & set(range(first, first + n))
    slots.free_many(child)
    slots.free_many(parent)
    assert (slots.used, slots.references) == (n, n)
    with pytest.raises(ValueError, match="outside the store's 1..63"):
        slots.claim(np.array([64], np.int32))


def test_memfd_pages_are_the_pages_it_holds():
    fd = os.memfd_create("t")
    try:
        os.ftruncate(fd, 16 * PAGE)
        for page in (2, 3, 9, 15):
            os.pwrite(fd, b"x", page * PAGE + 100)
        assert np.flatnonzero(memfd_pages(fd, 16)).tolist() == [2, 3, 9, 15]
        native.punch_hole(fd, 3 * PAGE, PAGE)  # a punched page is gone
        assert np.flatnonzero(memfd_pages(fd, 16)).tolist() == [2, 9, 15]
    finally:
        os.close(fd)


class _Region:
    """What CopyOnWrite keys its maps by and reads of a region: its pages and table."""

    def __init__(self, table: pt.PageTable) -> None:
        self.npages = table.npages
        self.table = table


class _KilledAfterEachMove(pt.PageTable):
    """A page table that keeps, after every state change, what a daemon
    SIGKILLed right then leaves in its file: the state just stored, and the
    other arrays as the stores before it left them."""

    def __init__(self, npages: int) -> None:
        super().__init__(npages)
        self.left: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def move(self, pages, to) -> None:
        super().move(pages, to)
        self.left.append((self.state.copy(), self.slot.copy(), self.flags.copy()))


def test_a_child_moved_to_its_parents_slot_is_never_adopted_empty():
    """cow.parent_clean moves a forked child's AT_PARENT pages to the slot
    their parent's page was just written to. Killed between its stores, the
    child's page must come back from that slot, or as AT_PARENT (POISONED:
    SIGBUS), never as EMPTY (zeros: silently wrong data). It came back EMPTY:
    the state (SWAPPED) was stored before the slot, and a SWAPPED page naming
    no slot is taken by adoption for a forget under way."""
    n = 4
    slots = SlotAllocator(64)
    parent = _Region(pt.PageTable(n))
    child = _Region(_KilledAfterEachMove(n))
    parent.table.move(np.arange(n), pt.RESIDENT)  # clean copies of their slots, just written back
    first, _ = slots.alloc(n)
    parent.table.slot[:] = np.arange(first, first + n)
    child.table.move(np.arange(n), pt.AT_PARENT)
    cow = CopyOnWrite(types.SimpleNamespace(tick=7, fp=None), None, slots)  # no fast path
    cow.link(child, parent, np.ones(n, bool))
    child.table.left.clear()

    cow.parent_clean(parent, np.arange(n))

    assert child.table.state.tolist() == [pt.SWAPPED] * n
    assert child.table.left, "parent_clean changed no state"
    for state, slot, flags in child.table.left:
        left = pt.PageTable(n)
        left.state[:], left.slot[:], left.flags[:] = state, slot, flags
        Adoption._keep_only_copies(left)
        for page in range(n):
            assert (left.state[page] == pt.AT_PARENT
                    or (left.state[page] == pt.SWAPPED and left.slot[page] == first + page)), \
                (page, left.state[page], left.slot[page])
