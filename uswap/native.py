"""Python face of the direct-I/O / mmap shim (native/dio.c)."""
from __future__ import annotations

import ctypes
import os

from uswap._dio_cffi import ffi, lib

_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
MADV_DONTDUMP = 16

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


def map_client_view(memfd: int, length: int) -> int:
    """The daemon's own mapping of a client's region memfd (every `daddr`:
    region.py, fork.py, adoption.py), left out of the daemon's core dumps
    (MADV_DONTDUMP).

    Why: a dump reads every page of every mapping it includes, and on a
    shmem mapping a read of a hole allocates a zero page in the memfd --
    a swapped page's hole. A daemon dying with a core dumper installed
    (systemd-coredump takes the whole process whatever LimitCORE says)
    would leave its successor a zero page over every swapped page, which
    adoption takes as a read that completed (a LOADING page): lost data. (A
    swap-in that finds such a page writes the store copy over it,
    native/readmap.h.) The client's memory has no place in the daemon's
    dumps in any case."""
    addr = mmap_shared(memfd, length)
    if _libc.madvise(ctypes.c_void_p(addr), ctypes.c_size_t(length), MADV_DONTDUMP) != 0:
        err = ctypes.get_errno()
        munmap(addr, length)
        raise OSError(err, f"madvise(MADV_DONTDUMP): {os.strerror(err)}")
    return addr


def munmap(addr: int, length: int) -> None:
    _check(lib.us_munmap(addr, length), "munmap")


def reserve(addr: int, length: int) -> None:
    """Replace the mapping at addr..addr+length with an inaccessible reservation
    (PROT_NONE, never populated), atomically: the range cannot be taken by
    another mapping until it is munmapped."""
    _check(lib.us_reserve(addr, length), "mmap(PROT_NONE, MAP_FIXED)")


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


def page_sums(addr: int, npages: int) -> tuple[list[int], list[bool]]:
    """CRC32C of each page at addr, and whether each page is all zeros
    (native/pagesum.h: both from one pass over the page)."""
    sums = ffi.new("uint32_t[]", npages)
    zero = ffi.new("uint8_t[]", npages)
    lib.us_page_sums(addr, npages, sums, zero)
    return list(sums), [bool(z) for z in zero]


def page_sums_into(addr: int, npages: int, sums_cdata, zero_cdata=ffi.NULL) -> None:
    """page_sums into caller-owned C arrays (uint32_t sums[npages], and
    uint8_t zero[npages] unless NULL)."""
    lib.us_page_sums(addr, npages, sums_cdata, zero_cdata)


def crc32c(data: bytes, hardware: bool = True) -> int:
    """Standard CRC32C of `data` (the page checksum's function); with
    hardware=False the portable software path is used even where the CPU
    has the crc32 instruction."""
    return lib.us_crc32c(data, len(data), 1 if hardware else 0)


def crc32c_hardware() -> bool:
    """True when checksums use the CPU's crc32 instruction (SSE4.2)."""
    return bool(lib.us_crc32c_hw_available())


def mlockall(current: bool = True, future: bool = True, onfault: bool = True) -> None:
    flags = (MCL_CURRENT if current else 0) | (MCL_FUTURE if future else 0) | (MCL_ONFAULT if onfault else 0)
    _check(lib.us_mlockall(flags), "mlockall")
