"""Victim choice for reclaim: two lists, like the kernel's inactive/active LRU.

The daemon sees a page's use only when it faults (first touch, swap-in, the
first write after write-protection), so a page's stamp is its last fault --
or its last use seen by sampling: before the oldest pages are evicted they
are sampled (sampling.py: taken out of the client's page tables, so their
next touch is a MINOR fault that stamps them), and only those still unused
a scan later are victims (VictimQueue._refill). A page read often without
faulting is kept, as exact LRU would keep it; a page nobody touches waits
one scan longer than it would without sampling.
Pages that refault soon after eviction come back ACTIVE (the engine measures
the refault distance, as Linux's workingset code does). Victims are the oldest
inactive pages; active pages are taken only when too few inactive ones are
left, and the oldest active pages are demoted whenever the active share
passes ACTIVE_SHARE, so a page that stopped being hot loses its protection.
With the store unable to take writes, only clean pages are candidates.

Pages in the client's mlocked ranges are never candidates: a page that is the
target of in-flight O_DIRECT, io_uring or RDMA I/O is pinned by the kernel,
and evicting it mid-transfer loses what the device writes after the copy was
taken (kernel swap skips pinned pages). Pins cannot be seen from userspace
(/proc/kpageflags has no pin bit; /proc/kpagecount is the map count), so the
rule is that such a buffer must be mlocked for the duration of the I/O, and
this is what the daemon can see and enforce (README "Known limits").

The rules' array work is C (native/victims.h, through the fast path's cffi
module): the choice (us_choose_victims), the k oldest (us_oldest), whether
a queued or known page is still a victim (us_still_victim, through
us_usable and us_known) and the sorted-list bookkeeping of probation. This
module keeps the queue, the sampling and what is on probation. Why: the
victim scan is the engine thread's longest hold of the page lock, which the
fast path's fault threads wait for; in numpy one scan held it ~1.25 ms
without its sampling (issue 14; the header has the measurements).
"""
from __future__ import annotations

from typing import Callable, Iterable

import numpy as np

from uswap._fastpath_cffi import ffi, lib
from uswap.daemon.sampling import AccessSampler

# Most of resident memory that active pages may hold: a fraction declared
# once, in native/victims.h, where the rule that applies it is.
ACTIVE_SHARE = lib.US_ACTIVE_SHARE_NUM / lib.US_ACTIVE_SHARE_DEN


