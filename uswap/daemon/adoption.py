"""Adoption: a daemon started on the state directory (statedir.py) of one that
died (crash, SIGKILL) or handed over takes its regions on (docs/design.md
section 9).

At start (`load`, before the daemon is ready) every region the directory
holds becomes an *orphan*: its page table is mapped again, and the slots it
names are claimed, so slot ownership is what the tables say (a table
damaged from outside -- a slot outside the store or named at two of its
pages -- is refused whole, the slots of its writes in flight quarantined:
_hold_damaged_writes). An orphan waits
up to `adopt_timeout` for its client, whose connection broke when the old
daemon died, to reconnect and send the region's uffd and memfd again (the
`adopt` op, adoptop.py; uswap/client.py does it by itself). Then `reclaim`
checks that the fds are the region's, resolves every page the old daemon
left in a transient state from what is really in the memfd (resolve.py), and
the region goes live as under its old id; threads parked in the old daemon
are woken to fault again. An orphan not reclaimed in time is dropped: its
slots are freed and its files removed, logged.

Thread and lock: engine thread, page lock held.
"""
from __future__ import annotations

import logging
import os
import time

import numpy as np

from uswap import native, uffd
from uswap.config import Config
from uswap.daemon import pagetable as pt
from uswap.daemon.dirtying import Dirtying
from uswap.daemon.forget import Forget
from uswap.daemon.punch import Puncher
from uswap.daemon.region import Region, RegionRefused, check_region_fds, check_same_uffd
from uswap.daemon.regionset import PAGE, RegionSet
from uswap.daemon.resolve import Resolver
from uswap.daemon.slots import RESERVED, SlotAllocator
from uswap.daemon.statedir import StateDir
from uswap.daemon.writeback import Writeback

log = logging.getLogger("uswap.engine")

# Each daemon start gives the orphans' clients at least this long (or half
# of adopt_timeout, if less) to come back, whatever their clock says: while
# no daemon ran, a live client could not reconnect (its keeper retries every
# second at most, for 600 s), and dropping its region at once would lose its
# memory. Short, so a daemon crash-looping still drops dead clients' regions.
ADOPT_GRACE = 5.0


class Orphan:
    """A region of a dead daemon waiting for its client."""
    __slots__ = ("meta", "table")

    def __init__(self, meta: dict, table: pt.PageTable) -> None:
        self.meta = meta
        self.table = table


