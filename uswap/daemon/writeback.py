"""Writeback: dirty pages written to adjacent slots of the store, then
dropped (punch.py) when the write returns; a failed write leaves its pages
resident and dirty and backs off (invariant 5), and its slots are
quarantined while the write may still land (invariant 3); the store is
probed to learn when it takes writes again.

reclaim.py picks the pages and calls start_writeback; the rest happens here.

Threads and lock: the engine thread write-protects and marks WRITEBACK
before the write is queued and applies its completion (_write_done), page
lock held (invariant 2). The I/O threads (C: cpool.py; Python: iopool.py)
checksum and write the pages, reading them through the daemon's mapping
(they are write-protected in the client), and change no page state.
"""
from __future__ import annotations

import errno
import time
from typing import Callable

import numpy as np

from uswap import native, uffd
from uswap.config import Config
from uswap.daemon import pagetable as pt
from uswap.daemon.cow import CopyOnWrite
from uswap.daemon.cpool import CPool
from uswap.daemon.dirtying import Dirtying
from uswap.daemon.forget import Forget
from uswap.daemon.iopool import IoPool
from uswap.daemon.punch import Puncher
from uswap.daemon.region import Region
from uswap.daemon.regionset import PAGE, SHIFT, RegionSet
from uswap.daemon.slots import SlotAllocator
from uswap.store.base import Store

# Largest write gathered from scattered pages (its bounce buffer's size).
GATHER_PAGES = 64


