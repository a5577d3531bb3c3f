"""Workloads of scripts/bench.py: the SAME code runs on every system.

Memory workloads take a numpy uint8 array view over the memory under test
(a uswap region, or an anonymous mmap inside a memory cgroup for kernel swap)
shaped (pages, 4096), plus their parameters, and return what they measured.
They never allocate memory proportional to the region: the caller
preallocates latency arrays, so the footprint inside a memory cgroup stays the
region plus a few pages.

Every page holds its own index in its first 8-byte word and a constant
pattern elsewhere (never zeros, so no system can drop it as a zero page);
reads check that word and count mismatches (`bad`), which must stay 0.

Raw store workloads (raw-file, raw-nfs) do the equivalent I/O straight on a
uswap.store Store: large sequential writes/reads and 4 KiB random reads/writes.

Traces (which pages are touched, in what order) are made by make_trace from a
seed, so the child processes and the LRU/FIFO simulators see the same ones.
"""
from __future__ import annotations

import threading
import time

import numpy as np

PAGE = 4096
WORDS = PAGE // 8
PATTERN = np.uint64(0x5A5A_A5A5_0F0F_F0F0)
CHUNK_PAGES = 256  # 1 MiB per numpy call in the streaming workloads

MEMORY_WORKLOADS = ("first-touch", "seq-read", "random-read", "random-write", "zipf-read", "mt-mix")
RAW_WORKLOADS = ("first-touch", "seq-read", "random-read", "random-write")


# --------------------------------------------------------------------- traces

def make_trace(kind: str, npages: int, n: int, seed: int, zipf_a: float = 1.2,
               perm_seed: int = 0x5EED) -> np.ndarray:
    """n page indices in [0, npages).

    uniform: independent uniform pages.
    zipf:    page ranks drawn from a finite Zipf law (P(rank k) ~ 1/k^a over
             npages ranks, inverse CDF), mapped to pages through a fixed random
             permutation so hot pages are scattered over the region, not
             adjacent (read-ahead of neighbours must not help). The
             permutation depends on perm_seed only: traces with other seeds
             draw from the same distribution (the same pages are hot).
    """
    rng = np.random.default_rng(seed)
    if kind == "uniform":
        return rng.integers(0, npages, n, dtype=np.int64)
    if kind == "zipf":
        weights = 1.0 / np.arange(1, npages + 1, dtype=np.float64) ** zipf_a
        cdf = np.cumsum(weights)
        cdf /= cdf[-1]
        ranks = np.searchsorted(cdf, rng.random(n), side="right")
        np.minimum(ranks, npages - 1, out=ranks)
        perm = np.random.default_rng(perm_seed).permutation(npages)
        return perm[ranks].astype(np.int64)
    raise ValueError(f"unknown trace kind {kind!r}")


def zipf_passes(npages: int, params: dict, repeat: int) -> list[np.ndarray]:
    """The zipf-read passes: [warm-up, measured 1..repeat]; the same hot pages
    in each, fresh draws (a repeated identical trace would fit the budget).
    The warm-up pass is 3x longer: after the fill, the resident set is the
    last pages written, and it takes that long to settle (checked with LRU)."""
    n = params["zipf_n"]
    return [make_trace("zipf", npages, n * (3 if r == 0 else 1), params["seed"] + 1000 + r, params["zipf_a"])
            for r in range(repeat + 1)]


# ------------------------------------------------------------ memory workloads
# Traces may be given as Python lists made in advance (bench_child does, so
# that no list proportional to the trace is built inside the memory cgroup).

def _seq(trace):
    return trace.tolist() if isinstance(trace, np.ndarray) else trace


def fill(pages: np.ndarray, first: int = 0) -> float:
    """Write every page once, front to back (the first-touch workload).

    pages: uint8 (npages, 4096). Returns seconds."""
    words = pages.view(np.uint64)
    n = words.shape[0]
    t0 = time.perf_counter()
    for c0 in range(0, n, CHUNK_PAGES):
        c1 = min(n, c0 + CHUNK_PAGES)
        blk = words[c0:c1]
        blk[:] = PATTERN
        blk[:, 0] = np.arange(first + c0, first + c1, dtype=np.uint64)
    return time.perf_counter() - t0


