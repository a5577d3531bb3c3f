"""The swap engine: the composition of its stages, one module each, and the
loop glue the server calls.

Data flow (each stage gets, at construction, the state it shares and the
stages it calls; none imports one above it):

  regionset  the regions, shared counters, timers, what an ioctl's failure means
  punch      clean pages punched out of the memfd (eviction, forgets)
  budget     charging pages, the clock, faults waiting for room
  cow        pages forked children still read from their parent (cow.py)
  forget     pages the client unmapped
  discard    pages the client discards (MADV_DONTNEED): forgotten, answered once gone
  dirtying   letting writes through (first write, un-protect)
  swapin     loads: reads back, their completions, retries, poison
  readahead  which pages a swap-in fault's load covers; a stream's windows ahead
  faults     what each fault event means; calls readahead, dirtying, forget
  writeback  dirty pages to the store, failures, quarantine
  reclaim    victims to punch or write back, under the watermarks
  cleaner    background writeback: reclaim's next victims written ahead, kept clean
  shares     each uid's resident pages under max_resident_per_uid (its own evicted)
  drain      swapoff: every page home, regions handed back
  fork       fork requests: snapshots of a parent's regions for its child (fork.py)

The page lock (docs/design.md section 3): every page state transition is
made by a thread holding the fast path's mutex. The engine thread holds it
whenever it runs (it lets go only between two steps: in epoll_wait and
while it reads a uffd, server.py, and while it reads a client's smaps,
golive.py); the fast path's C fault
threads take it to decide and to finish (native/fastpath.c). I/O and punch
threads change no page state: their completions are applied by the stage
that submitted the job, on the engine thread, under the lock
(on_completions). That is how invariant 2 is enforced without a lock per
page.

States and flags are in pagetable.py. The invariants of docs/design.md
section 5 are named in comments at the one place each is enforced.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np

from uswap import uffd
from uswap.config import Config
from uswap.daemon import fastpath, latency, readmap
from uswap.daemon import pagetable as pt
from uswap.daemon.adoption import Adoption
from uswap.daemon.budget import Budget
from uswap.daemon.cleaner import Cleaner
from uswap.daemon.cow import CopyOnWrite
from uswap.daemon.cpool import CPool
from uswap.daemon.dirtying import Dirtying
from uswap.daemon.discard import Discard
from uswap.daemon.drain import Drain
from uswap.daemon.faults import Faults
from uswap.daemon.forget import Forget
from uswap.daemon.fork import ForkManager
from uswap.daemon.iopool import IoPool
from uswap.daemon.punch import Puncher
from uswap.daemon.readahead import ReadAhead
from uswap.daemon.reclaim import Reclaim
from uswap.daemon.shares import Shares
from uswap.daemon.region import Region
from uswap.daemon.regionset import PAGE, RegionSet
from uswap.daemon.slots import SlotAllocator
from uswap.daemon.statedir import StateDir
from uswap.daemon.swapin import SwapIn
from uswap.daemon.writeback import Writeback
from uswap.store.base import NativeIo, Store

PUNCH_THREADS = 2


class Engine:
    def __init__(self, cfg: Config, store: Store, statedir: StateDir | None = None) -> None:
        """`statedir`: where the regions' tables are kept for a successor, and
        what a dead predecessor left there to adopt (adoption.py)."""
        self.cfg = cfg
        self.store = store
        self.slots = SlotAllocator(store.size_bytes // PAGE)
        self.io = IoPool(cfg.io_threads)
        # Punches (punch.py) have threads of their own: one may wait for a
        # client's memfd inode lock while that client's fault waits for a
        # store job, which must never queue behind it on the same threads.
        self.punch_io = IoPool(PUNCH_THREADS, self.io, "punch")
        # The store's data path, chosen here once for every stage: a store
        # that declares native I/O (Store.native_io: the file and nfs://
        # stores) has its data path run on C threads that never take the GIL
        # (see native/iopool.c for the measurement that moved it there);
        # other stores (fault injection) run on the Python pool, and so does
        # an nfs:// job when no lent NFS context is idle.
        native_io = store.native_io()
        self.cpool = (CPool(cfg.io_threads, self.io.eventfd, store)
                      if native_io is not None else None)
        # Random swap-ins and zero fills are served on the fast path's C threads when the
        # store has a C data path (native/fastpath.c); those threads share
        # `charged`, `tick` and the page tables under the lock that this
        # engine holds whenever it runs (see lock()).
        self.fp = (fastpath.FastPath(cfg.fault_threads, self.io.eventfd, store)
                   if self.cpool is not None and cfg.fault_threads > 0 else None)
        shared = self.fp.shared if self.fp is not None else fastpath.plain_shared()
        if self.fp is not None and native_io.kind == NativeIo.NFS:
            native_io.lender.lend(cfg.io_threads + cfg.fault_threads)
        # Pages holding memory or about to: RESIDENT + WRITEBACK + LOADING + PUNCHING.
        shared.charged = 0
        shared.tick = 1

        # The stages, each built from the ones it calls (bottom up).
        rs = self.region_set = RegionSet(cfg, self.slots, self.fp, shared)
        self.puncher = Puncher(rs, self.slots, self.punch_io)
        self.budget = Budget(cfg, rs, self.puncher)
        # Forked children's copies of regions, copy-on-write (daemon/cow.py).
        self.cow = CopyOnWrite(rs, self.budget, self.slots)
        rs.before_close = self.cow.on_region_closing  # the one call back up: see RegionSet
        self.forget = Forget(rs, self.slots, self.cow, self.puncher)
        self.discard = Discard(rs, self.forget)
        self.dirtying = Dirtying(rs, self.slots, self.budget, self.cow)
        self.swapin = SwapIn(cfg, store, rs, self.slots, self.budget, self.forget, self.dirtying,
                             self.io, self.cpool)
        self.readahead = ReadAhead(rs, self.slots, self.budget, self.swapin)
        self.faults = Faults(rs, self.slots, self.budget, self.cow, self.puncher, self.forget,
                             self.dirtying, self.readahead)
        self.writeback = Writeback(cfg, store, rs, self.slots, self.cow, self.puncher, self.forget,
                                   self.dirtying, self.io, self.cpool)
        self.reclaimer = Reclaim(cfg, rs, self.budget, self.puncher, self.writeback)
        self.cleaner = Cleaner(cfg, rs, self.budget, self.reclaimer, self.writeback)
        self.shares = Shares(cfg.max_resident_per_uid, rs, self.reclaimer)
        self.drainer = Drain(rs, self.cow, self.puncher, self.swapin)
        # Fork requests and their pending snapshots (daemon/fork.py), served by forkops.py.
        self.fork = ForkManager(rs, self.slots, self.cow)
        # Regions a dead daemon left in the state directory (adoption.py):
        # their slots are claimed before any is handed out.
        rs.statedir = statedir
        self.adoption = Adoption(cfg, rs, self.slots, self.dirtying, self.writeback, self.puncher, self.forget,
                                 statedir)
        self.adoption.load()
        if self.fp is not None:
            self.fp.configure(self.budget.max_pages, self.budget.high_pages, self.budget.clean_pages,
                              self.swapin.ra_pages, self.swapin.ra_max_pages)

    def set_budget(self, cfg: Config) -> None:
        """Apply `cfg`'s max_resident and watermarks to the running daemon
        (SIGHUP, `uswap budget`, max_resident: auto; autobudget.py): the engine's budget and the fast path's copy of it, both
        changed under the page lock, which the caller holds."""
        self.budget.set_limits(cfg)
        self.reclaimer.budget_changed()
        if self.fp is not None:
            self.fp.set_budget(self.budget.max_pages, self.budget.high_pages, self.budget.clean_pages)

    # ------------------------------------------------------------------ the server's interface

    @property
    def regions(self) -> dict[int, Region]:
        """The live regions by id."""
        return self.region_set.by_id

    @property
    def draining(self) -> bool:
        return self.region_set.draining

    @property
    def on_region_closing(self) -> Callable[[Region], None] | None:
        return self.region_set.on_region_closing

    @on_region_closing.setter
    def on_region_closing(self, hook: Callable[[Region], None] | None) -> None:
        """Set by the server: stop watching a region's uffd before its fds close."""
        self.region_set.on_region_closing = hook

    def add_region(self, region: Region) -> bool:
        return self.region_set.add_region(region)

    def close_region(self, region: Region, reason: str) -> None:
        self.region_set.close_region(region, reason)

    def forget_range(self, region: Region, first: int, n: int) -> None:
        self.forget.forget_range(region, first, n)

    def on_events(self, region: Region, events: list) -> None:
        self.faults.on_events(region, events)

    def reclaim(self) -> bool:
        return self.reclaimer.reclaim()

    def serve_budget_waiters(self) -> None:
        self.budget.serve_budget_waiters(self.faults.fault_missing)

    def start_drain(self) -> None:
        self.drainer.start_drain()

    def drain_done(self) -> bool:
        return self.drainer.drain_done()

    def hand_back_all(self) -> None:
        self.drainer.hand_back_all()

    def run_timers(self) -> float | None:
        return self.region_set.run_timers()

    def is_store_full(self) -> bool:
        return self.writeback.is_store_full()

    def lock(self) -> None:
        """Take the page lock from the fast path's threads: the server holds
        it whenever the engine runs, and lets go only between two steps: in
        epoll_wait, and while it reads a uffd (server.py) or a client's
        /proc/PID/smaps (golive.py, adoptop.py)."""
        if self.fp is not None:
            self.fp.lock()

    def unlock(self) -> None:
        if self.fp is not None:
            self.fp.unlock()

    def stop_fast_path(self) -> None:
        """After drain, with the lock released: join the fast path's threads;
        the shared counters are copied back into Python first."""
        if self.fp is not None:
            sh = self.region_set.shared
            self.region_set.shared = fastpath.plain_shared()
            for name in ("charged", "tick", "inflight", "faults", "swapins", "activations", "minor_faults",
                         "present_replaced", "illegal_transitions", "wakeups"):
                setattr(self.region_set.shared, name, getattr(sh, name))
            self.region_set.shared.handed = list(sh.handed)
            for name in ("swapin_latency", "fault_latency", "lock_wait"):
                setattr(self.region_set.shared, name, latency.copy_of(getattr(sh, name)))
            self.fp.stop()

    # ------------------------------------------------------------------ loop glue

    def on_completions(self) -> None:
        # The shared eventfd is read once, first (iopool.py: no lost
        # wake-up): io.completions() reads it, then drains the punch pool
        # with its own; the C pool is reaped after it.
        done = self.io.completions()
        later = self.cpool.completions() if self.cpool is not None else []
        for on_done, result, error in done:
            on_done(result, error)
        # The punches among them, applied together (punch.py apply_done), in
        # their place: last of io.completions() (the punch pool is drained
        # after the Python pool's own jobs), before the C pool's completions,
        # one of which may close their region (a swap-in finding the client
        # gone): applied after it, they took the closing path instead.
        self.puncher.apply_done()
        for on_done, result, error in later:
            on_done(result, error)
        if self.fp is not None:
            self._on_fast_records()
            self.fp.top_up()
        # Last: the fast path's FP_FORGET records are applied (discard.py's invariant).
        self.discard.check()

    def _on_fast_records(self) -> None:
        """What the fast path's threads passed on, in the order they read it."""
        # Slots of pages dirtied on the fast path, freed at once after the
        # loop (one SlotAllocator call instead of one per record: under random
        # writes these were a fifth of the engine thread's time, and the page
        # lock is held meanwhile). Invariant 3 holds: no write of them is in
        # flight (their pages are RESIDENT), and the table drops each at
        # once, so nothing in the loop can see or free it again.
        stale: list[int] = []
        for (kind, rid, conn, ev, flags, addr, end, page, slot, result, copied, psum,
             started) in self.fp.records():
            region = self.regions.get(rid)
            if kind == fastpath.FP_LOAD_FAILED:
                err = self.fp.read_error(conn, result, slot) if result < 0 else None
                if region is not None and page >= 0:
                    self.swapin.take_over_fast_load(region, page, slot, err, copied, psum, started)
            elif region is None:
                continue
            elif kind == fastpath.FP_EVENT:
                self.faults.on_events(region, [(ev, flags, addr, end)])
                if ev in (uffd.EVENT_UNMAP, uffd.EVENT_REMOVE):
                    self.fp.unmap_applied(region)  # its pages are forgotten now
            elif kind == fastpath.FP_WAITERS:
                # A write parked on the page while the fast path loaded it:
                # it is the page's first write (as in swapin's _load_done), or, on a
                # page loaded writable that a fork write-protected, a write
                # to let through (fork.py).
                if not region.closing and region.table.state[page] == pt.RESIDENT:
                    self.dirtying.make_dirty(region, page)
            elif kind == fastpath.FP_DIRTIED:
                # Mapped writable for a write fault: the slot copy is stale.
                # Records are taken before reclaim runs (on_completions, then
                # settle, under the lock), so the page still holds that slot.
                # These records wake the engine only once per FP_DIRTIED_BATCH
                # (fp_push in native/fastpath.c): the slot may have waited
                # for a turn started by something else. Client requests and
                # the turn's I/O completions may run before the records are
                # taken (they did before the batching too, for microseconds):
                # each of them treats a dirty page still naming a stale slot
                # correctly (fork: AT_PARENT, never the slot; discard/forget:
                # freed once, by this record's check or the punch; close: the
                # record skips a closing region), and no step that writes to
                # the store or hands out a slot (reclaim, background
                # writeback: settle) runs before them.
                table = region.table
                if not region.closing and table.slot[page] == slot:
                    stale.append(slot)
                    table.slot[page] = pt.NO_SLOT
            elif kind == fastpath.FP_FORGET:
                # The page was unmapped while the fast path mapped it (F_DISCARD).
                if not region.closing:
                    self.forget.forget_range(region, page, 1)
            elif kind == fastpath.FP_RELEASABLE:
                self.region_set.maybe_release(region)
            elif kind == fastpath.FP_READ_ERROR:
                self.close_region(region, f"reading its userfaultfd failed: {uffd.read_error_text(-result)}")
        if stale:
            self.slots.free_slots(stale)

    def settle(self) -> bool:
        """After any batch of events: reclaim, then admit faults waiting for room.
        Returns True when reclaim has more to do at once (poll, don't sleep)."""
        if self.writeback.quarantine or self.writeback.quarantine_unsaved:
            self.writeback.expire_quarantine()
        more = self.reclaimer.reclaim()
        self.cleaner.clean_ahead()  # after reclaim took its victims: the next ones
        if self.shares.trim():  # each uid under its share (shares.py)
            more = True
        self.serve_budget_waiters()
        self.swapin.pump_loads()
        return more

    # ------------------------------------------------------------------ status

    def audit(self) -> dict | None:
        """Recount what the engine tracks incrementally: charged pages, used
        slots and pages being evicted (WRITEBACK with F_EVICT), from the page
        tables. None while a region is closing (its in-flight I/O is counted
        in neither place). Tests assert on this."""
        if any(r.closing for r in self.regions.values()):
            return None
        charged = slots = evicting = 0
        # Regions of a fork not yet attached by the child hold slot references
        # and pages copied in for them.
        for region in list(self.regions.values()) + self.fork.pending_regions():
            st = region.table.state
            charged += int(np.count_nonzero((st == pt.RESIDENT) | (st == pt.WRITEBACK) | (st == pt.LOADING)
                                            | (st == pt.PUNCHING)))
            slots += int(np.count_nonzero(region.table.slot >= 0))
            # Reclaim counts pages on their way out (RegionSet.evicting): WRITEBACK with F_EVICT.
            evicting += int(np.count_nonzero((st == pt.WRITEBACK) & ((region.table.flags & pt.F_EVICT) != 0)))
        slots += sum(n for _, _, n in self.writeback.quarantine)
        # Regions a dead daemon left hold their slots until reclaimed or dropped (adoption.py).
        slots += sum(int(np.count_nonzero(o.table.slot >= 0)) for o in self.adoption.orphans.values())
        # A slot shared by forked children is counted once per page table
        # naming it: the recount is of references (slots.py).
        return {"charged_ok": charged == self.region_set.charged, "slots_ok": slots == self.slots.references,
                "evicting_ok": evicting == self.region_set.evicting,
                "evicting": self.region_set.evicting, "evicting_recount": evicting,
                "charged": self.region_set.charged, "charged_recount": charged,
                "slots_used": self.slots.used, "slot_references": self.slots.references,
                "slots_recount": slots}

    def region_faults(self, region: Region) -> int:
        """Faults of `region` served by the engine and by the fast path."""
        return region.faults + (self.fp.region_faults(region) if self.fp is not None else 0)

    def status(self) -> dict:
        rs = self.region_set
        swapped = resident = clean = 0
        for region in self.regions.values():
            if region.closing:
                continue
            swapped += region.table.count(pt.SWAPPED) + region.table.count(pt.LOADING)
            table = region.table
            clean += int(np.count_nonzero((table.state == pt.RESIDENT) & ((table.flags & pt.F_DIRTY) == 0)))
        resident = self.region_set.charged
        return {
            "resident_bytes": resident * PAGE,
            "max_resident_bytes": self.budget.max_pages * PAGE,
            "swapped_bytes": swapped * PAGE,
            "swapouts_total": self.region_set.stats["swapouts"],
            "swapins_total": self.region_set.stats["swapins"] + self.region_set.shared.swapins,
            "pages_written_total": self.region_set.stats["pages_written"],
            # Background writeback (cleaner.py): pages written ahead of reclaim,
            # and resident pages clean now (dropped at once when evicted).
            "pages_cleaned_total": self.region_set.stats["pages_cleaned"],
            "clean_resident_bytes": clean * PAGE,
            "clean_reserve_bytes": self.cleaner.reserve() * PAGE,  # kept free or clean (grows by feedback)
            # Faults parked for budget, and of those the ones that waited for a
            # dirty page's store write (Reclaim._count_dirty_waits).
            "budget_waits_total": self.region_set.stats["budget_waits"],
            "dirty_waits_total": self.region_set.stats["dirty_waits"],
            "ioctl_retries_total": self.region_set.stats["ioctl_retries"],
            "faults_total": self.region_set.stats["faults"] + self.region_set.shared.faults,
            "fast_path_faults_total": self.region_set.shared.faults,
            # Faults the fault threads passed to the engine, by reason
            # (fastpath.passed_faults): each costs the engine's turn under the lock.
            "fast_path_passed_faults": fastpath.passed_faults(self.region_set.shared),
            # Times the fault threads woke the engine (fp_kick): each wake is a
            # turn of the engine under the page lock, which faults then wait for.
            "fast_path_wakeups_total": self.region_set.shared.wakeups,
            # Swap-in jobs on the fault threads now: taken, and inside a store read.
            "fast_path_jobs": self.fp.jobs() if self.fp is not None else {"taken": 0, "in_read": 0},
            # MINOR faults: a page in the memfd mapped again (sampling.py),
            # by the engine (a WRITEBACK page, any page without a fast path) and
            # by the fast path's threads (a RESIDENT page, fp_take_minor).
            "minor_faults_total": self.region_set.stats["minor_faults"] + self.region_set.shared.minor_faults,
            "fast_path_minor_faults_total": self.region_set.shared.minor_faults,
            "sampled_pages_total": self.reclaimer.sampler.sampled,
            # Pages made active (F_ACTIVE, victims.py) on a swap-in by the
            # refault distance, by the engine and the fault threads.
            "activations_total": self.region_set.stats["activations"] + self.region_set.shared.activations,
            "fast_path_swapins_total": self.region_set.shared.swapins,
            "readahead_pages_total": self.region_set.stats["readahead_pages"],
            # The engine's swap-in loads (each one I/O job, verified and
            # mapped at once), their store reads (one per run of adjacent
            # slots: a stream's window over scattered slots has several,
            # readahead.py _window), the pages read (pages read through
            # included: a run reads over resident pages between its own),
            # those read through, and the most loads in flight at once since
            # start.
            "swapin_loads_total": self.region_set.stats["swapin_loads"],
            "swapin_reads_total": self.region_set.stats["swapin_reads"],
            "swapin_read_pages_total": self.region_set.stats["swapin_read_pages"],
            "readthrough_pages_total": self.region_set.stats["readthrough_pages"],
            "swapin_reads_peak": self.region_set.stats["swapin_reads_peak"],
            "zero_drops_total": self.region_set.stats["zero_drops"],
            "writeback_inflight": self.region_set.writes_inflight,
            # Pages whose eviction punch is in flight (punch.py): still charged.
            "punching_pages": self.puncher.punching,
            "reads_inflight": self.region_set.loads_inflight + self.region_set.shared.inflight,
            "write_errors_total": self.region_set.stats["write_errors"],
            "read_errors_total": self.region_set.stats["read_errors"],
            "overcommit_pages_total": self.region_set.stats["overcommit_pages"],
            "poisoned_pages_total": self.region_set.stats["poisoned_pages"],
            # Pages a swap-in found present in the memfd (planted by a read of
            # the daemon's own mapping, or written there: never the client's
            # mapping) and replaced by their verified store copies
            # (native/readmap.h): the I/O pools' and the fault threads'.
            "present_replaced_total": readmap.replaced_total() + int(self.region_set.shared.present_replaced),
            # State changes the transition table (native/pagestate.h) forbids:
            # a bug, 0 is the only right value; in Python and on the fast path.
            "illegal_transitions_total": pt.CHECK.illegal + int(self.region_set.shared.illegal_transitions),
            # Pages of ranges the client unmapped (forget_range), and of those
            # the ones forgotten only when their I/O in flight returned (a
            # page forgotten again before it returned counts for the first).
            "forgotten_pages_total": self.region_set.stats["forgotten_pages"],
            "forgotten_after_io_total": self.region_set.stats["forgotten_after_io"],
            "discarded_pages_total": self.region_set.stats["discarded_pages"],
            "budget_waiters": len(self.region_set.budget_waiters),
            # Victims chosen per scan of the page tables (reclaim.scan_pages).
            "victim_scan_pages": self.reclaimer.victims.batch,
            "write_backoff_s": round(max(0.0, self.writeback.write_retry_at - time.monotonic()), 3),
            "store_full": self.writeback.is_store_full(),
            "draining": self.region_set.draining,
            # The daemon's per-page arrays, from their own sizes: the page
            # tables' (PageTable.BYTES_PER_PAGE per page of a live region,
            # allocated as pages are touched) and the slot map's (one byte of
            # reference count per store slot, slots.py). The rest of its
            # memory (RSS) is the heap and code.
            "metadata": {
                "page_table_bytes_per_page": pt.PageTable.BYTES_PER_PAGE,
                "page_tables_bytes": sum(r.table.nbytes for r in self.regions.values()),
                "slot_map_bytes": self.slots.nbytes,
            },
            # Engine and fast path together (latency.py); per-bucket counts.
            "latency": {
                "swapin": latency.merged(rs.swapin_latency.h, rs.shared.swapin_latency),
                "fault": latency.merged(rs.fault_latency.h, rs.shared.fault_latency),
                # The fault threads' waits for the page lock (fastpath.h).
                "lock_wait": latency.merged(rs.shared.lock_wait),
            },
            "audit": self.audit(),
            "fork": self.fork.status(),
            **self.adoption.status(),
            "store": dict(self.store.describe(), used_bytes=self.slots.used * PAGE,
                          full=self.writeback.is_store_full(),
                          quarantined_bytes=sum(n for _, _, n in self.writeback.quarantine) * PAGE,
                          # nfs://: lent contexts the fault threads hold (FastPath.top_up).
                          fault_thread_contexts=self.fp.contexts() if self.fp is not None else 0),
        }
