"""Fork: a child's copy of its parent's regions, copy-on-write.

A client process that forks (os.fork, multiprocessing) gets, in the child,
its regions as they were when the fork began; writes on either side stay on
that side. The client's at-fork hooks (uswap/client.py) drive three requests:

  fork_begin   (parent, before fork)  build a snapshot: one child region per
               parent region, with its own memfd and page table; returns a
               token and the write end of a keep-alive pipe
  fork_child   (child)  the memfd of one child region
  fork_attach  (child)  the child's uffd for it: the region goes live

The child's page table is built from the parent's, the way the kernel's
fork copies page tables and swap entries:

  parent page                          child page
  SWAPPED on slot S                    SWAPPED on S (one more reference to S)
  LOADING on slot S, not yet mapped    SWAPPED on S (one more reference)
  LOADING, already mapped              RESIDENT dirty: a copy taken at fork
  LOADING without slot (a zero fill)   EMPTY, or a copy if already mapped
  RESIDENT clean with slot S           SWAPPED on S (one more reference)
  RESIDENT clean without slot          EMPTY (a zero fill never written: zeros)
  PUNCHING with slot S / without       SWAPPED on S / EMPTY (clean, as RESIDENT clean)
  RESIDENT dirty, WRITEBACK            AT_PARENT (same page of the parent region)
  EMPTY                                EMPTY
  POISONED                             POISONED

Invariant (AT_PARENT): while a child page is AT_PARENT, the same page of its
source region is resident (RESIDENT or WRITEBACK) and unchanged since the
fork. It is enforced by four hooks, each called by the engine before the
source page may change or leave memory:
  - fork_begin write-protects the source's dirty pages (the rest are
    write-protected already: clean and WRITEBACK pages always are), so the
    source's next write faults. Dirty pages' write faults always reach the
    engine (the fast path un-protects only clean pages), and the engine's
    _make_dirty calls before_write_page, which copies the page into every
    child still AT_PARENT there first.
  - a write-back that fails un-protects its pages: before_write first.
  - a write-back that succeeds makes the page a clean copy of slot S (or a
    zero page), about to be dropped: parent_clean moves the children to
    SWAPPED on S (or EMPTY) first.
  - a source region that closes (its process exits): on_region_closing copies
    every shared page into its children first.
  A source page with children AT_PARENT is therefore never dropped (_drop
  takes clean pages only), and the copy is read from the daemon's own
  mapping of a resident page (invariant 8).

A child's own fault on an AT_PARENT page (fault_at_parent) maps a copy of the
source page into the child; the child page is then RESIDENT and dirty (its
only copy is in memory).

Nested fork: a region that is itself a child copies its remaining AT_PARENT
pages in (they become its own dirty pages) before it is snapshotted, so every
child has exactly one source region.

A snapshot lives until the child attaches it or the last copy of the
keep-alive pipe's write end closes: the parent closes its copy once fork()
returned, the child after attaching, and a child that dies or execs first
closes it by exiting (the fd is close-on-exec). The daemon checks the pipes
on a timer while snapshots are pending.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import secrets
import select
from typing import TYPE_CHECKING

import numpy as np

from uswap import native, uffd
from uswap.daemon import pagetable as pt
from uswap.daemon.region import Region, _fd_target

if TYPE_CHECKING:
    from uswap.daemon.engine import Engine

log = logging.getLogger("uswap.fork")
PAGE = 4096
SHIFT = 12
PENDING_CHECK_S = 0.2  # how often pending snapshots' keep-alive pipes are checked


class ForkRefused(Exception):
    """A fork request that cannot be served; the message is for the client."""


class Share:
    """A source region's pages that children still read from it (AT_PARENT)."""

    def __init__(self, npages: int) -> None:
        self.counts = np.zeros(npages, np.uint16)  # children AT_PARENT at each page
        self.total = 0                             # sum of counts
        self.children: dict[Region, int] = {}      # child -> its AT_PARENT pages


