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

"Already mapped" is the client's page tables' word (/proc/PID/pagemap, read
before the pages are write-protected: _loaded) -- or, absent there, a page
that is not all zeros (the client may have written it and then dropped it
from its page tables with MADV_DONTNEED) -- not the memfd's alone: a LOADING
page can be in the memfd without its load having mapped it -- a zero page
planted by a read of the daemon's own mapping of the hole (/proc/DAEMON/mem,
a debugger), which the load's I/O thread may be overwriting with the store
copy at this very moment (native/readmap.h). Copied, the child would get
those zeros, or a torn page; it takes the slot instead (the store copy
wins, as in the load itself).
  RESIDENT clean with slot S           SWAPPED on S (one more reference)
  RESIDENT clean without slot          EMPTY (a zero fill never written: zeros)
  PUNCHING with slot S / without       SWAPPED on S / EMPTY (clean, as RESIDENT clean)
  RESIDENT dirty, WRITEBACK            AT_PARENT (same page of the parent region)
  EMPTY                                EMPTY
  POISONED                             POISONED

The AT_PARENT pages (the invariant that keeps them right, the hooks that
enforce it, the copies) are cow.py's; this module makes snapshots and
serves the requests above.

A region the client has mapped only in parts (a foreign MAP_FIXED mapping
took some of its pages, as `uswap exec` lets a program map a file over part
of a heap region) is snapshotted in those parts only: the kernel's view of
the parent (/proc/PID/maps, read at fork_begin) says which pages are still
the region's, and every other page is EMPTY in the child, shares no slot
and reads nothing from the parent. The daemon forgets the taken pages when
the UNMAP event of the foreign mapping is read, which may come after
fork_begin: the kernel's view, not the page table, is what the snapshot
follows, so snapshot and parent agree once the event is applied. The child
maps the same parts (it inherited the foreign mapping in the rest), and
fork_attach checks and write-unprotects those parts only.

A snapshot lives until the child attaches it or the last copy of the
keep-alive pipe's write end closes: the parent closes its copy once fork()
returned, the child after attaching, and a child that dies or execs first
closes it by exiting (the fd is close-on-exec). The daemon checks the pipes
on a timer while snapshots are pending.

