"""The scale row of scripts/bench.py (workload `scale`, run only when named
in --workloads): a large region under a budget an eighth of it, four threads
doing mixed work, on kernel swap, uswap-file and uswap-nfs.

    region S = 8 GiB (--quick: 1 GiB), budget S/8 (1 GiB; --quick: 128 MiB)

Each pass, every thread runs its own list of operations over the whole
region: half of them a sequential run of SEQ_PAGES pages at a random start,
half a single random page; a quarter of them write (the page's index word
kept), the rest read and check the index word. The threads start together;
throughput is the bytes they moved over the pass's wall time.

Per pass (repetition) it records the throughput, the CPU per page swapped
(uswap: the daemon's utime+stime per page swapped in or written; kernel: the
process's system time per page of pswpin+pswpout) and, for uswap, the
daemon's memory: metadata bytes per touched page measured as the growth of
its anonymous RSS and of the RSS of its shared writable file mappings
(RssAnon + state: the heap, and the page tables kept in files of its state
directory, mapped MAP_SHARED read-write) since before the region was
allocated, divided by the pages touched (the fill touches every page). The
data pages it holds for clients are shared memory (RssShmem) and are not
counted; neither are the pages of its shared libraries' code and constants
first touched during the run, which RssFile counts too (numpy's alone:
1.6-2.3 MB in the --quick row, 6-9 B per touched page of its 1 GiB region
before this was left out; the same in any region size, not per page). The parent adds the direct count: the bytes per page of the page
table's arrays (uswap/daemon/pagetable.py) and of the slot allocator's
(uswap/daemon/slots.py: a byte of reference count per store slot), per
page of the region.

After the passes the region is freed, and a SPARSE_SIZE (64 GiB) region is
allocated with nothing in it: the time of the alloc and of the first fault
(one page written) are recorded (kernel: an anonymous MAP_NORESERVE mapping).
"""
from __future__ import annotations

import mmap
import os
import time

import numpy as np

import bench_workloads as wl

PAGE = wl.PAGE
SEQ_PAGES = 64        # a sequential run: 256 KiB
WRITE_FRAC = 0.25
THREADS = 4
SPARSE_SIZE = 64 << 30
PARAMS = {  # per mode: the region, and the operations per thread per pass
    "quick": {"scale_size": 1 << 30, "scale_ops": 600},
    "full": {"scale_size": 8 << 30, "scale_ops": 4000},
}
BUDGET_DIVISOR = 8
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)  # Linux's value; Python names it from 3.13


def budget(size: int) -> int:
    return size // BUDGET_DIVISOR


def store_size(size: int) -> int:
    """Room for every page of the region plus an eighth (slots in quarantine
    and writes in flight need some)."""
    return size + size // 8


# ------------------------------------------------------------ child side

def prepare(npages: int, ops: int, seed: int, passes: int) -> list[list[tuple[list, list, list]]]:
    """Per pass, per thread: (first pages, page counts, writes) as lists,
    made before any cgroup move."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(passes):
        threads = []
        for _ in range(THREADS):
            seq = rng.random(ops) < 0.5
            count = np.where(seq, SEQ_PAGES, 1)
            first = rng.integers(0, npages - SEQ_PAGES, ops)
            writes = rng.random(ops) < WRITE_FRAC
            threads.append((first.tolist(), count.tolist(), writes.tolist()))
        out.append(threads)
    return out


def _work(pages: np.ndarray, first: list, count: list, writes: list) -> tuple[int, int]:
    """One thread's operations: (pages moved, pages whose index word was wrong)."""
    words = pages.view(np.uint64)
    src = np.empty((SEQ_PAGES, wl.WORDS), np.uint64)
    src[:] = wl.PATTERN
    dst = np.empty((SEQ_PAGES, wl.WORDS), np.uint64)
    moved = bad = 0
    for p, n, w in zip(first, count, writes):
        idx = np.arange(p, p + n, dtype=np.uint64)
        if w:
            src[:n, 0] = idx
            np.copyto(words[p:p + n], src[:n])  # numpy drops the GIL: the threads' faults overlap
        else:
            np.copyto(dst[:n], words[p:p + n])
            bad += int(np.count_nonzero(dst[:n, 0] != idx))
        moved += n
    return moved, bad


def run_pass(pages: np.ndarray, threads: list[tuple[list, list, list]]) -> tuple[float, int, int]:
    """All threads started together; (wall seconds, pages moved, bad)."""
    seconds, results = wl.run_together("scale", [(lambda t=t: _work(pages, *t)) for t in threads])
    return seconds, sum(m for m, _ in results), sum(b for _, b in results)


