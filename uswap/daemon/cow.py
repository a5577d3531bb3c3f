"""Copy-on-write between a fork's source regions and their children: the
pages a child still reads from its parent (AT_PARENT), the hooks that copy
them before the source page changes or leaves memory, and the copies.
Snapshots and the fork requests that make children are fork.py's; the page
table a child starts from is in fork.py's docstring.

Invariant (AT_PARENT): while a child page is AT_PARENT, the same page of its
source region is resident (RESIDENT or WRITEBACK) and unchanged since the
fork. It is enforced by four hooks, each called by the engine before the
source page may change or leave memory:
  - fork_begin (fork.py) write-protects the source's dirty pages (the rest are
    write-protected already: clean and WRITEBACK pages always are), so the
    source's next write faults. Dirty pages' write faults always reach the
    engine (the fast path un-protects only clean pages), and dirtying.py's
    make_dirty calls before_write_page, which copies the page into every
    child still AT_PARENT there first.
  - a write-back that fails un-protects its pages: before_write first.
  - a write-back that succeeds makes the page a clean copy of slot S (or a
    zero page), about to be dropped or kept clean (mlocked meanwhile):
    parent_clean moves the children to SWAPPED on S (or EMPTY) first.
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

Thread and lock: engine thread, page lock held (the engine stages' hooks
and fork.py). Built on regionset.py and budget.py; the stages above call its
hooks, and the region set calls on_region_closing through the hook the
composition (engine.py) gives it.
"""
from __future__ import annotations

import numpy as np

from uswap import native, uffd
from uswap.daemon import pagetable as pt
from uswap.daemon.budget import Budget
from uswap.daemon.region import Region
from uswap.daemon.regionset import AGAIN, OK, RegionSet
from uswap.daemon.slots import SlotAllocator

PAGE = 4096
SHIFT = 12
# Children AT_PARENT at one source page: the most a count holds (uint16, as
# the fast path reads it: fp_region.shares). `link` refuses more; neither
# max_clients nor any other limit bounds them (a fork not yet attached links
# its child too, and one client may hold any number of those).
COUNT_TYPE = np.uint16
MAX_CHILDREN = int(np.iinfo(COUNT_TYPE).max)


class Share:
    """A source region's pages that children still read from it (AT_PARENT)."""

    def __init__(self, npages: int) -> None:
        self.counts = np.zeros(npages, COUNT_TYPE)  # children AT_PARENT at each page
        self.total = 0                             # sum of counts
        self.children: dict[Region, int] = {}      # child -> its AT_PARENT pages


