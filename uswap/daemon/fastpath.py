"""Python face of the fault fast path (native/fastpath.c).

The C threads read the userfaultfds of the regions given to them and serve
random swap-ins themselves, from a store that declares native I/O
(Store.native_io: the file and nfs:// stores); everything else
comes back to the engine as records, in order. The engine holds the fast
path's lock whenever it runs (Engine.lock/unlock around the server's epoll
wait), so the page tables, `charged` and `tick` -- which live in C memory
shared with those threads -- change under one lock, as before.
"""
from __future__ import annotations

import errno
import os
import types

from uswap._fastpath_cffi import ffi, lib
from uswap.daemon import latency
from uswap.daemon import pagetable as pt
from uswap.daemon.region import ReadAhead
from uswap.store.base import NativeIo, Store, require_native_io

FP_EVENT = lib.FP_EVENT
FP_LOAD_FAILED = lib.FP_LOAD_FAILED
FP_WAITERS = lib.FP_WAITERS
FP_RELEASABLE = lib.FP_RELEASABLE
FP_READ_ERROR = lib.FP_READ_ERROR
FP_DIRTIED = lib.FP_DIRTIED
FP_FORGET = lib.FP_FORGET

# Why a fault went to the engine (fastpath.h FP_HAND_*), by index: status
# fast_path_passed_faults.
PASSED_REASONS = ("off", "state", "locality", "budget", "readers", "context", "wp", "minor")
assert len(PASSED_REASONS) == lib.FP_HAND_N


def passed_faults(shared) -> dict[str, int]:
    """The faults the C threads passed to the engine, by reason: `off`
    (draining, an UNMAP pending), `state` (MISSING on a page neither EMPTY
    nor SWAPPED), `locality` (near a swap-in or a stream's: read-ahead),
    `budget` (no room), `readers` (every reader in a store read), `context`
    (nfs://, no idle context), `wp` (not on a clean RESIDENT page) and
    `minor` (not on a RESIDENT page)."""
    return {name: int(shared.handed[i]) for i, name in enumerate(PASSED_REASONS)}


def plain_shared() -> types.SimpleNamespace:
    """The engine's shared counters when there is no fast path."""
    return types.SimpleNamespace(charged=0, tick=1, inflight=0, enabled=1,
                                 faults=0, swapins=0, activations=0, minor_faults=0, present_replaced=0, wakeups=0,
                                 illegal_transitions=0, handed=[0] * len(PASSED_REASONS),
                                 swapin_latency=latency.new_shared(), fault_latency=latency.new_shared(),
                                 lock_wait=latency.new_shared())