def daemon_memory(pid: int) -> dict:
    """RssAnon, RssFile and RssShmem of a process, and RssState: the RSS of
    its shared writable mappings of files (the daemon's page tables in its
    state directory; not memfds, which are RssShmem), bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0]) * 1024
    out["RssState"] = shared_file_rss(pid)
    return out


def shared_file_rss(pid: int) -> int:
    """Bytes resident of the process's MAP_SHARED read-write file mappings
    (smaps: perms rw-s, a path that is neither a memfd nor [special]).
    Library code and constants are private (r-xp, r--p): never counted."""
    total = 0
    counted = False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            fields = line.split()
            if not line[0].isupper():  # a mapping's first line: address range, perms, offset, dev, inode, path
                path = fields[5] if len(fields) > 5 else ""
                counted = fields[1] == "rw-s" and path.startswith("/") and not path.startswith("/memfd:")
            elif counted and fields[0] == "Rss:":
                total += int(fields[1]) * 1024
    return total


def metadata_rss(mem: dict) -> int:
    return mem["RssAnon"] + mem["RssState"]


def sparse_first_fault(alloc, daemon_pid: int | None) -> dict:
    """alloc() -> (array of pages, handle, free): the seconds of the alloc
    and of the first write to one page of the region, and the growth of the
    daemon's metadata RSS for that one touched page; then the region freed."""
    before = daemon_memory(daemon_pid) if daemon_pid else None
    t0 = time.perf_counter()
    pages, handle, free = alloc()
    t1 = time.perf_counter()
    pages[len(pages) // 2, :8] = 1
    t2 = time.perf_counter()
    out = {"sparse_alloc_s": t1 - t0, "sparse_first_fault_s": t2 - t1}
    if before is not None:
        out["sparse_meta_bytes"] = metadata_rss(daemon_memory(daemon_pid)) - metadata_rss(before)
    del pages
    free(handle)
    return out


def anon_sparse(size: int):
    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | MAP_NORESERVE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    return np.frombuffer(m, dtype=np.uint8).reshape(-1, PAGE), m, lambda h: h.close()


def run(spec: dict, mem, counters, prep: list, daemon_pid: int | None, sparse_alloc, facts: dict) -> list[dict]:
    """Fill, a warm-up pass and `repeat` measured passes, then the sparse
    alloc. Returns one record per measured pass; `facts` gets the rest."""
    size = spec["size"]
    npages = size // PAGE
    before = daemon_memory(daemon_pid) if daemon_pid else None
    a, h = mem.alloc()
    reps = []
    try:
        c0 = counters.snap()
        fill_s = wl.fill(a)
        c1 = counters.snap()
        facts.update(fill_s=fill_s, fill_pages=c1[1] - c0[1], fill_cpu_s=c1[2] - c0[2])
        for r, threads in enumerate(prep):
            c0 = counters.snap()
            dt, moved, bad = run_pass(a, threads)
            c1 = counters.snap()
            if r == 0:
                continue  # the warm-up pass
            rec = {"seconds": dt, "bytes": moved * PAGE, "faults": c1[0] - c0[0], "pages": c1[1] - c0[1],
                   "cpu_s": c1[2] - c0[2], "bad": bad, "touched_pages": npages}
            rec.update({k.removesuffix("_total"): c1[3][k] - c0[3][k] for k in c1[3]})  # fast path's share
            if before is not None:
                now = daemon_memory(daemon_pid)
                rec.update(rss_anon=now["RssAnon"], rss_file=now["RssFile"], rss_shmem=now["RssShmem"],
                           rss_state=now["RssState"],
                           meta_b_per_page=(metadata_rss(now) - metadata_rss(before)) / npages)
            reps.append(rec)
        facts.update(counters.facts())
        if before is not None:
            facts["rss_before"] = before
    finally:
        a = None
        mem.free(h)
    facts.update(sparse_first_fault(sparse_alloc, daemon_pid))
    return reps


# ----------------------------------------------------------- parent side

def direct_bytes_per_page(npages: int, nslots: int) -> dict:
    """The daemon's per-page arrays counted from their own definitions: the
    page table's (per page of a region) and the slot allocator's (per store
    slot: its reference counts, slots.py), as bytes
    per page of a region of `npages` on a store of `nslots`."""
    from uswap.daemon.pagetable import PageTable
    from uswap.daemon.slots import SlotAllocator
    table_b = PageTable.BYTES_PER_PAGE
    slot_b = SlotAllocator(1024).nbytes / 1024
    return {"table_b_per_page": table_b, "slots_b_per_page": slot_b * nslots / npages,
            "direct_b_per_page": table_b + slot_b * nslots / npages}


def summarize(system: str, result: dict, size: int) -> dict:
    run = {"workload": "scale", "system": system, "size": size, "budget": budget(size),
           "p50_us": None, "p99_us": None, "mib_s": None, "faults": None, "cpu_us_per_page": None}
    if result.get("error"):
        run["error"] = result["error"].strip()
        return run
    reps, facts = result["reps"], result["end_state"]
    if any(r.get("bad") for r in reps):
        run["error"] = f"data check failed: {sum(r['bad'] for r in reps)} wrong pages read back"
    for r in reps:
        r["mib_s"] = r["bytes"] / r["seconds"] / 2**20
        r["cpu_us_per_page"] = r["cpu_s"] / r["pages"] * 1e6 if r["pages"] else None
    med = lambda k: float(np.median([r[k] for r in reps if r.get(k) is not None])) if any(  # noqa: E731
        r.get(k) is not None for r in reps) else None
    run.update(mib_s=med("mib_s"), faults=int(np.median([r["faults"] for r in reps])),
               cpu_us_per_page=med("cpu_us_per_page"), meta_b_per_page=med("meta_b_per_page"),
               repeats=len(reps), sparse_alloc_ms=facts["sparse_alloc_s"] * 1e3,
               sparse_first_fault_ms=facts["sparse_first_fault_s"] * 1e3,
               fill_mib_s=size / facts["fill_s"] / 2**20, sparse_meta_bytes=facts.get("sparse_meta_bytes"))
    if reps and "rss_anon" in reps[-1]:
        run["daemon_rss"] = {k: reps[-1][k] for k in ("rss_anon", "rss_file", "rss_shmem")}
    if system.startswith("uswap"):
        run.update(direct_bytes_per_page(size // PAGE, store_size(size) // PAGE))
    run["per_repeat"] = [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()} for r in reps]
    run["end_state"] = {k: v for k, v in facts.items() if k not in ("sparse_alloc_s", "sparse_first_fault_s")}
    return run
