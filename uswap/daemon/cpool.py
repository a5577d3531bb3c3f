"""Python face of the C I/O pool (native/iopool.c), used for the file store.

The engine queues jobs here exactly where it would queue them on the Python
IoPool, and gets the same (result, error) callbacks from on_completions();
only the executor differs: C threads that never take the GIL.
"""
from __future__ import annotations

import errno
import os
from typing import Callable

import numpy as np

from uswap._iopool_cffi import ffi, lib


class CPool:
    def __init__(self, nthreads: int, eventfd: int) -> None:
        self.pool = lib.us_pool_new(nthreads, eventfd)
        if self.pool == ffi.NULL:
            raise OSError(errno.EAGAIN, "cannot start the C I/O pool")
        self.pending: dict[int, tuple] = {}
        self.next_token = 1
        self.reap_buf = ffi.new("uint64_t[]", 512)

    def _submit(self, job, keep: tuple, on_done: Callable) -> None:
        token = self.next_token
        self.next_token += 1
        job.token = token
        self.pending[token] = (job, keep, on_done)
        lib.us_pool_submit(self.pool, job)

    def read_copy(self, fd: int, buf: int, length: int, off: int, uffd_fd: int, dst: int, mode: int,
                  expected: np.ndarray, sums: np.ndarray, on_done: Callable) -> None:
        job = ffi.new("struct us_job *")
        job.op = lib.US_JOB_READ_COPY
        job.fd, job.uffd, job.buf, job.len, job.off, job.dst, job.mode = fd, uffd_fd, buf, length, off, dst, mode
        job.expected = ffi.cast("uint32_t *", expected.ctypes.data)
        job.sums = ffi.cast("uint32_t *", sums.ctypes.data)
        self._submit(job, (expected, sums, mode), on_done)

    def sum_write(self, fd: int, src: int, length: int, off: int, sums: np.ndarray, on_done: Callable) -> None:
        job = ffi.new("struct us_job *")
        job.op = lib.US_JOB_SUM_WRITE
        job.fd, job.buf, job.len, job.off = fd, src, length, off
        job.sums = ffi.cast("uint32_t *", sums.ctypes.data)
        self._submit(job, (sums,), on_done)

    def completions(self) -> list:
        """Finished jobs as (on_done, result, error), in the IoPool's shape."""
        out = []
        while True:
            n = lib.us_pool_reap(self.pool, self.reap_buf, 512)
            for i in range(n):
                job, keep, on_done = self.pending.pop(self.reap_buf[i])
                err = None
                if job.result < 0:
                    err = OSError(-job.result, f"{'pread' if job.op == lib.US_JOB_READ_COPY else 'pwrite'}"
                                  f" at store offset {job.off}: {os.strerror(-job.result)}")
                if job.op == lib.US_JOB_READ_COPY:
                    result = (keep[1], job.copied, keep[2])
                else:
                    result = keep[0]
                out.append((on_done, None if err else result, err))
            if n < 512:
                return out

    def stop(self) -> None:
        if self.pool != ffi.NULL:
            lib.us_pool_stop(self.pool)
            self.pool = ffi.NULL