class FastPath:
    def __init__(self, readers: int, notify_fd: int, store: Store) -> None:
        """`readers` threads that may each serve a swap-in (a store read) at
        once, and one more that never enters a store read (invariant 4)."""
        native = require_native_io(store, "the fault fast path")
        self.lender = native.lender    # kind NFS: contexts for top_up()
        self.nfs = native.kind == NativeIo.NFS
        self.e = lib.fp_new(readers, notify_fd, native.fd)   # -1 for kind NFS
        if self.e == ffi.NULL:
            raise OSError(errno.EAGAIN, "cannot start the fault fast path threads")
        self.shared = self.e   # charged, tick, counters: fields of struct fp_engine
        # The C threads' transition check is as strict as the engine's (pagetable.CHECK).
        self.e.strict_transitions = int(pt.CHECK.strict)
        self.free_slots = list(range(lib.FP_MAX_REGIONS - 1, -1, -1))
        self.recs = ffi.new("struct fp_record[]", 256)
        self.conns: dict[int, object] = {}   # id -> connection lent to the C threads
        self.next_conn = 1

    # The lock: held by the engine thread whenever it runs.
    def lock(self) -> None:
        lib.fp_lock(self.e)

    def unlock(self) -> None:
        lib.fp_unlock(self.e)

    def configure(self, max_pages: int, high_pages: int, clean_pages: int, ra_pages: int,
                  fill_max_pages: int) -> None:
        self.e.max_pages, self.e.high_pages, self.e.ra_pages = max_pages, high_pages, ra_pages
        self.e.clean_pages = clean_pages
        if lib.fp_set_fill_max(self.e, fill_max_pages) < 0:
            raise OSError(errno.ENOMEM, "cannot allocate the fast path's zero page buffer")

    def set_budget(self, max_pages: int, high_pages: int, clean_pages: int) -> None:
        """A new budget (Engine.set_budget); the caller holds the page lock, under which
        the C threads read them."""
        self.e.max_pages, self.e.high_pages, self.e.clean_pages = max_pages, high_pages, clean_pages

    # ---------------------------------------------------------------- regions

    def open(self, region) -> bool:
        """Watch the region's uffd on the C threads; False (the engine's own
        epoll serves it) when no slot is free or epoll refuses the fd."""
        if not self.free_slots:
            return False
        idx = self.free_slots.pop()
        r = self.e.regions[idx]
        table = region.table
        r.uffd, r.id, r.addr, r.npages = region.uffd, region.id, region.addr, region.npages
        r.daddr = region.daddr  # a page found present during a swap-in is overwritten there (readmap.h)
        r.state = ffi.cast("uint8_t *", table.state.ctypes.data)
        r.flags = ffi.cast("uint8_t *", table.flags.ctypes.data)
        r.slot = ffi.cast("int32_t *", table.slot.ctypes.data)
        r.stamp = ffi.cast("uint32_t *", table.stamp.ctypes.data)
        r.sum = ffi.cast("uint32_t *", table.sum.ctypes.data)
        r.shares = self._shares_of(region)   # a reused slot must not keep its last occupant's
        for name in ReadAhead.FIELDS:
            setattr(r, name, getattr(region.ra, name))
        r.ra = ffi.cast("int64_t *", region.ra_streams.ctypes.data)  # shared, not copied: lives as the region
        if lib.fp_region_open(self.e, idx) < 0:
            self.free_slots.append(idx)
            return False
        region.fp_slot = idx
        region.ra = r   # zero-fill state now shared with the C threads
        return True

    @staticmethod
    def _shares_of(region):
        counts = region.share_counts
        return ffi.NULL if counts is None else ffi.cast("uint16_t *", counts.ctypes.data)

    def shares_changed(self, region) -> None:
        """cow.py set or cleared the region's share counts (page lock held):
        the C threads read them to decide how a dirty page's MINOR fault is
        mapped (fp_take_minor, us_minor_writable)."""
        if self.e != ffi.NULL and region.fp_slot >= 0:
            self.e.regions[region.fp_slot].shares = self._shares_of(region)

    def close(self, region) -> None:
        """Stop reading the region's events (loads in flight finish)."""
        if region.fp_slot >= 0:
            lib.fp_region_close(self.e, region.fp_slot)

    def inflight(self, region) -> int:
        """Loads started by the C threads and not finished, plus threads
        reading the region's uffd without the lock (fastpath.c fp_thread):
        the region's fds must stay open until this is 0."""
        return lib.fp_region_busy(self.e, region.fp_slot) if region.fp_slot >= 0 else 0

    def region_faults(self, region) -> int:
        """Faults of the region served by the C threads (lock held)."""
        return int(self.e.regions[region.fp_slot].faults) if region.fp_slot >= 0 else 0

    def take_over(self, region) -> None:
        """The engine takes over a load that failed here."""
        self.e.regions[region.fp_slot].inflight -= 1

    def unmap_applied(self, region) -> None:
        """The engine applied an UNMAP/REMOVE record of the region: the C
        threads may serve its faults again (fastpath.c, unmaps_pending)."""
        if region.fp_slot >= 0:
            self.e.regions[region.fp_slot].unmaps_pending -= 1

    def free(self, region) -> None:
        if region.fp_slot >= 0:
            ra = ReadAhead()
            for name in ReadAhead.FIELDS:
                setattr(ra, name, getattr(region.ra, name))
            region.ra = ra
            self.e.regions[region.fp_slot].shares = ffi.NULL
            lib.fp_region_free(self.e, region.fp_slot)
            self.free_slots.append(region.fp_slot)
            region.fp_slot = -1

    # ---------------------------------------------------------------- records

    def records(self) -> list[tuple]:
        """Records since the last call, oldest first, as tuples
        (type, region id, conn, kind, flags, addr, end, page, slot, result,
        copied, sum, started); conn is the lent connection of a failed nfs://
        read (the caller checks it in), else None."""
        out = []
        while True:
            n = lib.fp_take_records(self.e, self.recs, 256)
            for i in range(n):
                r = self.recs[i]
                conn = self.conns.pop(r.conn, None) if r.conn >= 0 else None
                out.append((r.type, r.region, conn, r.kind, r.flags, r.addr, r.end, r.page, r.slot,
                            r.result, r.copied, r.sum, r.started))
            if n < 256:
                return out

    def read_error(self, conn, result: int, slot: int) -> OSError:
        """The OSError of a failed store read of one page at `slot`."""
        off = slot * 4096
        if conn is not None:
            err = self.lender.io_error(conn, "read", 4096, off, -result)
            self.lender.checkin(conn, err)
            return err
        return OSError(-result, f"pread at store offset {off}: {os.strerror(-result)}")

    def top_up(self) -> None:
        """nfs://: lend idle contexts to the C threads, one per thread that
        may be in a store read at once (read_max: fewer than `readers` when
        fp_new started fewer threads)."""
        if not self.nfs:
            return
        # The threads hold at most read_max contexts, idle or in a read
        # (`reading`: each holds its job's, fp_take_fault); the rest of what
        # the engine lends (io_threads + fault_threads) is the C I/O pool's.
        # Counting only the idle ones lent read_max more each time every
        # reader was out, and the threads keep what they are lent.
        while self.e.nidle + self.e.reading < self.e.read_max:
            conn = self.lender.checkout()
            if conn is None:
                return
            cid = self.next_conn
            self.next_conn += 1
            slot = self.e.idle[self.e.nidle]
            slot.nfs = ffi.cast("struct nfs_context *", conn.ctx)
            slot.fh = ffi.cast("struct nfsfh *", conn.fh)
            slot.id = cid
            self.conns[cid] = conn
            self.e.nidle += 1

    def contexts(self) -> int:
        """nfs://: lent contexts the C threads hold, idle or in a read (a
        failed read's goes back with its record); 0 for the file store."""
        return len(self.conns)

    def jobs(self) -> dict[str, int]:
        """Swap-in jobs of the C threads now (the lock held): `taken` (taken
        by fp_take_fault and not yet finished: `reading`) and `in_read` (of
        those, inside their store read: invariant 4's count). Both 0 when
        the threads are idle; a test checks that every path balances them."""
        if self.e == ffi.NULL:
            return {"taken": 0, "in_read": 0}
        return {"taken": int(self.e.reading), "in_read": int(self.e.in_read)}

    def stop(self) -> None:
        """Join the threads (the lock must not be held); lent contexts go back."""
        if self.e == ffi.NULL:
            return
        lib.fp_stop(self.e)
        self.e = ffi.NULL
        self.shared = plain_shared()
        for conn in self.conns.values():
            self.lender.checkin(conn, None)
        self.conns.clear()
