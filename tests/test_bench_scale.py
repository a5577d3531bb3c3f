"""The scale row's memory figure (scripts/bench_scale.py `daemon_memory`,
`metadata_rss`), measured on this test process: the pages of a file mapped
MAP_SHARED read-write (as the daemon maps its page tables) count; pages of
shared library code first touched do not -- a private read-only file
mapping stands for them here. RssFile counts both: numpy's code alone was
1.6-2.3 MB of the --quick row's metadata growth."""
from __future__ import annotations

import mmap
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))

import bench_scale  # noqa: E402

PAGES = 64


def test_shared_file_pages_count_and_library_code_does_not(tmp_path):
    path = tmp_path / "region-1.table"
    path.write_bytes(b"\0" * (PAGES * mmap.PAGESIZE))
    lib = tmp_path / "libcode.so"
    lib.write_bytes(b"\x90" * (PAGES * mmap.PAGESIZE))
    with open(path, "r+b") as f:
        table = mmap.mmap(f.fileno(), PAGES * mmap.PAGESIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    with open(lib, "rb") as f:
        code = mmap.mmap(f.fileno(), PAGES * mmap.PAGESIZE, mmap.MAP_PRIVATE, mmap.PROT_READ)
    try:
        before = bench_scale.daemon_memory(os.getpid())
        for page in range(PAGES):
            table[page * mmap.PAGESIZE] = 1
        # A private read-only mapping of a file, as a shared library's code
        # and constants are mapped: file RSS of this process (RssFile), not
        # metadata.
        for page in range(PAGES):
            code[page * mmap.PAGESIZE]
        after = bench_scale.daemon_memory(os.getpid())
        grown = bench_scale.metadata_rss(after) - bench_scale.metadata_rss(before)
        # The table's pages, and what the anonymous RSS did meanwhile (this
        # process's own heap: a few pages at most), nothing else of RssFile's.
        assert after["RssFile"] - before["RssFile"] >= 2 * PAGES * mmap.PAGESIZE  # both files' pages
        assert grown - PAGES * mmap.PAGESIZE == after["RssAnon"] - before["RssAnon"], (before, after)
        assert after["RssState"] - before["RssState"] == PAGES * mmap.PAGESIZE
    finally:
        table.close()
        code.close()
