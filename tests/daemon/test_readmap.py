"""The verify-and-map routine of every swap-in (native/readmap.h
us_verify_map, reached from Python as uffd.verify_map, which
uswap/daemon/readmap.py calls after the store's read), in this process on a
real userfaultfd-registered memfd mapping: only the pages whose checksum
matches are mapped, the write page writable and the others write-protected
from one buffer, and a page found present in the memfd (written through it,
or planted by a read of the daemon's own mapping of a hole) is replaced by
its verified store copy and mapped with the protection the COPY would have
given it: the store copy wins. A second shared mapping of the memfd stands
for the daemon's (region.daddr). What the kernel did is read back from the
kernel: mincore for what is in the memfd, the memfd's bytes with pread
(never through the registered mapping, whose missing pages nobody would
serve), and /proc/self/pagemap's uffd-wp bit for the protection."""
from __future__ import annotations

import ctypes
import errno
import os

import numpy as np
import pytest

from tests.uffd_region import in_memfd, registered_memfd, write_protected
from uswap import native, uffd

PAGE = 4096
N = 8


@pytest.fixture
def region():
    """(uffd, memfd, addr, view): the client's registered mapping at addr,
    the daemon's own mapping of the same memfd at view."""
    with registered_memfd(N, "test-readmap") as (fd, memfd, addr):
        view = native.map_client_view(memfd, N * PAGE)
        try:
            yield fd, memfd, addr, view
        finally:
            native.munmap(view, N * PAGE)


@pytest.fixture
def loaded():
    """A buffer as a store read leaves it: N pages, page i filled with byte
    i + 1, and the checksums the page table holds for them."""
    buf = native.AlignedBuffer(N * PAGE)
    for i in range(N):
        buf.view()[i * PAGE:(i + 1) * PAGE] = bytes([i + 1]) * PAGE
    expected = np.array(native.page_sums(buf.addr, N)[0], np.uint32)
    yield buf, expected
    buf.free()


def _write_protected(addr: int) -> list[bool]:
    return write_protected(addr, N)


def _in_memfd(addr: int) -> list[bool]:
    return in_memfd(addr, N)


def _verify_map(region, buf, expected, mode: int, write_page: int, skip=None):
    """(bytes mapped or -errno, sums, pages found present, which pages were mapped)."""
    fd, _, addr, view = region
    sums = np.zeros(N, np.uint32)
    present = np.zeros(1, np.int32)
    mapped = np.full(N, 7, np.uint8)  # every entry is written
    ret = uffd.verify_map(fd, addr, view, buf.addr, N, mode, write_page, expected, sums, skip, mapped, present)
    return ret, sums, int(present[0]), mapped.tolist()


def _assert_all_mapped_from_the_load(region, result, present: int) -> None:
    """`result` (_verify_map's) mapped the whole load, `present` of its
    pages found present in the memfd and replaced: every page of the memfd
    holds its verified copy (page i: byte i + 1) and is in the memfd."""
    _, memfd, addr, _ = region
    ret, _, got_present, mapped = result
    assert ret == N * PAGE
    assert got_present == present
    assert mapped == [True] * N
    for i in range(N):
        assert os.pread(memfd, PAGE, i * PAGE) == bytes([i + 1]) * PAGE, i
    assert _in_memfd(addr) == [True] * N


def _plant_zero_page(view: int, page: int) -> None:
    """Read the daemon's mapping at a hole, as /proc/PID/mem or a debugger
    would: shmem allocates a page of zeros in the memfd."""
    assert ctypes.string_at(view + page * PAGE, PAGE) == bytes(PAGE)


def test_failed_page_unmapped_write_page_writable_rest_protected(region, loaded):
    _, memfd, addr, _ = region
    buf, expected = loaded
    expected = expected.copy()
    expected[5] ^= 1  # page 5's slot copy is damaged
    ret, sums, present, mapped = _verify_map(region, buf, expected, uffd.COPY_MODE_WP, 2)
    assert ret == (N - 1) * PAGE
    assert present == 0
    assert mapped == [i != 5 for i in range(N)]
    assert (sums != expected).tolist() == [i == 5 for i in range(N)]  # every sum reported
    assert _in_memfd(addr) == [i != 5 for i in range(N)]  # invariant 6: page 5 never mapped
    assert _write_protected(addr) == [i not in (2, 5) for i in range(N)]
    for i in range(N):
        if i != 5:
            assert os.pread(memfd, PAGE, i * PAGE) == bytes([i + 1]) * PAGE


def test_writable_mode_maps_every_page_writable(region, loaded):
    _, _, addr, _ = region
    buf, expected = loaded
    ret, _, _, _ = _verify_map(region, buf, expected, 0, 3)
    assert ret == N * PAGE
    assert _in_memfd(addr) == [True] * N
    assert _write_protected(addr) == [False] * N


