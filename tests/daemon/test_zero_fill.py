"""The zero fill of every first touch (native/uffd_copy.h
us_uffd_zero_fill, uswap.uffd.zero_fill; the fault threads' and
Faults._map_zeros' one rule), in this process on a real
userfaultfd-registered memfd mapping as a client's region is: a writable
fill (UFFDIO_ZEROPAGE) and a write-protected one (a COPY of zeros) both put
zero pages in the memfd, the first writable and the second uffd-wp; a range
split into several VMAs (the client's mprotect of part of it) is filled
page by page; a page present already is reported EEXIST and kept. What the
kernel did is read back from the kernel (mincore, pread of the memfd,
/proc/self/pagemap's uffd-wp bit), as tests/daemon/test_readmap.py does."""
from __future__ import annotations

import ctypes
import errno
import mmap
import os

import pytest

from tests.uffd_region import in_memfd, registered_memfd, write_protected
from uswap import native, uffd

PAGE = 4096
N = 8


@pytest.fixture
def region():
    with registered_memfd(N, "test-zero-fill") as r:
        yield r


@pytest.fixture
def zeros():
    buf = native.AlignedBuffer(N * PAGE)
    yield buf.addr
    buf.free()


def _all_zero(memfd: int) -> bool:
    return os.pread(memfd, N * PAGE, 0) == bytes(N * PAGE)


@pytest.mark.parametrize("write_protect", [False, True], ids=["writable", "write-protected"])
def test_fill_maps_zero_pages_in_the_memfd(region, zeros, write_protect):
    fd, memfd, addr = region
    assert uffd.zero_fill(fd, addr, N * PAGE, zeros, write_protect) == N * PAGE
    assert in_memfd(addr, N) == [True] * N
    assert _all_zero(memfd)
    assert write_protected(addr, N) == [write_protect] * N


@pytest.mark.parametrize("write_protect", [False, True], ids=["writable", "write-protected"])
def test_fill_across_a_vma_split_maps_every_page(region, zeros, write_protect):
    """A multi-page fill over two VMAs fails ENOENT as a whole and maps
    nothing (uffd_copy.h us_uffd_copy): it is then filled page by page."""
    fd, memfd, addr = region
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    assert libc.mprotect(addr + 3 * PAGE, 2 * PAGE, mmap.PROT_READ) == 0  # three VMAs now
    assert uffd.zero_fill(fd, addr, N * PAGE, zeros, write_protect) == N * PAGE
    assert in_memfd(addr, N) == [True] * N
    assert _all_zero(memfd)


@pytest.mark.parametrize("write_protect", [False, True], ids=["writable", "write-protected"])
def test_a_present_page_stops_the_fill_and_is_kept(region, zeros, write_protect):
    """A page in the memfd already (written through it, not mapped): a fill
    starting there is -EEXIST, one reaching it maps the pages before it and
    stops (a short count, for the caller to decide); its bytes are kept."""
    fd, memfd, addr = region
    os.pwrite(memfd, b"\x5a" * PAGE, 5 * PAGE)
    assert uffd.zero_fill(fd, addr + 5 * PAGE, PAGE, zeros, write_protect) == -errno.EEXIST
    assert uffd.zero_fill(fd, addr + 3 * PAGE, 4 * PAGE, zeros, write_protect) == 2 * PAGE
    assert in_memfd(addr, N)[3:6] == [True, True, True]
    assert os.pread(memfd, 3 * PAGE, 3 * PAGE) == bytes(2 * PAGE) + b"\x5a" * PAGE