class Snapshot:
    """The child regions of one fork, until the child attaches them."""

    def __init__(self, token: str, keep_fd: int) -> None:
        self.token = token
        self.keep_fd = keep_fd                     # read end of the keep-alive pipe
        self.regions: dict[int, Region] = {}       # parent region id -> child region


class ForkManager:
    def __init__(self, engine: "Engine") -> None:
        self.engine = engine
        self.shares: dict[Region, Share] = {}      # source region -> its share
        self.source: dict[Region, Region] = {}     # child region -> source region
        self.pending: dict[str, Snapshot] = {}
        self.checking = False
        self.stats = {"forks_total": 0, "fork_copied_pages_total": 0, "fork_shared_slots_total": 0}

    # ---------------------------------------------------------------- queries

    def is_shared(self, region: Region, page: int) -> bool:
        """True when a child still reads this page of `region` (it must stay write-protected)."""
        share = self.shares.get(region)
        return share is not None and share.counts[page] > 0

    def pending_regions(self) -> list[Region]:
        return [r for snap in self.pending.values() for r in snap.regions.values()]

    def status(self) -> dict:
        return dict(self.stats, fork_pending=len(self.pending))

    # ---------------------------------------------------------------- fork_begin

    def begin(self, regions: list[Region]) -> tuple[str, int, list[int]]:
        """Snapshot `regions` (the parent's, live) for a child about to be
        forked. Returns (token, write end of the keep-alive pipe, ids snapshotted)."""
        engine = self.engine
        if engine.draining:
            raise ForkRefused("fork_begin: the daemon is draining; the child gets no regions")
        for region in regions:
            self._materialize(region)
        for region in regions:
            self._protect(region)
        keep_r, keep_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        snap = Snapshot(secrets.token_hex(16), keep_r)
        try:
            for region in regions:
                snap.regions[region.id] = self._child_of(region)
        except BaseException:
            self._discard(snap)
            os.close(keep_w)
            raise
        self.pending[snap.token] = snap
        self.stats["forks_total"] += 1
        self._schedule_check()
        return snap.token, keep_w, list(snap.regions)

    def _protect(self, region: Region) -> None:
        """Write-protect the source's dirty and loading pages, one ioctl per
        run (clean and WRITEBACK pages are write-protected already).

        Loading pages: a load may have mapped its page already, writable (a
        write fault's load), and the process may have written it before the
        engine hears the load finished; from here on such a page is frozen
        until the fork is built, and _child_of copies it. A load that maps
        its page after this point maps it as its mode says (the protection
        of a page not mapped yet is overwritten), which is right: the child
        takes the slot, and writes from then on are after the fork. A write
        parked meanwhile on a loading page is let through when the load
        completes (engine._load_done, the fast path's FP_WAITERS)."""
        table = region.table
        st = table.state
        dirty = ((st == pt.RESIDENT) & ((table.flags & pt.F_DIRTY) != 0)) | (st == pt.LOADING)
        for first, n in pt.runs(np.flatnonzero(dirty), 1 << 30):
            ret = uffd.writeprotect(region.uffd, region.addr + (first << SHIFT), n << SHIFT,
                                    protect=True, wake=False)
            if ret < 0:
                # Runs protected already stay dirty; their next write faults
                # and is un-protected as for any dirty page.
                self.engine._ioctl_result(region, ret, "UFFDIO_WRITEPROTECT")
                raise ForkRefused(f"fork_begin: write-protecting region {region.id} failed"
                                  f" ({os.strerror(-ret)}); the child gets no regions")

    @staticmethod
    def _mapped(region: Region, pages: np.ndarray) -> np.ndarray:
        """Which of `pages` are in the region's memfd (a load has copied them in)."""
        out = np.zeros(len(pages), bool)
        for i, page in enumerate(pages.tolist()):
            try:
                out[i] = os.lseek(region.memfd, page << SHIFT, os.SEEK_DATA) == page << SHIFT
            except OSError as e:
                if e.errno != errno.ENXIO:  # ENXIO: no data from there on
                    raise
        return out

    def _child_of(self, region: Region) -> Region:
        """A pending child region of `region` (page table as in the module doc)."""
        memfd = os.memfd_create("uswap-fork", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        child = Region(-1, memfd, region.addr, region.size, None)
        try:
            os.ftruncate(memfd, region.size)
            fcntl.fcntl(memfd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
            child.daddr = native.mmap_shared(memfd, region.size)
        except OSError as e:
            child.release()
            raise ForkRefused(f"fork_begin: cannot create the child's memory: {e.strerror}") from None
        t, ct = region.table, child.table
        st, slot = t.state, t.slot
        clean = (t.flags & pt.F_DIRTY) == 0
        loading = np.flatnonzero(st == pt.LOADING)
        loaded = loading[self._mapped(region, loading)]  # frozen by _protect: copied below
        by_slot = ((st == pt.SWAPPED) | (st == pt.LOADING) | (st == pt.PUNCHING)
                   | ((st == pt.RESIDENT) & clean)) & (slot >= 0)
        by_slot[loaded] = False
        at_parent = ((st == pt.RESIDENT) & ~clean) | (st == pt.WRITEBACK)
        ct.state[by_slot] = pt.SWAPPED
        ct.slot[by_slot] = slot[by_slot]
        ct.sum[:] = t.sum
        ct.stamp[:] = t.stamp
        ct.state[st == pt.POISONED] = pt.POISONED
        ct.state[at_parent] = pt.AT_PARENT
        try:
            self.engine.slots.share(slot[by_slot])
        except OverflowError as e:
            child.release()
            raise ForkRefused(f"fork_begin: {e}") from None
        self.stats["fork_shared_slots_total"] += int(np.count_nonzero(by_slot))
        self._copy_pages(child, region, loaded)
        shared = int(np.count_nonzero(at_parent))
        if shared:
            share = self.shares.get(region)
            if share is None:
                share = self.shares[region] = Share(region.npages)
            share.counts[at_parent] += 1
            share.total += shared
            share.children[child] = shared
            self.source[child] = region
        return child

    def _materialize(self, region: Region) -> None:
        """Nested fork: copy the pages `region` still reads from its own
        source into it, so the new child has a single source."""
        src = self.source.get(region)
        if src is None:
            return
        pages = np.flatnonzero(region.table.state == pt.AT_PARENT)
        self._copy_in(region, src, pages)

    # ---------------------------------------------------------------- child side

    def memfd_for(self, token: object, parent_id: object) -> Region:
        """fork_child: the pending child region for the parent's region id."""
        snap = self.pending.get(token) if isinstance(token, str) else None
        if snap is None:
            raise ForkRefused(f"fork_child: unknown or expired fork token {token!r}")
        region = snap.regions.get(parent_id) if isinstance(parent_id, int) else None
        if region is None:
            raise ForkRefused(f"fork_child: region {parent_id!r} is not in this fork's snapshot;"
                              f" it holds {sorted(snap.regions)}")
        return region

    def attach(self, token: object, parent_id: object, uffd_fd: int, owner: object) -> Region:
        """fork_attach: the child's uffd (registered MISSING|WP|MINOR over the
        region's range) makes the pending region live. On success the region
        owns uffd_fd; on failure the caller still owns it."""
        region = self.memfd_for(token, parent_id)
        if _fd_target(uffd_fd) != "anon_inode:[userfaultfd]":
            raise ForkRefused("fork_attach: the fd is not a userfaultfd")
        fl = fcntl.fcntl(uffd_fd, fcntl.F_GETFL)
        if not fl & os.O_NONBLOCK:
            fcntl.fcntl(uffd_fd, fcntl.F_SETFL, fl | os.O_NONBLOCK)
        ret = uffd.writeprotect(uffd_fd, region.addr, region.size, protect=False, wake=True)
        if ret < 0:
            raise ForkRefused(f"fork_attach: [{region.addr:#x}, +{region.size}) is not registered for"
                              f" MISSING|WP|MINOR in the given userfaultfd ({os.strerror(-ret)})")
        snap = self.pending[token]
        del snap.regions[parent_id]
        if not snap.regions:
            self._forget(snap)
        region.uffd = uffd_fd
        region.owner = owner
        return region

    def poison_after_attach(self, region: Region) -> None:
        """Pages the parent lost (read_failure: sigbus) give SIGBUS in the child too."""
        for first, n in pt.runs(np.flatnonzero(region.table.state == pt.POISONED), 1 << 30):
            ret = uffd.poison(region.uffd, region.addr + (first << SHIFT), n << SHIFT)
            if self.engine._ioctl_failed(region, ret, "UFFDIO_POISON"):
                return

    # ---------------------------------------------------------------- engine hooks

    def fault_at_parent(self, region: Region, page: int) -> None:
        """A child's fault on an AT_PARENT page (charged by the caller): map a
        copy of the source page, writable; the page is RESIDENT and dirty."""
        from uswap.daemon import engine as engine_mod  # engine imports this module
        engine = self.engine
        src = self.source[region]
        off = page << SHIFT
        ret = uffd.copy(region.uffd, region.addr + off, src.daddr + off, PAGE, 0)
        outcome = engine._ioctl_result(region, ret, "UFFDIO_COPY")
        if outcome != engine_mod.OK:  # the page stays AT_PARENT (or its region closed)
            engine.charged -= 1
            if outcome == engine_mod.AGAIN:  # fault again once the pending event is read
                uffd.wake(region.uffd, region.addr + off, PAGE)
            return
        self._unlink(region, src, np.array([page]))
        table = region.table
        table.state[page] = pt.RESIDENT
        table.flags[page] = pt.F_DIRTY
        table.stamp[page] = engine._tick()
        self.stats["fork_copied_pages_total"] += 1

    def before_write_page(self, region: Region, page: int) -> None:
        """The source page is about to be made writable: children still
        reading it get their own copy first."""
        share = self.shares.get(region)
        if share is not None and share.counts[page]:
            self.before_write(region, np.array([page]))

    def before_write(self, region: Region, pages: np.ndarray) -> None:
        share = self.shares.get(region)
        if share is None:
            return
        hit = pages[share.counts[pages] > 0]
        for child in list(share.children):
            self._copy_in(child, region, hit[child.table.state[hit] == pt.AT_PARENT])

    def before_forget(self, region: Region, pages: np.ndarray) -> None:
        """`pages` of `region` are about to be forgotten (the client unmapped
        them; Engine.forget_range): children still reading them from here get
        their copies first (invariant AT_PARENT), and, if `region` is itself a
        child, its AT_PARENT pages there stop reading from its source."""
        self.before_write(region, pages)
        src = self.source.get(region)
        if src is not None:
            self._unlink(region, src, pages[region.table.state[pages] == pt.AT_PARENT])

    def parent_clean(self, region: Region, pages: np.ndarray) -> None:
        """`pages` of the source are clean copies of their slots (or zero pages
        without one) and about to be dropped: children AT_PARENT there now
        share the slot (or read zeros)."""
        share = self.shares.get(region)
        if share is None:
            return
        hit = pages[share.counts[pages] > 0]
        table = region.table
        for child in list(share.children):
            at = hit[child.table.state[hit] == pt.AT_PARENT]
            if len(at) == 0:
                continue
            slots = table.slot[at]
            self.engine.slots.share(slots)
            ct = child.table
            ct.state[at] = np.where(slots >= 0, pt.SWAPPED, pt.EMPTY)
            ct.slot[at] = slots
            ct.sum[at] = table.sum[at]
            ct.stamp[at] = self.engine.tick
            self._unlink(child, region, at)

    def resolve_all(self) -> None:
        """Drain: every child page still read from a source is copied in."""
        for region in list(self.shares):
            self._resolve_source(region)

    def on_region_closing(self, region: Region) -> None:
        """Before a region stops being served: its children get their copies,
        and, if it is a child, its links to its source go."""
        self._resolve_source(region)
        src = self.source.get(region)
        if src is not None:
            table = region.table
            at = np.flatnonzero(table.state == pt.AT_PARENT)
            self._unlink(region, src, at)
            table.state[at] = pt.EMPTY

    # ---------------------------------------------------------------- internals

    def _resolve_source(self, region: Region) -> None:
        share = self.shares.get(region)
        if share is None:
            return
        self.before_write(region, np.flatnonzero(share.counts))
        self.shares.pop(region, None)

    def _copy_in(self, child: Region, src: Region, pages: np.ndarray) -> None:
        """Copy source pages into the child's memfd through the daemon's
        mappings; the child pages become RESIDENT and dirty (charged, over
        the budget if need be: reclaim evicts them), and its next access
        maps them with a MINOR fault. The source pages are resident (the
        AT_PARENT invariant), so reading them allocates nothing."""
        self._copy_pages(child, src, pages)
        self._unlink(child, src, pages)

    def _copy_pages(self, child: Region, src: Region, pages: np.ndarray) -> None:
        if len(pages) == 0:
            return
        ffi = native.ffi
        for first, n in pt.runs(pages, 1 << 30):
            off = first << SHIFT
            ffi.memmove(ffi.cast("char *", child.daddr + off), ffi.cast("char *", src.daddr + off), n << SHIFT)
        table = child.table
        table.state[pages] = pt.RESIDENT
        table.flags[pages] = pt.F_DIRTY
        table.slot[pages] = pt.NO_SLOT
        table.stamp[pages] = self.engine._tick(len(pages))
        self.engine.charged += len(pages)
        self.stats["fork_copied_pages_total"] += len(pages)

    def _unlink(self, child: Region, src: Region, pages: np.ndarray) -> None:
        """`pages` of `child` (AT_PARENT until now) no longer read from `src`."""
        share = self.shares.get(src)
        if share is None or len(pages) == 0:
            return
        share.counts[pages] -= 1
        share.total -= len(pages)
        left = share.children[child] - len(pages)
        if left:
            share.children[child] = left
        else:
            del share.children[child]
            self.source.pop(child, None)
        if share.total == 0:
            self.shares.pop(src, None)

    # ---------------------------------------------------------------- pending snapshots

    def _schedule_check(self) -> None:
        if not self.checking:
            self.checking = True
            self.engine._after(PENDING_CHECK_S, self._check_pending)

    def _check_pending(self) -> None:
        """Discard snapshots whose keep-alive pipe has no writer left: the
        child died, exec'd or was never born before it attached them."""
        self.checking = False
        for snap in list(self.pending.values()):
            p = select.poll()
            p.register(snap.keep_fd, select.POLLIN)
            if any(ev & (select.POLLHUP | select.POLLERR) for _, ev in p.poll(0)):
                log.info("fork %s: no child attached %d region(s); discarding them",
                         snap.token[:8], len(snap.regions))
                self._discard(snap)
        if self.pending:
            self._schedule_check()

    def _discard(self, snap: Snapshot) -> None:
        """Release the child regions nobody attached: slot references,
        pages copied in, links to the source."""
        engine = self.engine
        for region in snap.regions.values():
            self.on_region_closing(region)
            table = region.table
            engine.slots.free_many(table.slot[table.slot >= 0])
            table.slot[:] = pt.NO_SLOT
            engine.charged -= table.count(pt.RESIDENT)
            table.state[:] = pt.EMPTY
            region.release()
        snap.regions.clear()
        self._forget(snap)

    def _forget(self, snap: Snapshot) -> None:
        self.pending.pop(snap.token, None)
        try:
            os.close(snap.keep_fd)
        except OSError:
            pass

