"""Access sampling: making a resident page's next use visible to the daemon.

The daemon sees a page's use only when it faults, so a resident page that
is read often but never faults again looks as old as one nobody touches.
Sampling takes the page out of the client's page tables and leaves it in
the memfd: the client's next touch is then a MINOR fault (the region is
registered MINOR), answered with UFFDIO_CONTINUE and stamped as a use:
by a fault thread for a RESIDENT page (fp_take_minor, native/fastpath.c),
by the engine otherwise (faults.py). Which pages to sample, and what an untouched
sampled page means, is victims.py's policy; this module is the mechanism.

How: `process_madvise(pidfd, MADV_PAGEOUT)` on the client's mapping, through
the pidfd its session took when it connected (never one opened by pid: see
`sample`). It is
one of the few advices the kernel accepts for another process (MADV_COLD,
MADV_PAGEOUT, MADV_WILLNEED, MADV_COLLAPSE; MADV_DONTNEED is refused with
EINVAL), and on a shared memfd page it unmaps the page from every mapping
and tries to write it out; with no kernel swap, shmem cannot be written
out, so the page stays in the memfd (checked on 6.18: the client's
pagemap shows it not present, mincore of the memfd shows it resident).
The kernel skips a page mapped by more than one process, so the daemon's
own mapping of it is dropped first with MADV_DONTNEED (process_madvise on
the daemon itself, which takes any advice), which on a shared mapping drops only the daemon's page
table entries, never the memfd's page (invariant 8: nothing is read).

With kernel swap, reclaim would also write the memfd's page to it (not
lost -- shmem reads it back on the next touch -- but I/O the user gave to
uswap): the kernel skips that write for a page someone else holds a
reference on. So the daemon holds one while it asks: the pages are
spliced into a pipe of its own from the region's memfd (native/pagehold.h:
the page cache pages themselves, by reference, mapped nowhere; through an
open file of the memfd the daemon opens itself, since the client can set
O_DIRECT on the one it sent, and a splice from that copies), its mapping
of them is dropped, the client's is taken out, then the pipe is emptied into
/dev/null. (Checked on 6.18 with 9 GiB of kernel swap: without the pipe
the sampled pages show in the mapping's Swap, with it none does.) The hold
covers the advice's own reclaim only: once the pipe is emptied the page is
an unmapped page of the memfd, which other reclaim on the host (kswapd, a
memory cgroup's limit, a DAMON pageout scheme for cold unmapped pages) may
write to kernel swap like any memfd page until its next touch maps it
again. The hold
was a vmsplice of the daemon's own mapping: that faulted every sampled page
into the daemon's page tables only for the MADV_DONTNEED that follows to
unmap it again, with a TLB flush: 0.86-0.92 us of CPU per sampled page in
runs (a first-touch stream's victims, every page sampled once) against
0.64-0.75 us with the splice (scripts/bench_sampling.py; scattered pages
cost about the same both ways, 1.2-1.35 us).

Invariants kept: the page's state does not change (RESIDENT, same slot,
same flags); a clean page's client mapping was write-protected and is
mapped again write-protected by the MINOR fault's CONTINUE (fp_take_minor, faults.py), so
no write escapes the dirty tracking (invariant 1). Only RESIDENT pages are
sampled, under the page lock, so no write or punch of them is in flight.

Thread and lock: engine thread, page lock held (called from reclaim's
victim refill).
"""
from __future__ import annotations

import ctypes
import fcntl
import os

import numpy as np

from uswap._uffd_cffi import ffi, lib
from uswap.daemon.regionset import PAGE

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.munlock.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_libc.splice.restype = ctypes.c_ssize_t
_libc.splice.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t,
                         ctypes.c_uint)

SYS_PROCESS_MADVISE = 440   # same number on x86-64 and arm64
MADV_DONTNEED = 4
MADV_PAGEOUT = 21
# Pages per round of splice, madvise and process_madvise: what a pipe
# holds at its default maximum size (/proc/sys/fs/pipe-max-size, 1 MiB).
CHUNK_PAGES = 256
SPLICE_F_NONBLOCK = 2


