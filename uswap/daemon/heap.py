"""The daemon's malloc settings: large allocations go back to the system
when freed.

glibc raises its mmap threshold to the size of the largest mmapped block
freed so far (up to 32 MiB; its trim threshold to twice that): after the
first scan of a large region frees its temporaries (numpy arrays of a byte
or eight per page: state masks, page lists), later ones of that size come
from the heap and stay in it, free, when released -- 9.7 to 11.6 B per
touched page of the daemon's RSS on the scale row (8 GiB under 1 GiB,
issue 14; /proc/PID/smaps [heap] growth and mallinfo2's fordblks, of which
malloc_trim gave back a third). A fixed threshold (setting it turns the
adjustment off) keeps every allocation of MMAP_THRESHOLD or more in its own
mapping, unmapped on free: [heap] growth 1.9 B per page.
"""
from __future__ import annotations

import ctypes
import logging

log = logging.getLogger("uswap.heap")

M_MMAP_THRESHOLD = -3  # malloc.h
MMAP_THRESHOLD = 256 << 10


def fix_mmap_threshold() -> bool:
    """Set glibc's mmap threshold to MMAP_THRESHOLD for the whole process
    (every thread's arena); False where there is no mallopt (another libc)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        log.info("no mallopt in this libc: large allocations follow its own policy")
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
