"""Python face of the direct-I/O / mmap shim (native/dio.c)."""
from __future__ import annotations

import os

from uswap._dio_cffi import ffi, lib

PROT_READ = 1
PROT_WRITE = 2
MAP_SHARED = 1
MCL_CURRENT, MCL_FUTURE, MCL_ONFAULT = 1, 2, 4


def _check(ret: int, what: str) -> int:
    if ret < 0:
        raise OSError(-ret, f"{what}: {os.strerror(-ret)}")
    return ret


def mmap_shared(fd: int, length: int) -> int:
    """Map `length` bytes of fd read/write, shared; returns the address."""
    return _check(lib.us_mmap(length, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0), "mmap")


def munmap(addr: int, length: int) -> None:
    _check(lib.us_munmap(addr, length), "munmap")


def punch_hole(fd: int, offset: int, length: int) -> None:
    _check(lib.us_punch_hole(fd, offset, length), "fallocate(PUNCH_HOLE)")


def buffer_at(addr: int, length: int) -> memoryview:
    """A writable memoryview over raw memory (kept alive by the caller's mapping)."""
    return memoryview(ffi.buffer(ffi.cast("char *", addr), length))


class AlignedBuffer:
    """Page-aligned memory from the C heap, touched at allocation so the daemon
    never faults on it later (invariant 8)."""

    def __init__(self, size: int, align: int = 4096) -> None:
        self.size = size
        self.addr = _check(lib.us_aligned_alloc(align, size), "posix_memalign")

    def view(self) -> memoryview:
        return buffer_at(self.addr, self.size)

    def free(self) -> None:
        if self.addr:
            lib.us_free(self.addr)
            self.addr = 0


def page_sums(addr: int, npages: int) -> list[int]:
    out = ffi.new("uint32_t[]", npages)
    lib.us_page_sums(addr, npages, out)
    return list(out)


def page_sums_into(addr: int, npages: int, out_cdata) -> None:
    lib.us_page_sums(addr, npages, out_cdata)


def mlockall(current: bool = True, future: bool = True, onfault: bool = True) -> None:
    flags = (MCL_CURRENT if current else 0) | (MCL_FUTURE if future else 0) | (MCL_ONFAULT if onfault else 0)
    _check(lib.us_mlockall(flags), "mlockall")
