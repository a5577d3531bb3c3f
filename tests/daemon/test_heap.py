"""`heap.py` `fix_mmap_threshold`, in a fresh interpreter (the setting is
the process's): a block as large as a scan's temporary over a big region
(1 MiB: a byte per page of 4 GiB) gets its own mapping even after a larger
one was freed, so freeing it gives its memory back; glibc's default would
have raised its threshold past it and kept it in the heap, free (the scale
row's heap growth, issue 14)."""
from __future__ import annotations

import subprocess
import sys

PROGRAM = r"""
import ctypes, sys
import numpy as np
from uswap.daemon import heap

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "fixed":
    assert heap.fix_mmap_threshold()
big = np.ones(8 << 20, np.uint8)  # mmapped at any threshold; freed: glibc's default raises it to 8 MiB
del big
before = libc.mallinfo2().hblks
scan = np.ones(1 << 20, np.uint8)
print(libc.mallinfo2().hblks - before)
"""


def mapped_blocks(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, check=True)
    return int(out.stdout)


def test_a_large_block_is_mapped_after_a_larger_one_was_freed():
    assert mapped_blocks("fixed") == 1


def test_the_control_without_the_setting_keeps_it_in_the_heap():
    # glibc's dynamic threshold, which the setting turns off: if this ever
    # fails, the libc no longer needs fix_mmap_threshold.
    assert mapped_blocks("default") == 0