class Writeback:
    def __init__(self, cfg: Config, store: Store, regions: RegionSet, slots: SlotAllocator, cow: CopyOnWrite,
                 puncher: Puncher, forget: Forget, dirtying: Dirtying, io: IoPool, cpool: CPool | None) -> None:
        self.cfg = cfg
        self.store = store
        self.regions = regions
        self.slots = slots
        self.cow = cow  # children reading a written page move to its slot
        self.puncher = puncher  # written pages are dropped
        self.forget = forget  # pages unmapped while being written
        self.dirtying = dirtying  # writes parked during writeback, failed writes
        self.io = io
        self.cpool = cpool  # the C data path, or None (see engine.py)
        self.batch_pages = max(1, cfg.write_batch // PAGE)
        # Scattered dirty pages are gathered GATHER_PAGES at a time at most, so
        # their bounce buffers stay small whatever write_batch is.
        self.gather_pages = min(self.batch_pages, GATHER_PAGES)
        # Write bounce buffers, for scattered dirty pages gathered into one
        # write to adjacent slots (at most one per write in flight).
        self.write_buffers = [native.AlignedBuffer(self.gather_pages * PAGE)
                              for _ in range(min(cfg.max_inflight_writes, 32))]
        # The region's pages in its client's mlocked ranges now (a mask, or
        # None): set by reclaim.py, whose rule it is that they never leave memory.
        self.locked_pages: Callable[[Region], np.ndarray | None] = lambda region: None
        self.write_backoff = 0.0
        self.write_retry_at = 0.0  # no new writes before this (store in error backoff)
        self.store_full = False
        # Slot runs of failed writes that may still land: ([failed at, clock
        # start or None], first slot, count); see _release_failed_slots.
        self.quarantine: list[tuple[list, int, int]] = []
        self.quarantine_unsaved = False  # the state directory's copy is behind (_persist_quarantine)
        self.last_write_ok = 0.0
        self.store_no_space = False  # the last write failed with ENOSPC/EDQUOT
        self.probe_inflight = False
        self.probe_at = 0.0
        self.probe_buf = native.AlignedBuffer(PAGE)

    def start_writeback(self, region: Region, pages: np.ndarray, evict: bool = True) -> bool:
        """Write dirty pages (sorted; a run, or scattered) to adjacent slots
        and, when `evict`, drop them when the write returns; else (writeback
        ahead, cleaner.py) they stay resident, clean copies of their slots,
        ready to be dropped at once. Returns False when the store is full."""
        done = 0
        n = len(pages)
        while done < n:
            got = self.slots.alloc(n - done)
            if got is None:
                if not self.store_full:  # log the change of state, not every attempt
                    self.regions.errlog.error("swap store %s is full: pages stay resident until slots free up",
                                      self.store.url)
                self.store_full = True
                return False
            slot, count = got
            self.store_full = False
            part = pages[done:done + count]
            contiguous = int(part[-1]) - int(part[0]) == count - 1
            if not contiguous and not self.write_buffers:
                self.slots.free(slot, count)  # no gather buffer free: wait for a write to return
                return True
            # Invariant 1 (first half): write-protect BEFORE the copy is read,
            # so any write after this point faults and parks (invariant 4).
            # One C call for the part, one ioctl per run of adjacent pages
            # (scattered pages are runs of one: a Python call each cost the
            # engine, page lock held, most of the batch; docs/design.md 6.3).
            # (Should it stop at a page, the pages before it stay protected
            # and dirty, and un-protect on their next write fault.)
            _, ret = uffd.writeprotect_pages(region.uffd, region.addr, part, protect=True, wake=False)
            if ret < 0:
                self.regions.ioctl_result(region, ret, "UFFDIO_WRITEPROTECT")  # may close the region
                self.slots.free(slot, count)  # nothing was queued: the pages stay dirty, tried later
                return True
            # Invariant 2: the writeback bit is set here, on the engine thread
            # (the page lock), before the write is queued; only _write_done
            # clears it, when the write has returned.
            table = region.table
            table.move(part, pt.WRITEBACK)
            # F_DIRTY is cleared with the write queued: a write from here on
            # faults and parks (F_WAITERS), so it can never be lost with the
            # dirty bit (invariant 4). F_EVICT: drop the pages when it returns.
            table.flags[part] = pt.F_EVICT if evict else table.flags[part] & pt.F_ACTIVE
            table.slot[part] = np.arange(slot, slot + count, dtype=np.int32)
            if evict:
                self.regions.evicting += count
            else:
                self.regions.stats["pages_cleaned"] += count
            self.regions.writes_inflight += 1
            self.slots.start_write(slot, count)
            region.inflight += 1
            self._submit_write(region, part, slot, None if contiguous else self.write_buffers.pop())
            done += count
        return True

    def _submit_write(self, region: Region, pages: np.ndarray, slot: int, gather_buf) -> None:
        """Queue the store write of `pages` to slots slot.. : straight from the
        daemon's mapping for a run, or gathered into gather_buf first."""
        store = self.store
        n = len(pages)
        # Each page's checksum, and whether it is all zeros (an exact test
        # made in the same pass: a page whose checksum merely equals the zero
        # page's is data, and must keep its slot).
        sums = np.zeros(n, np.uint32)
        zero = np.zeros(n, np.uint8)
        gather = None
        if gather_buf is None:
            src = region.daddr + (int(pages[0]) << SHIFT)
        else:
            src = gather_buf.addr
            gather = (region.daddr + (pages.astype(np.uint64) << np.uint64(SHIFT))).astype(np.uint64)

        def on_done(res, err):
            if gather_buf is not None:
                self.write_buffers.append(gather_buf)
            self._write_done(region, pages, slot, res, err)

        if self.cpool is not None and self.cpool.sum_write(src, n * PAGE, slot * PAGE, sums, zero, on_done,
                                                           gather):
            return

        def work():
            # The pages are write-protected in the client and the daemon never
            # writes them, so the checksum and the write see the same bytes.
            if gather is not None:
                for i, addr in enumerate(gather.tolist()):
                    native.ffi.memmove(native.ffi.cast("char *", src + i * PAGE),
                                       native.ffi.cast("char *", addr), PAGE)
            native.page_sums_into(src, n, native.ffi.cast("uint32_t *", sums.ctypes.data),
                                  native.ffi.cast("uint8_t *", zero.ctypes.data))
            store.write(src, n * PAGE, slot * PAGE)
            return sums, zero

        self.io.submit(work, on_done)

    def _write_done(self, region: Region, pages: np.ndarray, slot: int,
                    result: tuple | None, err: OSError | None) -> None:
        self.regions.writes_inflight -= 1
        region.inflight -= 1
        table = region.table
        n = len(pages)
        self.slots.end_write(slot, n)  # the write returned, whatever its outcome
        if region.closing:
            # Invariant 7: a closed region's slots are freed only now that the
            # write returned (and, for a failed write that may land late, after quarantine).
            if err is None:
                self.slots.free(slot, n)
            else:
                self._release_failed_slots(slot, n, err)
            table.slot[pages] = pt.NO_SLOT
            table.move(pages, pt.EMPTY)
            self.regions.maybe_release(region)
            return
        flags = table.flags[pages]
        # Pages written to be evicted (F_EVICT; a page written ahead by
        # cleaner.py gains it when reclaim takes it meanwhile, Reclaim._evict).
        evict = (flags & pt.F_EVICT) != 0
        self.regions.evicting -= int(np.count_nonzero(evict))
        waiters = (flags & pt.F_WAITERS) != 0
        # Unmapped by the client while being written (F_DISCARD): forgotten below.
        discard = (flags & pt.F_DISCARD) != 0
        if err is not None:
            # Invariant 5: a failed write leaves the pages resident, dirty and
            # writable, with no error state; they are retried after a backoff.
            self.regions.stats["write_errors"] += 1
            self.regions.errlog.error("write error on swap store (offset %d, %d pages): %s", slot * PAGE, n, err)
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                self.store_no_space = True  # the server's disk is full (a sparse file on NFS)
            self.write_backoff = min(self.cfg.write_retry_max,
                                     max(self.cfg.write_retry_min, self.write_backoff * 2))
            self.write_retry_at = time.monotonic() + self.write_backoff
            self.regions.after(self.write_backoff, lambda: None)  # wake the loop to retry reclaim
            # Invariant 9: the whole run is released -- quarantined and the
            # quarantine in the state directory, when the write may land late
            # -- BEFORE any table forgets a slot of it, discarded pages' too.
            # Killed in between, a successor finds each slot of the run named
            # by a WRITEBACK page (which adoption quarantines) or in
            # quarantine.json, never free for new data a late write of the
            # dead daemon can still overwrite (a rewrite of quarantine.json
            # that failed is marked so: _persist_quarantine).
            self._release_failed_slots(slot, n, err)
            table.slot[pages] = pt.NO_SLOT
            table.flags[pages] = pt.F_DIRTY
        else:
            self.write_backoff = 0.0
            self.store_no_space = False
            self.last_write_ok = time.monotonic()
            self.regions.stats["pages_written"] += int(np.count_nonzero(~discard))
            sums, all_zero = result
            # The checksums before the state: a page left clean RESIDENT names
            # its slot copy's checksum (adoption compares the two).
            table.sum[pages] = sums
            table.flags[pages] &= pt.F_ACTIVE  # a page written ahead stays active (F_EVICT ones had only that)
        # Invariant 2: the writeback bit is cleared, for the whole run at once,
        # BEFORE anything below that may close the region (forget_pages; an
        # ioctl finding the client gone, RegionSet.close_region). A close then
        # finds only resident pages: it frees their slots and uncharges them
        # as any resident page's, and no page is left WRITEBACK in a closed
        # region with a slot only this handler would free, nor F_EVICT ones
        # close_region would take off regions.evicting a second time.
        table.move(pages, pt.RESIDENT)
        if discard.any():
            # Now that the write has returned (invariant 3) the pages the
            # client unmapped meanwhile are forgotten: punched, slots freed.
            self.forget.forget_pages(region, pages[discard])
            if region.closing:
                return  # close_region released what the run's other pages hold
            keep = ~discard
            pages, evict, waiters = pages[keep], evict[keep], waiters[keep]
            if err is None:
                all_zero = all_zero[keep]
        if err is not None:
            self.dirtying.unprotect_runs(region, pages)
            return
        for i in np.flatnonzero(waiters):
            # A write was parked during writeback: let it through now.
            self.dirtying.make_dirty(region, int(pages[i]))
            if region.closing:
                return
        # A page written ahead (no F_EVICT) stays resident, clean: reclaim's
        # victim ready to be dropped without waiting for a write (cleaner.py).
        keep = waiters | ~evict
        # Asked only when a page would go: the ranges are a read of the
        # client's /proc/PID/status (and smaps once they change), ~10 us,
        # and a write ahead (cleaner.py) drops nothing -- on a first-touch
        # stream, nearly every write (a third of the engine's /proc reads).
        locked = self.locked_pages(region) if not keep.all() else None
        if locked is not None:
            # Invariant (mlocked ranges, victims.py): a victim mlocked while its
            # write was in flight stays, a clean resident page with its slot; a
            # punch now would lose what pinned I/O into it writes from here on.
            keep |= locked[pages]
        drop = pages[~keep]
        # All-zero pages need no slot: dropped, they go EMPTY and read back as
        # zeros; kept (written ahead by cleaner.py, or mlocked) they stay clean
        # zero pages with no slot, which reclaim later drops to EMPTY as it
        # drops a zero fill's -- never to SWAPPED on a slot of zeros (a slot
        # and a store read spent on zeros, and a stray write into the memfd
        # over a never-written page lost to the "slot copy", faults.py).
        # Pages with a write let through are dirty already, their slots freed.
        zero = pages[(all_zero != 0) & ~waiters]
        if len(zero):
            self.slots.free_many(table.slot[zero].copy())
            table.slot[zero] = pt.NO_SLOT
        # Forked children reading these pages from here now share their slots:
        # the kept ones too (invariant AT_PARENT, cow.py). A page kept because
        # it is mlocked is a clean page like any other, dropped without a hook
        # once unlocked; a child left AT_PARENT would then read a punched hole
        # (and fill the parent's memfd with zeros through the daemon's mapping).
        # Pages kept for a parked write were copied into the children by make_dirty.
        self.cow.parent_clean(region, pages[~waiters])
        if len(drop):
            # Invariant 1 (second half): these pages were write-protected before
            # the copy was read and no write reached them (it would have parked
            # as F_WAITERS), so the copy on the store is current: drop them.
            self.puncher.drop(region, drop)

    def _release_failed_slots(self, slot: int, n: int, err: OSError) -> None:
        """Invariant 3 after a failed write: the call has returned, but on a
        store where a failed write may still be executed later (NFS: a request
        that timed out or lost its connection can sit in the server's queue,
        and a soft mount's EIO says as little), its slots must not take new
        data that the late write could overwrite. The store decides from the
        error (Store.write_may_land_late): such slots are quarantined; a
        refusal (no space, read-only...) or a store where nothing outlives
        the call frees them at once."""
        if not self.store.write_may_land_late(err):
            self.slots.free(slot, n)
            return
        self.quarantine_run(slot, n)

    def quarantine_run(self, slot: int, n: int) -> None:
        """Keep the run of slots (one reference each, the caller's) from new
        data until a write the store accepts after now, plus slot_quarantine:
        a write to it may still land (a failed NFS write; adoption.py: a write
        a dead daemon left in flight)."""
        self.quarantine_runs([(slot, n)])

    def quarantine_runs(self, runs: list[tuple[int, int]]) -> None:
        """quarantine_run for each (first slot, count), the state directory
        written once for all of them (adoption quarantines thousands)."""
        if not runs:
            return
        now = time.monotonic()
        for slot, n in runs:
            self.quarantine.append(([now, None], slot, n))
        self._persist_quarantine()

    def _persist_quarantine(self) -> None:
        """Invariant 9 (docs/design.md), the quarantine's part: no table
        names a quarantined slot, so the runs held are written to the state
        directory whenever they change (statedir.py, atomically), and a
        successor -- after one death or several in a row -- holds them again
        (Adoption.load) instead of handing out a slot a late write of a dead
        daemon can still overwrite."""
        statedir = self.regions.statedir
        if statedir is not None:
            # Not written (no fd left, tmpfs full): tried again at each
            # settle until it is (engine.py). Meanwhile the file names the
            # runs held before, and a run added since is named nowhere once
            # _write_done clears its slots from the table: save_quarantine
            # has marked the file behind (quarantine-ID.unsaved, which cannot
            # fail), and a successor then holds every slot of the store.
            self.quarantine_unsaved = not statedir.save_quarantine([(slot, n) for _, slot, n in self.quarantine])

    def expire_quarantine(self) -> None:
        """A quarantined run's clock starts at the first write the store
        accepted after the failure (a late write cannot be expected before
        the store takes writes again: a server frozen for an hour executes
        its queue when it thaws), and the run is freed slot_quarantine after
        that. The clock start is taken as last_write_ok when first seen here
        (settle runs after every batch of completions), never earlier than
        the success itself. While some run still waits for a success, the
        store is probed."""
        now = time.monotonic()
        keep = []
        waiting = False
        for clock, slot, n in self.quarantine:
            failed_at, since = clock
            if since is None and self.last_write_ok > failed_at:
                clock[1] = since = self.last_write_ok
                self.regions.after(max(0.0, since + self.cfg.slot_quarantine - now), lambda: None)  # wake to free it
            if since is not None and now - since >= self.cfg.slot_quarantine:
                self.slots.free(slot, n)
            else:
                keep.append((clock, slot, n))
                waiting = waiting or since is None
        freed = len(keep) < len(self.quarantine)
        self.quarantine = keep
        if freed or self.quarantine_unsaved:
            self._persist_quarantine()
        if waiting:
            self._probe_store(now)

    def _probe_store(self, now: float) -> None:
        """No write has succeeded since some quarantined ones failed, and with
        slots scarce none may be attempted: rewrite the header page (slot 0,
        never allocated) to learn when the store takes writes again (its
        success starts the quarantine clock, see expire_quarantine)."""
        if self.probe_inflight or now < self.probe_at:
            return
        self.probe_inflight = True
        store, buf = self.store, self.probe_buf

        def work():
            store.read(buf.addr, PAGE, 0)
            store.write(buf.addr, PAGE, 0)

        def done(result, err):
            self.probe_inflight = False
            if err is None:
                self.last_write_ok = time.monotonic()
            else:
                self.regions.stats["write_errors"] += 1  # a store write that failed, like any other
                self.probe_at = time.monotonic() + self.cfg.write_retry_max
                self.regions.after(self.cfg.write_retry_max, lambda: None)

        self.io.submit(work, done)

    def is_store_full(self) -> bool:
        """Now, not as of the last allocation: no free slot, or the server's
        disk refused the last write for lack of space."""
        return self.slots.used >= self.slots.capacity or self.store_no_space
