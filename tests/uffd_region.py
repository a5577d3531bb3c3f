"""A client's region in this process, for tests of the uffd routines
(tests/daemon/test_readmap.py, test_zero_fill.py): a memfd mapped shared
and registered with a userfaultfd as the daemon registers a region, and
what the kernel holds for it, read back from the kernel: mincore for what
is in the memfd, /proc/self/pagemap's uffd-wp bit for the protection."""
from __future__ import annotations

import contextlib
import os
import struct
from typing import Iterator

from uswap import native, uffd

PAGE = 4096
PM_UFFD_WP = 1 << 57  # /proc/PID/pagemap: the PTE is uffd write-protected


@contextlib.contextmanager
def registered_memfd(npages: int, name: str) -> Iterator[tuple[int, int, int]]:
    """(uffd, memfd, addr): npages of a memfd mapped shared and registered
    for missing, write-protect and minor faults, as a client's region is."""
    memfd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.ftruncate(memfd, npages * PAGE)
    addr = native.mmap_shared(memfd, npages * PAGE)
    fd = uffd.open_uffd()
    uffd.register(fd, addr, npages * PAGE, uffd.REGISTER_MISSING | uffd.REGISTER_WP | uffd.REGISTER_MINOR)
    try:
        yield fd, memfd, addr
    finally:
        uffd.unregister(fd, addr, npages * PAGE)
        native.munmap(addr, npages * PAGE)
        os.close(fd)
        os.close(memfd)


def fill_zeros(fd: int, addr: int, npages: int, write_protect: bool) -> None:
    """Map every page of the region as a zero page, write-protected or not
    (a first touch's fill, uffd.zero_fill), so each is present."""
    zeros = native.AlignedBuffer(npages * PAGE)
    try:
        assert uffd.zero_fill(fd, addr, npages * PAGE, zeros.addr, write_protect) == npages * PAGE
    finally:
        zeros.free()


def write_protected(addr: int, npages: int) -> list[bool]:
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(addr // PAGE * 8)
        return [bool(e & PM_UFFD_WP) for e in struct.unpack(f"{npages}Q", f.read(npages * 8))]


def in_memfd(addr: int, npages: int) -> list[bool]:
    return [bool(b & 1) for b in uffd.resident(addr, npages * PAGE)]
