"""The write-protect of a page list (native/uffd.c
us_uffd_writeprotect_pages, uswap.uffd.writeprotect_pages: a gathered
write's pages in start_writeback, a fork's dirty pages, un-protecting parked
writers) and the ENOENT rule of one range (us_uffd_wp_range,
uswap.uffd.writeprotect), in this process on a real userfaultfd-registered
memfd mapping as a client's region is: exactly the pages given are
protected, never one between two runs; a range across VMAs (the client's
mprotect of part of it) is protected whole; a run reaching a page the
client unregistered fails ENOENT as a whole and is then done page by page,
stopping at that page, and the result says how many pages were done and
why it stopped. What the kernel did is read back from the kernel
(/proc/self/pagemap's uffd-wp bit), as tests/daemon/test_zero_fill.py does."""
from __future__ import annotations

import ctypes
import errno
import mmap

import numpy as np
import pytest

from tests.uffd_region import fill_zeros, registered_memfd, write_protected
from uswap import uffd

PAGE = 4096
N = 24


@pytest.fixture
def region():
    """The region with every page mapped writable (a zero fill), so that
    pagemap's uffd-wp bit is the protection of a present page."""
    with registered_memfd(N, "test-wp-pages") as (fd, memfd, addr):
        fill_zeros(fd, addr, N, write_protect=False)
        assert write_protected(addr, N) == [False] * N
        yield fd, memfd, addr


def _only(pages) -> list[bool]:
    return [p in set(pages) for p in range(N)]


def _mprotect(addr: int, length: int, prot: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    assert libc.mprotect(addr, length, prot) == 0


def test_exactly_the_pages_given_are_protected_and_unprotected(region):
    fd, _, addr = region
    pages = np.array([1, 2, 3, 7, 10, 11, 20, 23], np.int64)
    assert uffd.writeprotect_pages(fd, addr, pages, protect=True, wake=False) == (len(pages), 0)
    assert write_protected(addr, N) == _only(pages)
    # Un-protected again, two of them: the others stay.
    assert uffd.writeprotect_pages(fd, addr, pages[[2, 4]], protect=False) == (2, 0)
    assert write_protected(addr, N) == _only([1, 2, 7, 11, 20, 23])
    assert uffd.writeprotect_pages(fd, addr, pages[:0], protect=True, wake=False) == (0, 0)
    assert write_protected(addr, N) == _only([1, 2, 7, 11, 20, 23])


def test_any_index_array_is_taken_as_int64(region):
    """A strided view or an int32 array (what numpy hands out) means the
    same pages, not its raw bytes read as int64."""
    fd, _, addr = region
    pages = np.arange(0, N, 3, dtype=np.int32)
    assert uffd.writeprotect_pages(fd, addr, pages, protect=True, wake=False) == (len(pages), 0)
    assert write_protected(addr, N) == _only(pages.tolist())
    strided = np.arange(N, dtype=np.int64)[1::5]
    assert uffd.writeprotect_pages(fd, addr, strided, protect=True, wake=False) == (len(strided), 0)
    assert write_protected(addr, N) == _only(pages.tolist() + strided.tolist())


def test_runs_across_a_vma_split_are_protected_whole(region):
    """The client's mprotect of part of its region splits its VMA; the runs
    over the boundaries are protected, every page of them and no other."""
    fd, _, addr = region
    _mprotect(addr + 4 * PAGE, 3 * PAGE, mmap.PROT_READ)  # three VMAs now
    _mprotect(addr + 12 * PAGE, PAGE, mmap.PROT_READ)  # five
    pages = np.r_[2:9, 11:14, 16].astype(np.int64)
    assert uffd.writeprotect_pages(fd, addr, pages, protect=True, wake=False) == (len(pages), 0)
    assert write_protected(addr, N) == _only(pages.tolist())
    assert uffd.writeprotect_pages(fd, addr, pages, protect=False) == (len(pages), 0)
    assert write_protected(addr, N) == [False] * N


@pytest.mark.parametrize("protect", [True, False], ids=["protect", "unprotect"])
def test_a_page_unregistered_stops_the_list_at_that_page(region, protect):
    """Page 9 unregistered by the client: the run 7..11 over it fails ENOENT
    as a whole, is done page by page, and stops at 9. Done: the pages
    before it in the list (1, 2, 7, 8); the error: page 9's ENOENT. The
    pages after it (10, 11, 15) are left as they were."""
    fd, _, addr = region
    pages = np.array([1, 2, 7, 8, 9, 10, 11, 15], np.int64)
    if not protect:
        uffd.writeprotect_pages(fd, addr, pages, protect=True, wake=False)
    uffd.unregister(fd, addr + 9 * PAGE, PAGE)
    before = write_protected(addr, N)
    assert uffd.writeprotect_pages(fd, addr, pages, protect=protect, wake=False) == (4, -errno.ENOENT)
    after = write_protected(addr, N)
    assert [after[p] for p in (1, 2, 7, 8)] == [protect] * 4
    assert [after[p] for p in (10, 11, 15)] == [before[p] for p in (10, 11, 15)] == [not protect] * 3
    # Started past it, the rest goes through.
    assert uffd.writeprotect_pages(fd, addr, pages[5:], protect=protect, wake=False) == (3, 0)
    assert [write_protected(addr, N)[p] for p in (10, 11, 15)] == [protect] * 3


def test_a_list_starting_at_an_unregistered_page_does_nothing(region):
    fd, _, addr = region
    uffd.unregister(fd, addr + 5 * PAGE, PAGE)
    assert uffd.writeprotect_pages(fd, addr, np.array([5, 6, 7], np.int64),
                                   protect=True, wake=False) == (0, -errno.ENOENT)
    assert write_protected(addr, N) == [False] * N


def test_one_range_over_an_unregistered_page_is_done_up_to_it(region):
    """uffd.writeprotect (one range): the same ENOENT rule, from the same C
    function: the pages before the unregistered one protected, its error
    returned, the ones after it untouched."""
    fd, _, addr = region
    uffd.unregister(fd, addr + 9 * PAGE, PAGE)
    assert uffd.writeprotect(fd, addr + 6 * PAGE, 6 * PAGE, protect=True) == -errno.ENOENT
    assert write_protected(addr, N) == _only([6, 7, 8])
