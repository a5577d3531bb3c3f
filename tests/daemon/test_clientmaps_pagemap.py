"""clientmaps.in_page_tables against the kernel's real pagemap, in this
process: a memfd mapped twice (a registered "client" mapping and a plain
"daemon" one), as uswap maps a region.

Guards the decoding: a page mapped by UFFDIO_COPY is held; the uffd-wp
marker a punch of a write-protected page leaves is not, although pagemap
sets PM_SWAP for it (6.18: PM_SWAP|PM_UFFD_WP, no PM_FILE) -- a rule of
"present or swapped", meant to count a migration entry (PM_SWAP|PM_FILE),
would take every punched page for a mapped one; a page the client dropped
with MADV_DONTNEED (data still in the memfd) and a zero page planted
through the other mapping are not held (callers look at the bytes:
resolve.py _not_loaded, fork.py _loaded)."""
from __future__ import annotations

import ctypes
import os

import numpy as np

from uswap import native, uffd
from uswap.daemon import clientmaps

PAGE = 4096
_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long)


def test_in_page_tables_reads_present_and_migration_not_markers():
    n = 5
    fd = os.memfd_create("pagemap-test")
    os.ftruncate(fd, n * PAGE)
    client, view = native.mmap_shared(fd, n * PAGE), native.mmap_shared(fd, n * PAGE)
    u = uffd.open_uffd()
    try:
        uffd.register(u, client, n * PAGE, uffd.REGISTER_MISSING | uffd.REGISTER_WP | uffd.REGISTER_MINOR)
        src = ctypes.create_string_buffer(b"\x5a" * PAGE, PAGE)
        assert uffd.copy(u, client, ctypes.addressof(src), PAGE, 0) == PAGE  # 0: mapped writable
        assert uffd.copy(u, client + PAGE, ctypes.addressof(src), PAGE, uffd.COPY_MODE_WP) == PAGE
        assert _libc.fallocate(fd, 3, PAGE, PAGE) == 0  # 1: punched while write-protected: a marker
        assert uffd.copy(u, client + 2 * PAGE, ctypes.addressof(src), PAGE, 0) == PAGE
        assert _libc.madvise(client + 2 * PAGE, PAGE, 4) == 0  # 2: MADV_DONTNEED: still in the memfd
        ctypes.string_at(view + 3 * PAGE, 1)  # 3: planted through the other mapping
        # 4: a hole
        with open("/proc/self/pagemap", "rb", buffering=0) as f:
            f.seek(8 * ((client + PAGE) // PAGE))
            marker = int.from_bytes(f.read(8), "little")
        assert marker & clientmaps.PM_SWAP and not marker & (clientmaps.PM_PRESENT | clientmaps.PM_FILE), hex(marker)
        held = clientmaps.in_page_tables(os.getpid(), client, np.array([4, 0, 1, 2, 3]))
        assert held.tolist() == [False, True, False, False, False]
        assert uffd.resident(view + 2 * PAGE, 2 * PAGE) == b"\x01\x01"  # 2 and 3 are in the memfd
    finally:
        os.close(u)
        native.munmap(client, n * PAGE)
        native.munmap(view, n * PAGE)
        os.close(fd)