class _Scratch:
    """Buffers for the C choice (native/victims.h), kept between scans and
    grown when a scan finds more candidates than they hold. Engine thread
    only (reclaim, under the page lock)."""

    def __init__(self) -> None:
        self.keys = np.empty(0, np.uint64)
        self.cands = np.empty(0, np.int64)

    def grow(self, n: int) -> None:
        n = max(n + n // 4, 4096)
        self.keys = np.empty(n, np.uint64)
        self.cands = np.empty(n, np.int64)


_scratch = _Scratch()


def _u8(a: np.ndarray):
    return ffi.from_buffer("uint8_t[]", a.view(np.uint8))


def _i64(a: np.ndarray):
    return ffi.from_buffer("int64_t[]", np.ascontiguousarray(a, np.int64))


def _u32(a: np.ndarray):
    return ffi.from_buffer("uint32_t[]", np.ascontiguousarray(a, np.uint32))


def _describe(vr, region, never: np.ndarray | None) -> tuple:
    """Point the struct us_vregion `vr` at the region's page table (and its
    mlocked mask, if any); returns the buffers, to be kept alive while C
    reads them."""
    table = region.table
    if never is not None and len(never) != len(table.state):
        # C reads npages entries of it: a mask of another size is a bug.
        raise ValueError(f"region {region.id}: a locked mask of {len(never)} pages, not {len(table.state)}")
    if never is not None:
        never = np.ascontiguousarray(never, np.bool_)  # C reads a byte per page (no copy of a bool mask)
    bufs = (_u8(table.state), _u8(table.flags), ffi.from_buffer("uint32_t[]", table.stamp),
            _u8(never) if never is not None else ffi.NULL)
    vr.state, vr.flags, vr.stamp, vr.never = bufs
    vr.npages = len(table.state)
    return bufs


def _one(region, never: np.ndarray | None) -> tuple:
    """A struct us_vregion of one region, and the buffers it points at."""
    vr = ffi.new("struct us_vregion *")
    return vr, _describe(vr, region, never)


def choose_victims(regions: Iterable, want: int, tick: int, clean_only: bool = False,
                   locked: dict | None = None) -> list[tuple[object, np.ndarray]]:
    """Up to `want` RESIDENT pages as [(region, sorted page numbers)];
    `locked` maps a region's id to the mask of its pages never to take.
    Closing regions are skipped. The rule itself -- candidates, ages modulo
    the 32-bit stamp, the demotion of active pages past ACTIVE_SHARE (their
    F_ACTIVE cleared here), the oldest inactive then active pages, clean
    only -- is us_choose_victims in native/victims.h: in numpy it was the
    largest part of the victim scan, the engine's longest hold of the page
    lock (that header says what was measured)."""
    live = [r for r in regions if not r.closing]
    if not live or want <= 0:
        return []
    vr = ffi.new("struct us_vregion[]", len(live))
    held = []   # the buffers the C call reads, alive until it returns
    total = 0
    for i, region in enumerate(live):
        held.append(_describe(vr[i], region, locked.get(region.id) if locked else None))
        total += len(region.table.state)
    out = np.empty(min(want, total), np.int64)
    while True:
        n = lib.us_choose_victims(vr, len(live), want, tick & 0xFFFFFFFF, clean_only,
                                  ffi.from_buffer("uint64_t[]", _scratch.keys),
                                  ffi.from_buffer("int64_t[]", _scratch.cands), len(_scratch.keys),
                                  ffi.from_buffer("int64_t[]", out))
        if n >= 0:
            break
        _scratch.grow(-n)   # more candidates than the scratch holds: nothing was changed
    result = []
    pos = 0
    for i, region in enumerate(live):
        k = vr[i].chosen
        if k:
            result.append((region, out[pos:pos + k]))
            pos += k
    return result


_NONE = (np.empty(0, np.int64), np.empty(0, np.uint32))


def _minus(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The pages of sorted `a` not in sorted `b` (us_sorted_minus)."""
    out = np.empty(len(a), np.int64)
    return out[:lib.us_sorted_minus(_i64(a), len(a), _i64(b), len(b), _i64(out))]


def _merge(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Sorted `a` and sorted `b` as one sorted list (us_sorted_merge)."""
    out = np.empty(len(a) + len(b), np.int64)
    return out[:lib.us_sorted_merge(_i64(a), len(a), _i64(b), len(b), _i64(out))]


def _split_oldest(groups: list[tuple[object, np.ndarray]], k: int,
                  tick: int) -> tuple[list[tuple[object, np.ndarray]], list[tuple[object, np.ndarray]]]:
    """The k oldest pages of [(region, sorted pages)], and the rest, both
    in the same form (ages as us_choose_victims reads them: us_oldest)."""
    total = sum(len(p) for _, p in groups)
    if total <= k:
        return [g for g in groups if len(g[1])], []
    if k <= 0:
        return [], [g for g in groups if len(g[1])]
    stamps = np.concatenate([r.table.stamp[p] for r, p in groups])
    mask = np.empty(total, np.bool_)
    if len(_scratch.keys) < total:
        _scratch.grow(total)
    lib.us_oldest(ffi.from_buffer("uint32_t[]", stamps), total, tick & 0xFFFFFFFF, k, _u8(mask),
                  ffi.from_buffer("uint64_t[]", _scratch.keys))
    oldest, rest = [], []
    pos = 0
    for region, pages in groups:
        m = mask[pos:pos + len(pages)]
        pos += len(pages)
        if m.any():
            oldest.append((region, pages[m]))
        if not m.all():
            rest.append((region, pages[~m]))
    return oldest, rest


class VictimQueue:
    """Victims chosen ahead, a batch at a time, so that one scan of the page
    tables serves several reclaim steps.

    Why: choose_victims looks at every resident page of every region; run
    once per 256-page reclaim step it was the engine's largest cost during
    sequential swap-in (py-spy: ~40% of the engine thread's busy time on a
    512 MiB stream under a 128 MiB budget). A batch is the `batch` oldest
    pages at the time of the scan; pages faulted in later are younger than
    all of them, so taking the batch in any order before scanning again
    keeps the policy's order up to the batch's granularity.

    A queued page is handed out only if, now, it is still RESIDENT (or being
    written ahead by cleaner.py: WRITEBACK without F_EVICT) and carries the
    stamp it was queued with (no fault since, so it was not used and did not
    change hands), is clean when only clean pages may go, and is not in a
    range the client has mlocked (us_still_victim, native/victims.h: the
    one statement of that rule, which _known applies too). `peek` shows the next ones by the same
    test without taking them: the pages background writeback cleans ahead.

    Locked ranges: lock_key(region) is cheap and changes when the client's
    locked ranges do (its VmLck with the region's VMA boundaries, as an
    mlock or munlock of part of a VMA splits or merges it; 0: nothing
    locked) -- all but the one move README "Known limits" names;
    read_locked(region) reads the ranges themselves (a page mask, or None),
    which costs a walk of the client's mappings. They are read at each
    refill, and again before a region's queued pages are handed out if its
    key changed since: an mlock made while its pages sit in the queue is
    seen before any of them is taken.
    """

    def __init__(self, batch: int, lock_key: Callable[[object], object] | None = None,
                 read_locked: Callable[[object], np.ndarray | None] | None = None,
                 sampler: AccessSampler | None = None) -> None:
        self.batch = batch
        self.pending: list[tuple[object, np.ndarray, np.ndarray]] = []  # (region, pages, stamps)
        self.lock_key = lock_key
        self.read_locked = read_locked
        self.locked: dict[int, tuple[object, np.ndarray | None]] = {}  # region id -> (key, mask)
        self.sampler = sampler
        # Pages on probation (sampled, or judged and no longer queued, see
        # _refill): region id -> (sorted pages, their stamps when sampled).
        self.probation: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        # The queued victims a scan judged (sampled and found untouched),
        # region id -> (sorted pages, their stamps): not those queued when
        # nothing could be judged, nor the ones the sampler could not reach,
        # which were never sampled (a use of theirs leaves no stamp).
        self.judged: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.scan_tick = -1  # the clock at the last scan

    def clear(self) -> None:
        self.pending = []
        self.probation = {}
        self.judged = {}

    def _read(self, region, key: object) -> np.ndarray | None:
        mask = self.read_locked(region) if key else None
        self.locked[region.id] = (key, mask)
        return mask

    def _refresh_locked(self, regions: list) -> dict:
        """Every live region's mlocked pages, read now (at a refill)."""
        self.locked = {}
        if self.lock_key is None:
            return {}
        return {r.id: self._read(r, self.lock_key(r)) for r in regions if not r.closing}

    def locked_now(self, region) -> np.ndarray | None:
        """The region's mlocked pages now (a mask, or None): cached while its
        lock key stays the same."""
        if self.lock_key is None:
            return None
        key = self.lock_key(region)
        cached = self.locked.get(region.id)
        if cached is not None and cached[0] == key:
            return cached[1]
        return self._read(region, key)

    def _refill(self, regions: list, want: int, tick: int, clean_only: bool) -> None:
        """Queue the next batch of victims (at least `want` when there are
        that many candidates).

        Without sampling: the `batch` oldest pages. With it: the 2 x `batch`
        oldest are looked at; those judged already and untouched since (their
        stamp is the one they were sampled or queued with: on probation, or
        still in the queue this scan replaces) are the victims, oldest
        first, up to `batch` (fewer than `want` is progress: reclaim asks
        again); the others are sampled now and go on probation, except the
        `want` oldest when none could be judged (a fault may be waiting for
        room: it is not kept waiting for a judgement), and except pages the
        sampler cannot reach, which are judged by their stamp alone, as
        without sampling.

        What was judged is never sampled again while it stays untouched:
        the queued victims a scan replaces (peek scans whenever fewer than
        it wants are left, about 40% of a batch still queued on streams)
        and the pages on probation that this scan does not look at (being
        written ahead, not RESIDENT; past a smaller window) stay known,
        so the next scan judges them at once. (Sampling the replaced queue
        again had streams sample about two pages per page evicted:
        tests/daemon/test_sampling.py's stream test.)"""
        locked = self._refresh_locked(regions)
        n = max(want, self.batch)
        if self.sampler is None:
            self.probation = {}
            self.judged = {}
            self.pending = [(region, pages, region.table.stamp[pages].copy())
                            for region, pages in choose_victims(regions, n, tick, clean_only, locked)]
            return
        known = self._known(regions, locked)
        judged: list[tuple[object, np.ndarray]] = []
        fresh: list[tuple[object, np.ndarray]] = []
        looked: dict[int, np.ndarray] = {}
        for region, pages in choose_victims(regions, 2 * n, tick, clean_only, locked):
            looked[region.id] = pages
            untouched = self._untouched(known.get(region.id), region, pages)
            judged.append((region, pages[untouched]))
            fresh.append((region, pages[~untouched]))
        victims, kept = _split_oldest(judged, n, tick)
        self.judged = {region.id: (pages, region.table.stamp[pages].copy()) for region, pages in victims}
        if not victims:
            # Nothing judged yet (the first refill, or every page on
            # probation was used): the oldest go, as without sampling.
            victims, fresh = _split_oldest(fresh, want, tick)
        probation: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for region in regions:
            # Known pages this scan did not look at: kept as they were.
            held = known.get(region.id)
            if held is None:
                continue
            seen = looked.get(region.id)
            away = held[0] if seen is None else _minus(held[0], seen)
            if len(away):
                probation[region.id] = (away, region.table.stamp[away].copy())
        for region, pages, new in [(r, p, False) for r, p in kept] + [(r, p, True) for r, p in fresh]:
            if not len(pages):
                continue
            if new and not self.sampler.sample(region, pages):
                victims.append((region, pages))   # unreachable: judged by its stamps
                continue
            old = probation.get(region.id)
            # Disjoint by construction (`away` is outside what this scan
            # looked at; kept and fresh split what it looked at), both
            # sorted: one merge (us_sorted_merge; np.union1d's unique is
            # hash-based in this numpy, ~72 ms for a 1 GiB region's pages).
            merged = pages if old is None else _merge(old[0], pages)
            probation[region.id] = (merged, region.table.stamp[merged].copy())
        self.probation = probation
        self.pending = [(region, pages, region.table.stamp[pages].copy()) for region, pages in victims if len(pages)]

    def _known(self, regions: list, locked: dict) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Pages judged or sampled before and untouched since, per region id
        (sorted pages, their stamps): those on probation and the queued
        victims a scan judged (not those queued unjudged, self.judged), both
        while RESIDENT or being written ahead with their stamp
        unchanged; a page leaving memory, used, or in a range its client
        mlocked now (`locked`, as _refresh_locked read it: pinned I/O may
        use it unseen) is forgotten."""
        out: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for region in regions:
            a = self.probation.get(region.id)
            # Only what a scan judged: a queued page never sampled is
            # sampled when a scan meets it again, as any other.
            b = self.judged.get(region.id)
            if (a is None and b is None) or region.closing:
                continue
            a = a or _NONE
            b = b or _NONE
            vr, bufs = _one(region, locked.get(region.id))
            pages = np.empty(len(a[0]) + len(b[0]), np.int64)
            stamps = np.empty(len(pages), np.uint32)
            k = lib.us_known(vr, _i64(a[0]), _u32(a[1]), len(a[0]), _i64(b[0]), _u32(b[1]), len(b[0]),
                             _i64(pages), _u32(stamps))
            if k:
                out[region.id] = (pages[:k], stamps[:k])
        return out

    @staticmethod
    def _untouched(held: tuple[np.ndarray, np.ndarray] | None, region, pages: np.ndarray) -> np.ndarray:
        """Mask of `pages` (sorted) among `held` (sorted pages and their
        stamps then) and not used since: an unchanged stamp (a use after
        sampling is a MINOR fault, which stamps the page; so does every
        other way back into memory)."""
        if held is None or not len(held[0]):
            return np.zeros(len(pages), bool)
        mask = np.empty(len(pages), bool)
        vr, bufs = _one(region, None)
        lib.us_untouched(vr, _i64(held[0]), _u32(held[1]), len(held[0]), _i64(pages), len(pages), _u8(mask))
        return mask

    def take(self, regions: Iterable, want: int, tick: int, clean_only: bool = False) -> list[tuple[object, np.ndarray]]:
        """Up to `want` RESIDENT pages as [(region, sorted page numbers)]."""
        out: list[tuple[object, np.ndarray]] = []
        got = 0
        scanned = False
        while got < want:
            if not self.pending:
                if scanned or got:
                    # A scan now would see the pages taken so far as still
                    # resident and hand them out twice: the caller asks again.
                    break
                scanned = True
                self._scan(list(regions), want - got, tick, clean_only)
                continue
            region, pages, stamps = self.pending[0]
            if region.closing:
                self.pending.pop(0)
                continue
            n = min(len(pages), want - got)
            head, head_stamps = pages[:n], stamps[:n]
            if n == len(pages):
                self.pending.pop(0)
            else:
                self.pending[0] = (region, pages[n:], stamps[n:])
            sel = head[self._usable(region, head, head_stamps, clean_only)]
            if len(sel):
                out.append((region, sel))
                got += len(sel)
        return out

    def _usable(self, region, pages: np.ndarray, stamps: np.ndarray, clean_only: bool,
                never: np.ndarray | None | bool = False) -> np.ndarray:
        """Mask of the queued `pages` still victims now (see the class
        docstring). `never`: the region's mlocked pages as locked_now gave
        them during this call's caller (False: read them now)."""
        if never is False:
            never = self.locked_now(region)
        mask = np.empty(len(pages), bool)
        vr, bufs = _one(region, never)
        lib.us_usable(vr, _i64(pages), _u32(stamps), len(pages), clean_only, _u8(mask))
        return mask

    def peek(self, regions: Iterable, want: int, tick: int) -> list[tuple[object, np.ndarray]]:
        """The next `want` victims, as take would hand them out, left in the
        queue (cleaner.py writes the dirty ones ahead). When fewer than
        `want` queued pages are still usable (a queue of the right length
        whose pages were used since is no victim) the queue is filled again
        by a new scan (the oldest pages now, in place of what was queued;
        twice `want`, so that the next peeks find enough without a scan
        each), unless nothing was faulted in since the last scan (`tick`
        unchanged: the same pages). The queued pages still usable stay
        judged (_refill): the new scan judges them at once, as victims again
        while among the oldest, and does not sample them again.

        Only the queue counts, not the pages on probation: those were judged
        by no scan yet (pages the scan of this very turn sampled could not
        have been touched), and writing them ahead cleaned pages reclaim did
        not take -- reclaim met dirty victims 10x as often (review test
        test_reclaim_itself_meets_few_dirty_victims)."""
        out = self._queued(want)
        if sum(len(pages) for _, pages in out) < want and tick != self.scan_tick:
            self._scan(list(regions), 2 * want, tick, False)
            out = self._queued(want)
        return out

    def _queued(self, want: int) -> list[tuple[object, np.ndarray]]:
        """Up to `want` of the queued victims still usable, in take's order.

        Only as much of the queue is looked at as it takes to find them (a
        part of `want` pages, then parts twice as large while pages are
        missing), not every queued page: the cleaner peeks once per
        CLEAN_STEP pages brought in, with `want` about the reserve, while a
        scan queues twice that -- judging the whole queue at each peek was
        about 6% of the engine thread's CPU on a first-touch stream (thread
        CPU timers per stage). The mlocked ranges
        are read once per region, as when the whole of it was judged."""
        out: list[tuple[object, np.ndarray]] = []
        got = 0
        for region, pages, stamps in self.pending:
            if got >= want:
                break
            if region.closing:
                continue
            never = self.locked_now(region)
            found: list[np.ndarray] = []
            at, part = 0, want - got
            while at < len(pages) and got < want:
                head = pages[at:at + part]
                sel = head[self._usable(region, head, stamps[at:at + part], False, never)][:want - got]
                found.append(sel)
                got += len(sel)
                at += part
                part *= 2
            sel = np.concatenate(found) if len(found) > 1 else found[0] if found else pages[:0]
            if len(sel):
                out.append((region, sel))
        return out

    def _scan(self, regions: list, want: int, tick: int, clean_only: bool) -> None:
        """Queue the next victims of `regions` (_refill: the oldest, judged
        by sampling), replacing the queue; the clock of the scan noted."""
        self.scan_tick = tick
        self._refill(regions, want, tick, clean_only)
