"""The sampler's iovecs (sampling.py _runs, _iovec_array) are built with
numpy, not a Python loop per run (issue 14: ~2.5 us of Python per scattered
sampled page, under the page lock): the same struct iovec[] bytes as the
runs pagetable.runs gives, for scattered pages, adjacent ones and mixes."""
from __future__ import annotations

import ctypes

import numpy as np

from uswap.daemon import pagetable as pt
from uswap.daemon.sampling import CHUNK_PAGES, PAGE, _iovec_array, _runs


class Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def reference(base: int, pages: np.ndarray) -> bytes:
    runs = pt.runs(pages, CHUNK_PAGES)
    return bytes((Iovec * len(runs))(*[(base + first * PAGE, n * PAGE) for first, n in runs]))


def test_iovecs_match_the_runs_of_every_chunk():
    rng = np.random.default_rng(3)
    base = 0x7F12_3456_7000
    cases = [np.array([5]), np.arange(10, 10 + CHUNK_PAGES), np.array([0, 1, 2, 7, 9, 10, 200])]
    for _ in range(50):
        cases.append(np.sort(rng.choice(1 << 20, int(rng.integers(1, CHUNK_PAGES + 1)), replace=False)))
        start = int(rng.integers(0, 1 << 20))
        cases.append(np.unique(start + np.cumsum(rng.integers(1, 3, CHUNK_PAGES)))[:CHUNK_PAGES])
    for pages in cases:
        firsts, counts = _runs(pages)
        iov = _iovec_array(base, firsts, counts)
        assert iov.flags.c_contiguous and iov.dtype == np.uint64 and iov.shape == (len(firsts), 2)
        assert iov.tobytes() == reference(base, pages), pages
        assert int(counts.sum()) == len(pages)
