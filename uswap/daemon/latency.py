"""Latency histograms: swap-in (a store read, from the fault that asked for
it to its pages mapped) and fault service (a page fault, from when the
daemon took it to when the faulting thread may run again).

The bucket bounds are declared once, in native/fastpath.h (fp_lat_bounds),
and counted by one function, fp_hist_observe, which both the fast path's C
threads and the Python engine call: the C threads into the fast path's
shared struct, the engine into a struct of its own (Histogram). Status
(engine.py) adds the two up.

Thread: the engine observes on the engine thread holding the page lock; the
C threads observe holding it too, so one struct is never written by two
threads at once.
"""
from __future__ import annotations

from uswap._fastpath_cffi import ffi, lib

#: Upper bounds of the finite buckets, seconds (a last +Inf bucket follows).
BOUNDS: tuple[float, ...] = tuple(lib.fp_lat_bound(i) for i in range(lib.FP_LAT_BUCKETS))


class Histogram:
    """One `struct fp_hist`, filled by the Python engine."""

    def __init__(self) -> None:
        self.h = ffi.new("struct fp_hist *")

    def observe(self, seconds: float) -> None:
        lib.fp_hist_observe(self.h, seconds)


def new_shared() -> object:
    """A zeroed `struct fp_hist *` (the shared counters' stand-in when there is no fast path)."""
    return ffi.new("struct fp_hist *")


def copy_of(hist: object) -> object:
    """A `struct fp_hist *` holding a copy of `hist` (a struct or a pointer to one)."""
    out = ffi.new("struct fp_hist *")
    for i in range(lib.FP_LAT_SLOTS):
        out.count[i] = hist.count[i]
    out.sum = hist.sum
    return out


def merged(*hists: object) -> dict:
    """The sum of histograms (struct fp_hist or pointers to one) as status
    shows it: per-bucket counts (not cumulative; the last is +Inf), their
    upper bounds, the observations' count and sum."""
    counts = [sum(int(h.count[i]) for h in hists) for i in range(lib.FP_LAT_SLOTS)]
    return {"bounds_s": list(BOUNDS), "counts": counts, "count": sum(counts),
            "sum_s": round(sum(float(h.sum) for h in hists), 6)}