Thread and lock: engine thread, page lock held (the fork requests of
forkops.py, and the engine's timers). Built on regionset.py, slots.py and
cow.py; only the composition (engine.py) and forkops.py sit above it.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import secrets
import select
import numpy as np

from uswap import native, uffd
from uswap.daemon import clientmaps
from uswap.daemon import pagetable as pt
from uswap.daemon.cow import CopyOnWrite
from uswap.daemon.region import Region, _fd_target
from uswap.daemon.regionset import PAGE, RegionSet
from uswap.daemon.slots import SlotAllocator


log = logging.getLogger("uswap.fork")
SHIFT = 12
PENDING_CHECK_S = 0.2  # how often pending snapshots' keep-alive pipes are checked


class ForkRefused(Exception):
    """A fork request that cannot be served; the message is for the client."""


class Snapshot:
    """The child regions of one fork, until the child attaches them."""

    def __init__(self, token: str, keep_fd: int, uid: int | None) -> None:
        self.token = token
        self.keep_fd = keep_fd                     # read end of the keep-alive pipe
        self.uid = uid                             # the parent's (SO_PEERCRED): the child's regions are its
        self.regions: dict[int, Region] = {}       # parent region id -> child region
        # parent region id -> its runs (first page, count) the parent mapped
        # in place at fork_begin: the only parts of the child region.
        self.runs: dict[int, list[tuple[int, int]]] = {}


class ForkManager:
    """The fork requests and their snapshots, pending until the child attaches them."""

    def __init__(self, regions: RegionSet, slots: SlotAllocator, cow: CopyOnWrite) -> None:
        self.regions = regions  # ioctl outcomes, timers, `charged`, draining
        self.slots = slots  # children share their parent's slots
        self.cow = cow  # the pages children read from their source
        self.pending: dict[str, Snapshot] = {}
        self.checking = False
        self.stats = {"forks_total": 0, "fork_shared_slots_total": 0}

    # ---------------------------------------------------------------- queries

    def pending_regions(self, uid: int | None = None) -> list[Region]:
        """Child regions not attached yet; with `uid`, only that user's forks',
        those whose child gave up dropped first (a count of the uid's regions
        must not wait PENDING_CHECK_S for them)."""
        if uid is not None:
            self._discard_abandoned([snap for snap in self.pending.values() if snap.uid == uid])
        return [r for snap in self.pending.values() if uid is None or snap.uid == uid
                for r in snap.regions.values()]

    def status(self) -> dict:
        return {"forks_total": self.stats["forks_total"],
                "fork_copied_pages_total": self.cow.copied,
                "fork_shared_slots_total": self.stats["fork_shared_slots_total"],
                "fork_pending": len(self.pending)}

    # ---------------------------------------------------------------- fork_begin

    def begin(self, regions: list[Region], uid: int | None = None) -> tuple[str, int, list[int]]:
        """Snapshot `regions` (the parent's, live, of user `uid`) for a child
        about to be forked. Returns (token, write end of the keep-alive pipe, ids snapshotted)."""
        if self.regions.draining:
            raise ForkRefused("fork_begin: the daemon is draining; the child gets no regions")
        in_place = self._in_place(regions)
        regions = [region for region in regions if in_place[region].any()]
        for region in regions:
            self.cow.materialize(region)
        # Before _protect: a page mapped by then is frozen by it (see _loaded).
        loaded = {region: self._loaded(region, in_place[region]) for region in regions}
        for region in regions:
            self._protect(region, in_place[region])
        keep_r, keep_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        snap = Snapshot(secrets.token_hex(16), keep_r, uid)
        try:
            for region in regions:
                snap.regions[region.id] = self._child_of(region, in_place[region], loaded[region])
                snap.runs[region.id] = pt.runs(np.flatnonzero(in_place[region]), 1 << 30)
                if len(snap.runs[region.id]) > 1 or not in_place[region].all():
                    log.info("fork %s: region %d snapshotted in %d part(s), %d of its %d pages (the rest"
                             " is not mapped in place)", snap.token[:8], region.id, len(snap.runs[region.id]),
                             int(np.count_nonzero(in_place[region])), region.npages)
        except BaseException:
            self._discard(snap)
            os.close(keep_w)
            raise
        self.pending[snap.token] = snap
        self.stats["forks_total"] += 1
        self._schedule_check()
        return snap.token, keep_w, list(snap.regions)

    @staticmethod
    def _in_place(regions: list[Region]) -> dict[Region, np.ndarray]:
        """Mask of each region's pages its process maps in place now (the
        kernel's view, one read of /proc/PID/maps a process; see the module
        doc). The whole region when its process cannot be looked at (no
        pid, /proc unreadable): a region whose process is gone is closing
        anyway."""
        by_pid: dict[int, list[Region]] = {}
        for region in regions:
            by_pid.setdefault(getattr(region.owner, "pid", 0), []).append(region)
        out = {}
        for pid, owned in by_pid.items():
            masks = clientmaps.mapped_in_place(pid, [(clientmaps.inode_of(r.memfd), r.addr, r.npages)
                                                     for r in owned]) if pid else None
            for i, region in enumerate(owned):
                out[region] = masks[i] if masks is not None else np.ones(region.npages, bool)
        return out

    def _protect(self, region: Region, in_place: np.ndarray) -> None:
        """Write-protect the source's dirty and loading pages mapped in
        place, one ioctl per run, in one call (uffd.writeprotect_pages;
        clean and WRITEBACK pages are write-protected already; a page a
        foreign mapping took is not the region's and is not in the snapshot,
        and the ioctl would fail there).

        Loading pages: a load may have mapped its page already, writable (a
        write fault's load), and the process may have written it before the
        engine hears the load finished; from here on such a page is frozen
        until the fork is built, and _child_of copies it. A load that maps
        its page after this point maps it as its mode says (the protection
        of a page not mapped yet is overwritten), which is right: the child
        takes the slot, and writes from then on are after the fork. A write
        parked meanwhile on a loading page is let through when the load
        completes (swapin.py's _load_done, the fast path's FP_WAITERS)."""
        table = region.table
        st = table.state
        dirty = (((st == pt.RESIDENT) & ((table.flags & pt.F_DIRTY) != 0)) | (st == pt.LOADING)) & in_place
        _, ret = uffd.writeprotect_pages(region.uffd, region.addr, np.flatnonzero(dirty), protect=True, wake=False)
        if ret < 0:
            # Pages protected already stay dirty; their next write faults
            # and is un-protected as for any dirty page.
            self.regions.ioctl_result(region, ret, "UFFDIO_WRITEPROTECT")
            raise ForkRefused(f"fork_begin: write-protecting region {region.id} failed"
                              f" ({os.strerror(-ret)}); the child gets no regions")

    @classmethod
    def _loaded(cls, region: Region, in_place: np.ndarray) -> np.ndarray:
        """The LOADING pages of `region` mapped in place whose load has
        mapped them into the client already (the module doc), as page indices.

        Invariant (no planted page in a child, no write lost in it): a
        LOADING page in the memfd is copied into the child if the client's
        page tables hold it -- put there by its load's COPY or CONTINUE,
        which comes after any write of the store copy over a page found
        present (readmap.h), so the I/O thread writes it no more -- or if it
        is not all zeros (a write the client made and then took out of its
        page tables, MADV_DONTNEED; or the store copy written over a planted
        page, torn only while that memcpy runs). A page of zeros the page
        tables do not hold (planted) takes the slot. Read before _protect, so that
        every page named here is write-protected before it is copied: no
        write of the client tears the copy either. A page its load maps
        after this read is taken from the slot, which holds the same bytes
        (a write after the load mapped it is after the fork began).
        When the client's pagemap cannot be read (see
        clientmaps.in_page_tables), the memfd's word is taken, as before
        pagemap was read: a page planted there is then copied."""
        loading = np.flatnonzero((region.table.state == pt.LOADING) & in_place)
        present = loading[cls._in_memfd(region, loading)]  # pagemap is read for these only
        mapped = clientmaps.in_page_tables(getattr(region.owner, "pid", 0), region.addr, present)
        if mapped is None:
            return present
        # Not in the page tables is not enough to be planted: the client may
        # have written the page its load mapped writable and then taken it
        # out of its own page tables (madvise(MADV_DONTNEED) of its shared
        # mapping keeps the data in the memfd; no EVENT_REMOVE is asked
        # for), and the child must get that write. A planted page is zeros
        # until the I/O thread writes the store copy over it (then the slot's
        # bytes: copying them is as good); only zeros take the slot.
        # (Invariant 8: in the memfd, so the read allocates nothing.)
        zero = np.zeros(len(present), bool)
        for i, page in enumerate(present.tolist()):
            zero[i] = native.page_sums(region.daddr + page * PAGE, 1)[1][0]
        return present[mapped | ~zero]

    @staticmethod
    def _in_memfd(region: Region, pages: np.ndarray) -> np.ndarray:
        """Which of `pages` are in the region's memfd (a load has copied them
        in, or something else put a page there: see _loaded)."""
        out = np.zeros(len(pages), bool)
        for i, page in enumerate(pages.tolist()):
            try:
                out[i] = os.lseek(region.memfd, page << SHIFT, os.SEEK_DATA) == page << SHIFT
            except OSError as e:
                if e.errno != errno.ENXIO:  # ENXIO: no data from there on
                    raise
        return out

    def _child_of(self, region: Region, in_place: np.ndarray, loaded: np.ndarray) -> Region:
        """A pending child region of `region` (page table as in the module
        doc) for its pages `in_place`; the others are EMPTY in the child.
        `loaded`: its LOADING pages already mapped by their loads (_loaded),
        copied; the other LOADING pages take their slots."""
        memfd = os.memfd_create("uswap-fork", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        child = Region(-1, memfd, region.addr, region.size, None)
        try:
            os.ftruncate(memfd, region.size)
            fcntl.fcntl(memfd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
            child.daddr = native.map_client_view(memfd, region.size)
        except OSError as e:
            child.release()
            raise ForkRefused(f"fork_begin: cannot create the child's memory: {e.strerror}") from None
        t, ct = region.table, child.table
        st, slot = t.state, t.slot
        clean = (t.flags & pt.F_DIRTY) == 0
        by_slot = ((st == pt.SWAPPED) | (st == pt.LOADING) | (st == pt.PUNCHING)
                   | ((st == pt.RESIDENT) & clean)) & (slot >= 0) & in_place
        by_slot[loaded] = False
        at_parent = (((st == pt.RESIDENT) & ~clean) | (st == pt.WRITEBACK)) & in_place
        ct.move(by_slot, pt.SWAPPED)
        ct.slot[by_slot] = slot[by_slot]
        ct.sum[:] = t.sum
        ct.stamp[:] = t.stamp
        ct.move((st == pt.POISONED) & in_place, pt.POISONED)
        ct.move(at_parent, pt.AT_PARENT)
        try:
            # link first: refused, it changed nothing; share refused, the links go.
            self.cow.link(child, region, at_parent)
            self.slots.share(slot[by_slot])
        except OverflowError as e:
            self.cow.on_region_closing(child)
            child.release()
            raise ForkRefused(f"fork_begin: {e}; the child gets no regions") from None
        self.stats["fork_shared_slots_total"] += int(np.count_nonzero(by_slot))
        self.cow.copy_pages(child, region, loaded)
        return child

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

    def runs_for(self, token: object, parent_id: object) -> list[tuple[int, int]]:
        """The parts (first page, count) of a pending child region the child
        maps: those its parent mapped in place at fork_begin."""
        self.memfd_for(token, parent_id)
        return self.pending[token].runs[parent_id]

    def attach(self, token: object, parent_id: object, uffd_fd: int, owner: object) -> Region:
        """fork_attach: the child's uffd (registered MISSING|WP|MINOR over the
        region's runs, runs_for) makes the pending region live. On success the
        region owns uffd_fd; on failure the caller still owns it."""
        region = self.memfd_for(token, parent_id)
        runs = self.runs_for(token, parent_id)
        if _fd_target(uffd_fd) != "anon_inode:[userfaultfd]":
            raise ForkRefused("fork_attach: the fd is not a userfaultfd")
        fl = fcntl.fcntl(uffd_fd, fcntl.F_GETFL)
        if not fl & os.O_NONBLOCK:
            fcntl.fcntl(uffd_fd, fcntl.F_SETFL, fl | os.O_NONBLOCK)
        for first, n in runs:
            at, length = region.addr + (first << SHIFT), n << SHIFT
            ret = uffd.writeprotect(uffd_fd, at, length, protect=False, wake=True)
            if ret < 0:
                raise ForkRefused(f"fork_attach: [{at:#x}, +{length}) is not registered for"
                                  f" MISSING|WP|MINOR in the given userfaultfd ({os.strerror(-ret)})")
        snap = self.pending[token]
        del snap.regions[parent_id]
        del snap.runs[parent_id]
        if not snap.regions:
            self._forget(snap)
        region.uffd = uffd_fd
        region.owner = owner
        return region

    def poison_after_attach(self, region: Region) -> None:
        """Pages the parent lost (read_failure: sigbus) give SIGBUS in the child too."""
        for first, n in pt.runs(np.flatnonzero(region.table.state == pt.POISONED), 1 << 30):
            ret = uffd.poison(region.uffd, region.addr + (first << SHIFT), n << SHIFT)
            if self.regions.ioctl_failed(region, ret, "UFFDIO_POISON"):
                return

    # ---------------------------------------------------------------- pending snapshots

    def _schedule_check(self) -> None:
        if not self.checking:
            self.checking = True
            self.regions.after(PENDING_CHECK_S, self._check_pending)

    def _check_pending(self) -> None:
        """Discard snapshots whose keep-alive pipe has no writer left: the
        child died, exec'd or was never born before it attached them."""
        self.checking = False
        self._discard_abandoned(list(self.pending.values()))
        if self.pending:
            self._schedule_check()

    def _discard_abandoned(self, snaps: list[Snapshot]) -> None:
        """Discard those of `snaps` whose keep-alive pipe has no writer left."""
        for snap in snaps:
            p = select.poll()
            p.register(snap.keep_fd, select.POLLIN)
            if any(ev & (select.POLLHUP | select.POLLERR) for _, ev in p.poll(0)):
                log.info("fork %s: no child attached %d region(s); discarding them",
                         snap.token[:8], len(snap.regions))
                self._discard(snap)

    def _discard(self, snap: Snapshot) -> None:
        """Release the child regions nobody attached: slot references,
        pages copied in, links to the source."""
        for region in snap.regions.values():
            self.cow.on_region_closing(region)
            table = region.table
            self.slots.free_many(table.slot[table.slot >= 0])
            table.slot[:] = pt.NO_SLOT
            self.regions.charged -= table.count(pt.RESIDENT)
            table.move(slice(None), pt.EMPTY)
            region.release()
        snap.regions.clear()
        self._forget(snap)

    def _forget(self, snap: Snapshot) -> None:
        self.pending.pop(snap.token, None)
        try:
            os.close(snap.keep_fd)
        except OSError:
            pass