class Adoption:
    def __init__(self, cfg: Config, regions: RegionSet, slots: SlotAllocator, dirtying: Dirtying,
                 writeback: Writeback, puncher: Puncher, forget: Forget, statedir: StateDir | None) -> None:
        self.cfg = cfg
        self.regions = regions
        self.slots = slots
        self.dirtying = dirtying  # un-protecting pages resolved dirty
        self.writeback = writeback  # quarantine of slots a dead write may still reach
        self.puncher = puncher  # punches the dead daemon did not make, made again
        self.forget = forget  # pages the client discarded while the dead daemon's I/O was in flight
        self.statedir = statedir
        self.resolver = Resolver(regions, slots, writeback)  # the dead daemon's transient states
        # Pages of a region whose punch is made again once it is live (resolve -> after_live).
        self.repunch: dict[int, np.ndarray] = {}
        # Pages of a region the client discarded during I/O of the dead
        # daemon (F_DISCARD): forgotten once it is live (resolve -> after_live).
        self.discarded: dict[int, np.ndarray] = {}
        self.orphans: dict[int, Orphan] = {}
        self.found = 0  # regions the state directory held at start
        self.adopted = 0  # reclaimed by their clients: adopted_regions_total
        self.dropped = 0  # not reclaimed in time, or unusable
        self.ready_at: float | None = None
        self.grace_until = float("inf")  # set by start (no orphan is dropped before)
        self.seconds: float | None = None  # ready -> the last orphan reclaimed (or dropped)

    # ---------------------------------------------------------------- at start

    def load(self) -> None:
        """Take on every region the state directory holds, as orphans."""
        if self.statedir is None:
            return
        # The previous daemon's quarantine file is behind (a rewrite failed
        # before it died): the marker stays "1" until the step at the end
        # below has held every slot no table names, whatever is saved
        # before (a save of what is known so far must not clear it).
        incomplete = self.statedir.quarantine_incomplete()
        self.statedir.keep_unsaved_mark(incomplete)
        # Slots the previous daemon held in quarantine (a write of its, or
        # of a daemon before it, may still land there): held again, their
        # clock started anew (writeback.py _persist_quarantine).
        held = []
        for slot, n in self.statedir.quarantine():
            try:
                self.slots.claim_run(slot, n)
            except (ValueError, OverflowError) as e:
                log.error("adoption: quarantined slots %d..%d of the previous daemon: %s", slot, slot + n - 1, e)
                continue
            held.append((slot, n))
        self.writeback.quarantine_runs(held)
        for meta in self.statedir.orphans():
            rid = meta["id"]
            table = None
            try:
                table = pt.PageTable.load(self.statedir.table_path(rid), int(meta["npages"]))
                table.region_id = rid
                self._keep_only_copies(table)
                if meta.get("closing"):
                    # Freed (its client was answered) and not adoptable, but
                    # a write it had in flight may still land: quarantined.
                    self.slots.claim(np.where(table.state == pt.WRITEBACK, table.slot, pt.NO_SLOT))
                    self.resolver.quarantine_writes(table)
                    self._remove_files(rid)
                    continue
                self.slots.claim(table.slot)
            except (OSError, ValueError, KeyError, OverflowError) as e:
                # A damaged table (a slot outside the store, or named at two
                # pages: SlotAllocator.claim; or past MAX_REFS tables) is not
                # trusted for any page, and never stops the daemon.
                log.error("adoption: region %d of the previous daemon cannot be adopted: %s; its pages are lost",
                          rid, e)
                if table is not None:
                    self._hold_damaged_writes(rid, table)
                self._remove_files(rid)
                self.dropped += 1
                continue
            self.orphans[rid] = Orphan(meta, table)
            self.statedir.mark_orphaned(meta)
            self.regions.next_region_id = max(self.regions.next_region_id, rid + 1)
            if table.npages:
                # The clock goes on from the dead daemon's: stamps stay comparable.
                self.regions.tick = max(self.regions.tick, int(table.stamp.max()) + 1)
        self.found = len(self.orphans)
        if incomplete:
            # Invariant 9 with the file behind: a run the dead daemon
            # quarantined without saving is named nowhere, so every slot is
            # held (one run over the store, SlotAllocator.claim_free), as if
            # a late write could reach it.
            # Costly (no new slot until a write succeeds plus
            # slot_quarantine), and only after a failed rewrite and a death.
            unnamed = self.slots.capacity - self.slots.used
            runs = self.slots.claim_free()
            log.warning("adoption: the previous daemon could not record its whole quarantine in %s before it"
                        " died: every slot no page table names (%d) is held for slot_quarantine after the"
                        " store's next accepted write", self.statedir.path, unnamed)
            self.statedir.keep_unsaved_mark(False)
            self.writeback.quarantine_runs(runs)

    def _hold_damaged_writes(self, rid: int, table: pt.PageTable) -> None:
        """A table refused as damaged claims nothing, but a write of the
        dead daemon to a slot its WRITEBACK pages name may still land
        (nfs://): each such slot inside the store is quarantined once (one
        reference, however many of its pages name it), as for a dropped
        orphan, so no new page is written there before the quarantine ends."""
        wb = table.slot[(table.state == pt.WRITEBACK) & (table.slot >= RESERVED) & (table.slot < self.slots.nslots)]
        held = []
        for slot in np.unique(wb).tolist():
            try:
                self.slots.claim_run(slot, 1)
            except OverflowError as e:
                log.error("adoption: region %d: slot %d of a write in flight cannot be held: %s", rid, slot, e)
                continue
            held.append((slot, 1))
        if held:
            log.warning("adoption: region %d: %d slots its writes in flight name are quarantined", rid, len(held))
        self.writeback.quarantine_runs(held)

    @staticmethod
    def _keep_only_copies(table: pt.PageTable) -> None:
        """Invariant 9 (docs/design.md), second half, enforced here before
        any slot is claimed. A slot stays named only where it holds the page's copy: SWAPPED,
        LOADING and PUNCHING pages, clean RESIDENT ones, and WRITEBACK ones
        (whose slot is quarantined, then freed, by resolve). Anywhere else a
        slot is the trace of a transition the dead daemon did not finish (a
        slot about to be freed by a first write, by a forget): it is dropped
        before the slots are claimed, so it is free again. A SWAPPED page
        with no slot has nothing to come back from: EMPTY (its forget was
        under way)."""
        st, slot = table.state, table.slot
        clean_resident = (st == pt.RESIDENT) & ((table.flags & pt.F_DIRTY) == 0)
        keeps = (st == pt.SWAPPED) | (st == pt.LOADING) | (st == pt.PUNCHING) | (st == pt.WRITEBACK) | clean_resident
        slot[~keeps] = pt.NO_SLOT
        lost = np.flatnonzero((st == pt.SWAPPED) & (slot < 0))
        if len(lost):
            table.move(lost, pt.EMPTY)

    def start(self) -> None:
        """The daemon is ready: each orphan is dropped adopt_timeout after it
        became one (statedir.mark_orphaned: at the first successor's start,
        not at this one's)."""
        self.ready_at = time.monotonic()
        self.grace_until = time.clock_gettime(time.CLOCK_BOOTTIME) + min(ADOPT_GRACE, self.cfg.adopt_timeout / 2)
        if not self.orphans:
            return
        pages = sum(o.table.npages for o in self.orphans.values())
        log.info("adoption: %d regions (%d pages) of the previous daemon wait for their clients"
                 " (adopt_timeout %gs, the first dropped in %.1fs)", len(self.orphans), pages,
                 self.cfg.adopt_timeout, self.deadline_s())
        self._expire()

    def _deadline(self, orphan: Orphan) -> float:
        """When the orphan is dropped (CLOCK_BOOTTIME): adopt_timeout after it
        became one, and not before this start's grace (ADOPT_GRACE) is over."""
        return max(float(orphan.meta["orphaned_at"]) + self.cfg.adopt_timeout, self.grace_until)

    def deadline_s(self) -> float | None:
        """Seconds until the first orphan is dropped (None: none waits)."""
        if not self.orphans:
            return None
        now = time.clock_gettime(time.CLOCK_BOOTTIME)
        return max(0.0, min(map(self._deadline, self.orphans.values())) - now)

    def _expire(self) -> None:
        """Drop the orphans whose time is up; look again when the next one's is."""
        now = time.clock_gettime(time.CLOCK_BOOTTIME)
        for rid in [rid for rid, o in self.orphans.items() if self._deadline(o) <= now]:
            orphan = self._drop(rid)
            log.warning("adoption: region %d (pid %s, %d bytes) was not reclaimed within adopt_timeout"
                        " %gs: dropped, its slots freed", rid, orphan.meta.get("pid"), orphan.meta.get("size"),
                        self.cfg.adopt_timeout)
        left = self.deadline_s()
        if left is not None:
            self.regions.after(left, self._expire)
        self._maybe_done()

    def _drop(self, rid: int) -> Orphan:
        orphan = self.orphans.pop(rid)
        self.resolver.quarantine_writes(orphan.table)  # its WRITEBACK slots: a dead write may still land
        self.slots.free_many(orphan.table.slot)
        self._remove_files(rid)
        self.dropped += 1
        return orphan

    def drop_freed(self, rid: int, pid: int) -> None:
        """A free the dead daemon never saw, sent again by its client: the
        orphan `rid`, if it waits here and process `pid` made it, is dropped
        now, its slots freed. Only its own process: another (even of its
        uid, or root) would drop a live region whose client has not
        reconnected yet."""
        orphan = self.orphans.get(rid)
        if orphan is None or orphan.meta["pid"] != pid:
            return
        self._drop(rid)
        log.info("adoption: region %d freed by its client while no daemon ran: dropped, its slots freed", rid)
        self._maybe_done()

    def _remove_files(self, rid: int) -> None:
        for path in (self.statedir.meta_path(rid), self.statedir.table_path(rid)):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def _maybe_done(self) -> None:
        if self.orphans or self.seconds is not None or not self.found:
            return
        self.seconds = time.monotonic() - (self.ready_at or time.monotonic())
        log.info("adoption: done in %.3fs (ready -> last region): %d of %d regions reclaimed, %d dropped",
                 self.seconds, self.adopted, self.found, self.dropped)

    # ---------------------------------------------------------------- reclaim

    def waiting(self) -> list[int]:
        return sorted(self.orphans)

    def orphan_of_memfd(self, memfd: int) -> Orphan | None:
        """The orphan whose memfd `memfd` is (same inode), if any: an alloc
        the dead daemon made but never answered, which the client repeats
        (client.py _again_on_the_next_daemon)."""
        try:
            st = os.fstat(memfd)
        except OSError:
            return None
        for orphan in self.orphans.values():
            if orphan.meta["memfd"] == [st.st_dev, st.st_ino]:
                return orphan
        return None

    def check(self, entry: object, uffd_fd: int, memfd: int, uid: int) -> Orphan:
        """The orphan `entry` ({"id", "addr", "size"}) names, if the fds and
        the sender are the region's; else RegionRefused naming what differs."""
        if not isinstance(entry, dict):
            raise RegionRefused(f"adopt: region {entry!r} is not an object with id, addr and size")
        rid = entry.get("id")
        orphan = self.orphans.get(rid) if isinstance(rid, int) and not isinstance(rid, bool) else None
        if orphan is None:
            raise RegionRefused(f"adopt: no region {rid!r} waits for adoption here (waiting: {self.waiting()})")
        meta = orphan.meta
        for key in ("addr", "size"):
            if entry.get(key) != meta[key]:
                raise RegionRefused(f"adopt: region {rid}: {key} {entry.get(key)!r} is not the region's {meta[key]}")
        if uid != meta["uid"] and uid != 0:
            raise RegionRefused(f"adopt: region {rid} belongs to uid {meta['uid']}, not to uid {uid}")
        st = check_region_fds(uffd_fd, memfd, "adopt")
        if [st.st_dev, st.st_ino] != meta["memfd"]:
            raise RegionRefused(f"adopt: region {rid}: the memfd sent is not the region's memfd")
        return orphan

    def reclaim(self, orphan: Orphan, uffd_fd: int, memfd: int, owner: object,
                parts: list[tuple[int, int]]) -> Region:
        """Make the orphan a live Region on the client's fds (checked by
        `check` and the registration checks of each of `parts`, the runs of
        pages the client maps: region.mapped_parts); the caller adds it to
        the engine and calls after_live with the runs outside `parts`."""
        meta = orphan.meta
        for first, n in parts:
            check_same_uffd(uffd_fd, meta["addr"] + first * PAGE, n * PAGE)
        region = Region(uffd_fd, memfd, meta["addr"], meta["size"], owner)
        region.table = orphan.table
        region.id = meta["id"]
        try:
            region.daddr = native.map_client_view(memfd, region.size)
        except OSError as e:
            raise RegionRefused(f"adopt: cannot map the memfd: {e.strerror}") from None
        self.statedir.adopted(meta)
        del self.orphans[region.id]
        again, discarded = self.resolver.resolve(region)
        if len(again):
            self.repunch[region.id] = again
        if len(discarded):
            self.discarded[region.id] = discarded
        self.adopted += 1
        return region

    def after_live(self, region: Region, unmapped: list[tuple[int, int]] = ()) -> None:
        """The region is served: the dead daemon's punches made again; the
        runs (first, n) of `unmapped` (the pages outside the parts the
        client maps: reclaim) and the pages the client discarded during the
        dead daemon's I/O forgotten; writes let through on its dirty pages;
        and every thread the dead daemon left parked on it woken to fault
        again (into this daemon)."""
        table = region.table
        again = self.repunch.pop(region.id, None)
        if again is not None and len(again):
            self.puncher.punch(region, again, evicted=True)
        # Forgotten after the punches above are made, by the shared forget
        # (forget.py): a page being punched again is PUNCHING there, marked
        # F_DISCARD and forgotten when its punch returns (forgotten before,
        # as SWAPPED, it stayed charged and in the memfd).
        for first, n in unmapped:
            self.forget.forget_range(region, first, n)
        discarded = self.discarded.pop(region.id, None)
        if discarded is not None:
            # The discard (or unmap) the dead daemon had begun, finished as
            # its I/O's completion would have. A discard the client sends
            # again finds the pages EMPTY.
            for first, n in pt.runs(discarded, 1 << 30):
                self.forget.forget_range(region, first, n, cause="discarded during the previous daemon's I/O")
        dirty = np.flatnonzero((table.state == pt.RESIDENT) & ((table.flags & pt.F_DIRTY) != 0))
        if len(dirty):
            self.dirtying.unprotect_runs(region, dirty)
        uffd.wake(region.uffd, region.addr, region.size)
        self._maybe_done()

    def status(self) -> dict:
        return {"adopted_regions_total": self.adopted, "adoption_waiting": len(self.orphans),
                "adoption_dropped_total": self.dropped,
                "adoption_deadline_s": None if (left := self.deadline_s()) is None else round(left, 3),
                "adoption_seconds": None if self.seconds is None else round(self.seconds, 3)}