def seq_read(pages: np.ndarray) -> tuple[float, int]:
    """Read every byte of every page front to back. Returns (seconds, bad)."""
    words = pages.view(np.uint64)
    n = words.shape[0]
    col0 = 0
    t0 = time.perf_counter()
    for c0 in range(0, n, CHUNK_PAGES):
        blk = words[c0:c0 + CHUNK_PAGES]
        blk.sum()                       # every word of the chunk
        col0 += int(blk[:, 0].sum())    # the index words, checked below
    dt = time.perf_counter() - t0
    return dt, int(col0 != n * (n - 1) // 2)


def access_read(pages: np.ndarray, trace: np.ndarray, lat_ns: np.ndarray) -> int:
    """Copy page trace[i] (4 KiB) out of the memory, timing each access into
    lat_ns[i]. Returns the number of pages whose index word was wrong."""
    buf = np.empty(PAGE, np.uint8)
    buf64 = buf.view(np.uint64)
    pc = time.perf_counter_ns
    cp = np.copyto
    bad = 0
    for i, p in enumerate(_seq(trace)):
        row = pages[p]
        t0 = pc()
        cp(buf, row)
        lat_ns[i] = pc() - t0
        if buf64[0] != p:
            bad += 1
    return bad


def access_write(pages: np.ndarray, trace: np.ndarray, lat_ns: np.ndarray) -> int:
    """Overwrite page trace[i] (4 KiB, keeping its index word), timing each access."""
    src = np.empty(PAGE, np.uint8)
    src64 = src.view(np.uint64)
    src64[:] = PATTERN
    pc = time.perf_counter_ns
    cp = np.copyto
    for i, p in enumerate(_seq(trace)):
        row = pages[p]
        src64[0] = p
        t0 = pc()
        cp(row, src)
        lat_ns[i] = pc() - t0
    return 0


def access_mixed(pages: np.ndarray, trace: np.ndarray, is_write: np.ndarray, lat_ns: np.ndarray) -> int:
    """Reads and writes of whole pages: trace[i] is written if is_write[i]."""
    buf = np.empty(PAGE, np.uint8)
    buf64 = buf.view(np.uint64)
    src = np.empty(PAGE, np.uint8)
    src64 = src.view(np.uint64)
    src64[:] = PATTERN
    pc = time.perf_counter_ns
    cp = np.copyto
    bad = 0
    for i, (p, w) in enumerate(zip(_seq(trace), _seq(is_write))):
        row = pages[p]
        if w:
            src64[0] = p
            t0 = pc()
            cp(row, src)
            lat_ns[i] = pc() - t0
        else:
            t0 = pc()
            cp(buf, row)
            lat_ns[i] = pc() - t0
            if buf64[0] != p:
                bad += 1
    return bad


def mt_mix(pages: np.ndarray, traces: list[np.ndarray], writes: list[np.ndarray],
           lats: list[np.ndarray]) -> tuple[float, int]:
    """One thread per trace, all started together, each doing access_mixed
    (numpy drops the GIL for a 4 KiB copy, so faults overlap).
    Returns (wall seconds, bad)."""
    seconds, bads = run_together("mt-mix", [
        (lambda k=k: access_mixed(pages, traces[k], writes[k], lats[k])) for k in range(len(traces))])
    return seconds, sum(bads)


def run_together(name: str, jobs: list) -> tuple[float, list]:
    """Each job (a function of no argument) in its own thread, all started
    together at a barrier. Returns (wall seconds from the barrier to the last
    join, the jobs' results in order)."""
    results = [None] * len(jobs)
    start = threading.Barrier(len(jobs) + 1)

    def run(k: int) -> None:
        start.wait()
        results[k] = jobs[k]()

    threads = [threading.Thread(target=run, args=(k,), name=f"{name}-{k}") for k in range(len(jobs))]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, results


# --------------------------------------------------------------- raw workloads

def raw_seq_write(store, buf, base: int, nbytes: int, chunk: int) -> float:
    """Write [base, base+nbytes) in `chunk`-sized requests, one at a time. Seconds."""
    t0 = time.perf_counter()
    for off in range(0, nbytes, chunk):
        store.write(buf.addr, min(chunk, nbytes - off), base + off)
    return time.perf_counter() - t0


def raw_seq_read(store, buf, base: int, nbytes: int, chunk: int) -> float:
    t0 = time.perf_counter()
    for off in range(0, nbytes, chunk):
        store.read(buf.addr, min(chunk, nbytes - off), base + off)
    return time.perf_counter() - t0


def raw_random(store, buf, base: int, trace: np.ndarray, lat_ns: np.ndarray, write: bool) -> None:
    """4 KiB preads (or pwrites) at page trace[i] of the store, timed each."""
    op = store.write if write else store.read
    addr = buf.addr
    pc = time.perf_counter_ns
    for i, p in enumerate(_seq(trace)):
        off = base + p * PAGE
        t0 = pc()
        op(addr, PAGE, off)
        lat_ns[i] = pc() - t0
