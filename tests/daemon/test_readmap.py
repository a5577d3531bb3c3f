"""The verify-and-map routine of every swap-in (native/readmap.h
us_verify_map, reached from Python as uffd.verify_map, which
uswap/daemon/readmap.py calls after the store's read), in this process on a
real userfaultfd-registered memfd mapping: only the pages whose checksum
matches are mapped, the write page writable and the others write-protected
from one buffer, and a page present already is kept. What the kernel did is
read back from the kernel: mincore for what is in the memfd, the memfd's
bytes with pread (never through the registered mapping, whose missing pages
nobody would serve), and /proc/self/pagemap's uffd-wp bit for the
protection."""
from __future__ import annotations

import os

import numpy as np
import pytest

from tests.uffd_region import in_memfd, registered_memfd, write_protected
from uswap import native, uffd

PAGE = 4096
N = 8


@pytest.fixture
def region():
    with registered_memfd(N, "test-readmap") as r:
        yield r


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


def _verify_map(fd: int, addr: int, buf, expected, mode: int, write_page: int, skip=None):
    sums = np.zeros(N, np.uint32)
    present = np.zeros(1, np.int32)
    ret = uffd.verify_map(fd, addr, buf.addr, N, mode, write_page, expected, sums, skip, present)
    return ret, sums, int(present[0])


def test_failed_page_unmapped_write_page_writable_rest_protected(region, loaded):
    fd, memfd, addr = region
    buf, expected = loaded
    expected = expected.copy()
    expected[5] ^= 1  # page 5's slot copy is damaged
    ret, sums, present = _verify_map(fd, addr, buf, expected, uffd.COPY_MODE_WP, 2)
    assert ret == (N - 1) * PAGE
    assert present == 0
    assert (sums != expected).tolist() == [i == 5 for i in range(N)]  # every sum reported
    assert _in_memfd(addr) == [i != 5 for i in range(N)]  # invariant 6: page 5 never mapped
    assert _write_protected(addr) == [i not in (2, 5) for i in range(N)]
    for i in range(N):
        if i != 5:
            assert os.pread(memfd, PAGE, i * PAGE) == bytes([i + 1]) * PAGE


def test_writable_mode_maps_every_page_writable(region, loaded):
    fd, _, addr = region
    buf, expected = loaded
    ret, _, _ = _verify_map(fd, addr, buf, expected, 0, 3)
    assert ret == N * PAGE
    assert _in_memfd(addr) == [True] * N
    assert _write_protected(addr) == [False] * N


def test_present_page_is_kept_and_counted(region, loaded):
    fd, memfd, addr = region
    buf, expected = loaded
    os.pwrite(memfd, b"\xee" * PAGE, 6 * PAGE)  # written through the memfd while it loaded: newer
    ret, _, present = _verify_map(fd, addr, buf, expected, uffd.COPY_MODE_WP, uffd.NO_WRITE_PAGE)
    assert ret == N * PAGE
    assert present == 1
    assert os.pread(memfd, PAGE, 6 * PAGE) == b"\xee" * PAGE
    assert os.pread(memfd, PAGE, 7 * PAGE) == bytes([8]) * PAGE  # the run went on past it
    assert _in_memfd(addr) == [True] * N


def test_pages_read_through_are_never_mapped(region, loaded):
    """A read-ahead window read through pages that are not its own (skip):
    a resident one keeps its newer bytes and is not counted present, an
    absent one stays absent; the runs either side are mapped."""
    fd, memfd, addr = region
    buf, expected = loaded
    os.pwrite(memfd, b"\xdd" * PAGE, 3 * PAGE)  # resident, dirty: newer than the bytes read for it
    skip = np.zeros(N, np.uint8)
    skip[[3, 4]] = 1
    ret, _, present = _verify_map(fd, addr, buf, expected, uffd.COPY_MODE_WP, uffd.NO_WRITE_PAGE, skip)
    assert ret == (N - 2) * PAGE
    assert present == 0
    assert os.pread(memfd, PAGE, 3 * PAGE) == b"\xdd" * PAGE
    assert _in_memfd(addr) == [i != 4 for i in range(N)]
    for i in range(N):
        if i not in (3, 4):
            assert os.pread(memfd, PAGE, i * PAGE) == bytes([i + 1]) * PAGE
