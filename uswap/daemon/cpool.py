"""Python face of the C I/O pool (native/iopool.c), used for the stores that
declare native I/O (Store.native_io: the file and nfs:// stores).

The engine queues jobs here exactly where it would queue them on the Python
IoPool, and gets the same (result, error) callbacks from on_completions();
only the executor differs: C threads that never take the GIL.

For nfs:// each job borrows one of the store's lent libnfs contexts
(NativeIo.lender: NfsStore.lend/checkout/checkin) for its whole length, so a
context is only ever used by one job at a time. When none is idle (all busy,
or the server is unreachable and the store is still reconnecting)
read_copy/sum_write queue nothing and return False, and the engine runs that
job on the Python pool.
"""
from __future__ import annotations

import errno
import logging
import os
from typing import Callable

import numpy as np

from uswap._iopool_cffi import ffi, lib
from uswap.daemon.readmap import log_present
from uswap.store.base import NativeIo, Store, require_native_io

# A job's pointer into a numpy array (contiguous; the job's `keep` holds the
# array while the job is in flight): 0.3 us where ffi.cast of .ctypes.data
# took 1.6, five or six of them per swap-in load.
ptr = ffi.from_buffer

log = logging.getLogger("uswap.cpool")


class CPool:
    def __init__(self, nthreads: int, eventfd: int, store: Store) -> None:
        native = require_native_io(store, "the C I/O pool")
        self.fd = native.fd            # kind FD
        self.lender = native.lender    # kind NFS
        self.nfs = native.kind == NativeIo.NFS
        self.pool = lib.us_pool_new(nthreads, eventfd)
        if self.pool == ffi.NULL:
            raise OSError(errno.EAGAIN, "cannot start the C I/O pool")
        self.pending: dict[int, tuple] = {}
        self.next_token = 1
        self.reap_buf = ffi.new("uint64_t[]", 512)
        if self.nfs:
            # One context per worker: a job never waits for a worker behind
            # another job stalled on the server.
            self.lender.lend(nthreads)

    def _job(self, file_op: int, nfs_op: int):
        """A new job on the store's file or on a borrowed NFS context:
        (job, conn), or (None, None) when no NFS context is idle."""
        job = ffi.new("struct us_job *")
        conn = None
        if self.nfs:
            conn = self.lender.checkout()
            if conn is None:
                return None, None
            job.op = nfs_op
            job.nfs = ffi.cast("struct nfs_context *", conn.ctx)
            job.nfsfh = ffi.cast("struct nfsfh *", conn.fh)
        else:
            job.op = file_op
            job.fd = self.fd
        return job, conn

    def _submit(self, job, conn, keep: tuple, on_done: Callable) -> None:
        token = self.next_token
        self.next_token += 1
        job.token = token
        self.pending[token] = (job, conn, keep, on_done)
        lib.us_pool_submit(self.pool, job)

    def read_copy(self, buf: int, length: int, off: int, uffd_fd: int, dst: int, view: int, mode: int,
                  write_page: int, expected: np.ndarray, sums: np.ndarray, skip: np.ndarray | None,
                  mapped: np.ndarray, on_done: Callable, runs: np.ndarray | None = None) -> bool:
        """Queue a swap-in: one store read of `length` bytes at `off` -- or,
        with `runs` (int64, one row (page index, slot, pages) per run of
        adjacent slots: a stream's window over scattered slots), one read
        per run into its place in the buffer -- then native/readmap.h's
        us_verify_map (the page at index write_page writable, the others
        with `mode`; uffd.NO_WRITE_PAGE: none; the pages marked in `skip`,
        a uint8 array or None, never mapped; `view`: the daemon's mapping of
        the pages at dst, where a page found present gets its store copy;
        `mapped`, a uint8 array, set to which pages were mapped). False if
        not queued."""
        job, conn = self._job(lib.US_JOB_READ_COPY, lib.US_JOB_READ_COPY_NFS)
        if job is None:
            return False
        job.uffd, job.buf, job.len, job.off, job.dst, job.mode = uffd_fd, buf, length, off, dst, mode
        job.view = view
        job.write_page = write_page
        job.expected = ptr("uint32_t[]", expected)
        job.sums = ptr("uint32_t[]", sums)
        job.mapped = ptr("uint8_t[]", mapped)
        if skip is not None:
            job.skip = ptr("uint8_t[]", skip)
        if runs is not None:
            runs = np.ascontiguousarray(runs, np.int64)
            job.runs = ptr("int64_t[]", runs)
            job.nruns = len(runs)
        self._submit(job, conn, (expected, sums, skip, mode, runs, mapped), on_done)
        return True

    def sum_write(self, src: int, length: int, off: int, sums: np.ndarray, zero: np.ndarray,
                  on_done: Callable, gather: np.ndarray | None = None) -> bool:
        """Queue a writeback (checksum and all-zero flag of each page into
        sums (uint32) and zero (uint8), then write); False if not queued. The
        result passed to on_done is (sums, zero). With `gather` (uint64 page
        addresses), src is a buffer the pages are copied into first."""
        job, conn = self._job(lib.US_JOB_SUM_WRITE, lib.US_JOB_SUM_WRITE_NFS)
        if job is None:
            return False
        job.buf, job.len, job.off = src, length, off
        job.sums = ptr("uint32_t[]", sums)
        job.zero = ptr("uint8_t[]", zero)
        if gather is not None:
            job.gather = ptr("uint64_t[]", gather)
        self._submit(job, conn, ((sums, zero), gather), on_done)
        return True

    def _finish(self, job, conn) -> OSError | None:
        """The store error of a finished job (None: the call succeeded); an
        NFS context goes back to the store with it."""
        reading = job.op in (lib.US_JOB_READ_COPY, lib.US_JOB_READ_COPY_NFS)
        err = None
        if job.result < 0:
            if conn is not None:
                err = self.lender.io_error(conn, "read" if reading else "write", job.len, job.off, -job.result)
            else:
                err = OSError(-job.result, f"{'pread' if reading else 'pwrite'}"
                              f" at store offset {job.off}: {os.strerror(-job.result)}")
        if conn is not None:
            self.lender.checkin(conn, err)
        return err

    def completions(self) -> list:
        """Finished jobs as (on_done, result, error), in the IoPool's shape."""
        out = []
        while True:
            n = lib.us_pool_reap(self.pool, self.reap_buf, 512)
            for i in range(n):
                job, conn, keep, on_done = self.pending.pop(self.reap_buf[i])
                err = self._finish(job, conn)
                if job.op in (lib.US_JOB_READ_COPY, lib.US_JOB_READ_COPY_NFS):
                    result = (keep[1], job.copied, keep[3], keep[5])
                    log_present(job.present, job.dst)
                else:
                    result = keep[0]
                out.append((on_done, None if err else result, err))
            if n < 512:
                return out

    def stop(self) -> None:
        """Finish queued jobs and stop the threads (after the engine drained,
        so none should be left); borrowed contexts go back to the store."""
        if self.pool != ffi.NULL:
            lib.us_pool_stop(self.pool)
            self.pool = ffi.NULL
            for job, conn, _, _ in self.pending.values():
                if conn is not None:
                    self._finish(job, conn)
            self.pending.clear()