def test_present_pages_get_the_store_copy_with_the_mode_of_the_copy(region, loaded):
    """A LOADING page is a hole in the client's mapping; one found present
    in the memfd was put there another way -- written through the memfd
    (page 6), or a page of zeros planted by a read of the daemon's mapping
    (page 2, the write fault's page) -- and the store copy wins: each is
    overwritten by its verified copy and mapped as the COPY would have
    mapped it, write-protected, the write page writable. Before, both were
    kept: the client read 0xee and zeros."""
    _, memfd, addr, view = region
    buf, expected = loaded
    os.pwrite(memfd, b"\xee" * PAGE, 6 * PAGE)
    _plant_zero_page(view, 2)
    _assert_all_mapped_from_the_load(region, _verify_map(region, buf, expected, uffd.COPY_MODE_WP, 2), 2)
    assert _write_protected(addr) == [i != 2 for i in range(N)]
    # Mapped in the client (read through its own mapping: no fault to serve).
    assert ctypes.string_at(addr + 2 * PAGE, PAGE) == bytes([3]) * PAGE
    assert ctypes.string_at(addr + 6 * PAGE, PAGE) == bytes([7]) * PAGE


def test_present_page_in_a_writable_load(region, loaded):
    """Drain and a stream being rewritten map every page writable: a
    present page is replaced and mapped writable too."""
    _, memfd, addr, view = region
    buf, expected = loaded
    _plant_zero_page(view, 4)
    ret, _, present, _ = _verify_map(region, buf, expected, 0, uffd.NO_WRITE_PAGE)
    assert ret == N * PAGE
    assert present == 1
    assert os.pread(memfd, PAGE, 4 * PAGE) == bytes([5]) * PAGE
    assert _write_protected(addr) == [False] * N


def test_copy_stopping_part_way_says_which_pages_it_mapped(region, loaded):
    """A COPY that fails part way (here page 7 is not registered: ENOENT)
    returns the -errno, and `mapped` names the pages mapped before it --
    the replaced present page 5 among them -- so that a retry maps only
    the others and never meets its own pages present (swapin.py _load_done)."""
    fd, memfd, addr, view = region
    buf, expected = loaded
    uffd.unregister(fd, addr + 7 * PAGE, PAGE)
    _plant_zero_page(view, 5)
    ret, _, present, mapped = _verify_map(region, buf, expected, uffd.COPY_MODE_WP, uffd.NO_WRITE_PAGE)
    assert ret == -errno.ENOENT
    assert present == 1
    assert mapped == [i != 7 for i in range(N)]
    assert os.pread(memfd, PAGE, 5 * PAGE) == bytes([6]) * PAGE
    assert _in_memfd(addr) == [i != 7 for i in range(N)]


def test_pages_read_through_are_never_mapped(region, loaded):
    """A read-ahead window read through pages that are not its own (skip):
    a resident one keeps its newer bytes (never written over: the store
    copy wins only over the load's own pages) and is not counted present,
    an absent one stays absent; the runs either side are mapped."""
    _, memfd, addr, _ = region
    buf, expected = loaded
    os.pwrite(memfd, b"\xdd" * PAGE, 3 * PAGE)  # resident, dirty: newer than the bytes read for it
    skip = np.zeros(N, np.uint8)
    skip[[3, 4]] = 1
    ret, _, present, mapped = _verify_map(region, buf, expected, uffd.COPY_MODE_WP, uffd.NO_WRITE_PAGE, skip)
    assert ret == (N - 2) * PAGE
    assert present == 0
    assert mapped == [i not in (3, 4) for i in range(N)]
    assert os.pread(memfd, PAGE, 3 * PAGE) == b"\xdd" * PAGE
    assert _in_memfd(addr) == [i != 4 for i in range(N)]
    for i in range(N):
        if i not in (3, 4):
            assert os.pread(memfd, PAGE, i * PAGE) == bytes([i + 1]) * PAGE


def test_present_page_across_a_vma_split(region, loaded):
    """Reviewer (rv4): the client split its region (mprotect on part of it,
    still registered), so the run's COPY fails ENOENT and goes page by page
    (uffd_copy.h); a present page just past the split is replaced and
    mapped there too, and `mapped` names every page."""
    _, _, addr, view = region
    buf, expected = loaded
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.mprotect(ctypes.c_void_p(addr + 4 * PAGE), ctypes.c_size_t(4 * PAGE), 1) == 0  # PROT_READ
    _plant_zero_page(view, 4)
    _plant_zero_page(view, 1)
    _assert_all_mapped_from_the_load(region, _verify_map(region, buf, expected, uffd.COPY_MODE_WP,
                                                         uffd.NO_WRITE_PAGE), 2)
    assert _write_protected(addr) == [True] * N