class CopyOnWrite:
    """Every source region's share and every child's source."""

    def __init__(self, regions: RegionSet, budget: Budget, slots: SlotAllocator) -> None:
        self.regions = regions  # ioctl outcomes, `charged`, `tick`
        self.budget = budget  # the clock: pages copied in are stamped
        self.slots = slots  # children moved to a slot share it
        self.shares: dict[Region, Share] = {}      # source region -> its share
        self.source: dict[Region, Region] = {}     # child region -> source region
        self.copied = 0  # pages copied into children (fork_copied_pages_total)

    def children_at(self, region: Region, page: int) -> int:
        """How many children still read this page of `region` (while any do,
        it stays write-protected: policy.minor_writable)."""
        counts = region.share_counts
        return 0 if counts is None else int(counts[page])

    def _publish(self, region: Region, share: Share | None) -> None:
        """`region`'s share counts (None: no child reads from it), also to
        the fast path's threads, which map a dirty page writable on a MINOR
        fault only where its count is 0 (fp_take_minor). Page lock held."""
        region.share_counts = None if share is None else share.counts
        if self.regions.fp is not None:
            self.regions.fp.shares_changed(region)

    # ---------------------------------------------------------------- a new child (fork.py)

    def link(self, child: Region, src: Region, at_parent: np.ndarray) -> None:
        """A new child reads the pages `at_parent` (a mask) from `src`.
        OverflowError, nothing changed, when a page of them has MAX_CHILDREN
        children reading it already (a count past it would wrap to 0: the page
        taken for unshared, the source's next write seen by its children)."""
        shared = int(np.count_nonzero(at_parent))
        if shared:
            share = self.shares.get(src)
            if share is not None:
                full = np.flatnonzero(at_parent & (share.counts >= MAX_CHILDREN))
                if len(full):
                    raise OverflowError(f"page {int(full[0])} of region {src.id} is read by {MAX_CHILDREN}"
                                        f" forked children already, the most it can be")
            if share is None:
                share = self.shares[src] = Share(src.npages)
                self._publish(src, share)
            share.counts[at_parent] += 1
            share.total += shared
            share.children[child] = shared
            self.source[child] = src

    def materialize(self, region: Region) -> None:
        """Nested fork: copy the pages `region` still reads from its own
        source into it, so the new child has a single source."""
        src = self.source.get(region)
        if src is None:
            return
        pages = np.flatnonzero(region.table.state == pt.AT_PARENT)
        self._copy_in(region, src, pages)

    # ---------------------------------------------------------------- engine hooks

    def fault_at_parent(self, region: Region, page: int) -> None:
        """A child's fault on an AT_PARENT page (charged by the caller): map a
        copy of the source page, writable; the page is RESIDENT and dirty."""
        src = self.source[region]
        off = page << SHIFT
        ret = uffd.copy(region.uffd, region.addr + off, src.daddr + off, PAGE, 0)
        outcome = self.regions.ioctl_result(region, ret, "UFFDIO_COPY")
        if outcome != OK:  # the page stays AT_PARENT (or its region closed)
            self.regions.charged -= 1
            if outcome == AGAIN:  # fault again once the pending event is read
                uffd.wake(region.uffd, region.addr + off, PAGE)
            return
        self._unlink(region, src, np.array([page]))
        table = region.table
        table.move(page, pt.RESIDENT)
        table.flags[page] = pt.F_DIRTY
        table.stamp[page] = self.budget.advance_clock()
        self.copied += 1

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
        them; forget.py): children still reading them from here get
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
            self.slots.share(slots)
            ct = child.table
            # Invariant 9 (docs/design.md): the slot and its checksum are
            # stored before the state. Killed in between, the child's page is
            # AT_PARENT (adopted POISONED, its slot dropped); stored the other
            # way it was SWAPPED naming no slot, adopted EMPTY: zeros.
            ct.slot[at] = slots
            ct.sum[at] = table.sum[at]
            ct.move(at, np.where(slots >= 0, pt.SWAPPED, pt.EMPTY))
            ct.stamp[at] = self.regions.tick
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
            table.move(at, pt.EMPTY)

    # ---------------------------------------------------------------- internals

    def _resolve_source(self, region: Region) -> None:
        share = self.shares.get(region)
        if share is None:
            return
        self.before_write(region, np.flatnonzero(share.counts))
        if self.shares.pop(region, None) is not None:
            self._publish(region, None)

    def _copy_in(self, child: Region, src: Region, pages: np.ndarray) -> None:
        """Copy source pages into the child's memfd through the daemon's
        mappings; the child pages become RESIDENT and dirty (charged, over
        the budget if need be: reclaim evicts them), and its next access
        maps them with a MINOR fault. The source pages are resident (the
        AT_PARENT invariant), so reading them allocates nothing."""
        self.copy_pages(child, src, pages)
        self._unlink(child, src, pages)

    def copy_pages(self, child: Region, src: Region, pages: np.ndarray) -> None:
        """Copy `pages` of `src` into `child`: RESIDENT, dirty, charged. Links
        are the caller's: _copy_in drops them, fork.py's _child_of copies
        pages a load had already mapped, which never were AT_PARENT."""
        if len(pages) == 0:
            return
        ffi = native.ffi
        for first, n in pt.runs(pages, 1 << 30):
            off = first << SHIFT
            ffi.memmove(ffi.cast("char *", child.daddr + off), ffi.cast("char *", src.daddr + off), n << SHIFT)
        table = child.table
        table.move(pages, pt.RESIDENT)
        table.flags[pages] = pt.F_DIRTY
        table.slot[pages] = pt.NO_SLOT
        table.stamp[pages] = self.budget.advance_clock(len(pages))
        # The copy cannot wait for room (the source page is about to change
        # or go): forced, counted as overcommit where the budget is full.
        self.budget.charge(len(pages), force=True)
        self.copied += len(pages)

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
            self._publish(src, None)