class AccessSampler:
    def __init__(self) -> None:
        self.sampled = 0       # pages taken out of a client's page tables
        self.failed = 0        # sample calls the kernel refused
        self._pipe: tuple[int, int] | None = None
        self._devnull = -1
        self._pipe_pages = CHUNK_PAGES         # pages the pipe holds
        self._own = -1                        # a pidfd of the daemon itself
        self._unlocked: dict[int, int] = {}   # region id -> its daemon mapping, munlocked

    def _unlock_view(self, region) -> bool:
        """The daemon's mapping of a region is locked by its mlockall
        (MCL_FUTURE | MCL_ONFAULT, cli.py): a page it has read through it
        (writeback) is then mlocked, which the kernel's reclaim leaves
        mapped, and MADV_DONTNEED refuses a locked range. That mapping only
        ever reads the client's pages, which are uswap's to evict, not the
        daemon's own memory: it is unlocked once, whole (no VMA split)."""
        if self._unlocked.get(region.id) == region.daddr:
            return True
        if _libc.munlock(region.daddr, region.size) != 0:
            return False
        if len(self._unlocked) > 4096:
            self._unlocked.clear()
        self._unlocked[region.id] = region.daddr
        return True

    def _self_pidfd(self) -> int:
        if self._own < 0:
            self._own = os.pidfd_open(os.getpid())
        return self._own

    def _hold_pipe(self) -> tuple[int, int]:
        if self._pipe is None:
            # Non-blocking: the engine is the pipe's only reader, and must
            # never wait on it with the page lock held.
            r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
            try:
                fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, CHUNK_PAGES * PAGE)
            except OSError:
                pass    # refused (the user's pipe limits): a smaller pipe, smaller chunks
            self._pipe = (r, w)
            self._pipe_pages = max(1, min(CHUNK_PAGES, fcntl.fcntl(w, fcntl.F_GETPIPE_SZ) // PAGE))
            if self._devnull < 0:  # kept across pipes: a dropped pipe (below) must not leak one each time
                self._devnull = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        return self._pipe

    def sample(self, region, pages: np.ndarray) -> bool:
        """Take `pages` (sorted, RESIDENT) of `region` out of its client's
        page tables. True when the kernel took the request for all of them;
        False when the client cannot be reached (no pid, gone, the range
        unmapped or mlocked there; no pidfd held: `region.owner.pidfd`):
        the caller then judges these pages by their fault stamps alone."""
        # The pidfd its session took when it connected (connections.py
        # peer_pidfd), never one opened by pid now: a client that died
        # while its session lives on (another process holds its socket) may
        # have its pid reused, and pidfd_open(pid) reached that process --
        # MADV_PAGEOUT at the dead client's addresses, in another program's
        # memory. Through the held pidfd the call fails (ESRCH).
        pidfd = getattr(region.owner, "pidfd", -1)
        if pidfd < 0 or region.closing or not region.daddr or not len(pages) or not self._unlock_view(region):
            return False
        self._hold_pipe()
        for at in range(0, len(pages), self._pipe_pages):
            if not self._sample_chunk(region, pidfd, pages[at:at + self._pipe_pages]):
                self.failed += 1
                return False
        self.sampled += len(pages)
        return True

    def _sample_chunk(self, region, pidfd: int, pages: np.ndarray) -> bool:
        firsts, counts = _runs(pages)
        nruns = len(firsts)
        r, w = self._hold_pipe()
        # The iovecs are numpy arrays (kept alive by these names until the
        # calls return), built without a Python loop per run: with scattered
        # pages (a run each) building them page by page cost ~2.5 us of
        # Python per sampled page under the page lock (issue 14, mt-mix).
        own_iov = _iovec_array(region.daddr, firsts, counts)
        own = ctypes.c_void_p(own_iov.ctypes.data)  # the daemon's mapping of them
        want = len(pages) * PAGE
        n = lib.us_hold_runs(region.memfd, w, ffi.from_buffer("int64_t[]", firsts),
                             ffi.from_buffer("int64_t[]", counts), nruns, PAGE)
        try:
            if n != want:
                return False    # not all held: none is taken out
            # The daemon's own mapping of them goes (only its page table
            # entries: the memfd keeps every page), or the kernel would see
            # the pages mapped twice and leave them. One call for all runs:
            # process_madvise on itself takes any advice.
            if _libc.syscall(SYS_PROCESS_MADVISE, self._self_pidfd(), own, nruns, MADV_DONTNEED, 0) != want:
                return False
            client_iov = _iovec_array(region.addr, firsts, counts)
            ret = _libc.syscall(SYS_PROCESS_MADVISE, pidfd, ctypes.c_void_p(client_iov.ctypes.data), nruns,
                                MADV_PAGEOUT, 0)
            # Short or -1 (EINVAL: a range the client mlocked or no longer
            # maps; ESRCH: the client is gone): not all of them were sampled.
            return ret == want
        finally:
            while n > 0:
                moved = _libc.splice(r, None, self._devnull, None, n, SPLICE_F_NONBLOCK)
                if moved <= 0:
                    # Never left holding pages: a pipe that cannot be
                    # emptied is dropped (its references with it).
                    for fd in (r, w):
                        os.close(fd)
                    self._pipe = None
                    break
                n -= moved


def _runs(pages: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct page numbers as runs of consecutive pages: (first
    page of each run, its length), as pagetable.runs gives them (a chunk is at most
    CHUNK_PAGES pages, so no run is cut), without a Python loop per run."""
    pages = np.asarray(pages, np.int64)
    breaks = np.flatnonzero(np.diff(pages) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(pages)]))
    # int64, C-contiguous: native/pagehold.h reads them as int64_t[].
    return pages[starts], (ends - starts).astype(np.int64)


def _iovec_array(base: int, firsts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """struct iovec[] (void *base; size_t len) for the runs at `base`: a
    C-contiguous (runs, 2) uint64 array."""
    iov = np.empty((len(firsts), 2), np.uint64)
    iov[:, 0] = np.uint64(base) + firsts.astype(np.uint64) * np.uint64(PAGE)
    iov[:, 1] = counts.astype(np.uint64) * np.uint64(PAGE)
    return iov
