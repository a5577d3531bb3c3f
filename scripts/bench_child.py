"""One (system, workload) measurement of scripts/bench.py, run as its own process.

    python scripts/bench_child.py SPEC.json

SPEC (written by bench.py) names the system kind and how to reach it:
  uswap:  memory from uswap.connect(socket).alloc(size); counters from the
          daemon (faults_total less minor_faults_total, swapins_total +
          pages_written_total) and its
          CPU time (utime+stime of /proc/<daemon pid>/stat);
  kernel: memory from an anonymous private mmap, after this process moved
          itself into the memory cgroup `cgroup` (everything sized by the
          region — traces, latency arrays, their Python lists — is allocated
          before the move, so the cgroup holds the region and little else);
          counters: this process's major faults and system time
          (getrusage) and pswpin+pswpout of /proc/vmstat;
  raw:    no memory: the same store file/export through uswap.store.

It warms up (one throwaway pass, or a throwaway repetition for first-touch),
then measures `repeat` times, and writes the per-repetition figures to
spec["result"] as JSON. Exit status 0 on success; on error the JSON holds
{"error": traceback}.
"""
from __future__ import annotations

import json
import mmap
import os
import resource
import sys
import traceback

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_scale  # noqa: E402
import bench_workloads as wl  # noqa: E402

PAGE = wl.PAGE
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------ counters

def proc_cpu_s(pid: int, tid: int | None = None) -> float:
    """utime + stime of a process (all its threads), or of its thread `tid`, seconds."""
    with open(f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def vmstat_swap_pages() -> int:
    n = 0
    with open("/proc/vmstat") as f:
        for line in f:
            k, v = line.split()
            if k in ("pswpin", "pswpout"):
                n += int(v)
    return n


# Where the daemon's faults and swap-ins were served: on the fast path's C
# threads or by the engine (per repetition, as deltas in its record).
SPLIT_COUNTERS = ("fast_path_faults_total", "fast_path_swapins_total", "swapins_total")


def lock_wait_tail(st: dict) -> dict:
    """The fault threads' waits for the page lock (status latency.lock_wait):
    how many, and how many longer than 500 us and 1 ms (bucket bounds of
    native/fastpath.h; 0 from a daemon without the histogram)."""
    h = st.get("latency", {}).get("lock_wait")
    if not h:
        return {"lock_waits_total": 0, "lock_waits_over_500us_total": 0, "lock_waits_over_1ms_total": 0}
    bounds, counts = h["bounds_s"], h["counts"]  # counts[i]: waits up to bounds[i]; the last, +Inf
    over = lambda s: sum(c for i, c in enumerate(counts) if i > 0 and bounds[i - 1] >= s)  # noqa: E731
    return {"lock_waits_total": h["count"], "lock_waits_over_500us_total": over(0.0005),
            "lock_waits_over_1ms_total": over(0.001)}


class UswapCounters:
    def __init__(self, client, daemon_pid: int) -> None:
        self.client = client
        self.pid = daemon_pid

    def snap(self) -> tuple[int, int, float, dict]:
        st = self.client.status()
        # Minor faults (a resident page mapped again after the access
        # sampler took it out of the page tables) are no misses: not counted.
        return (st["faults_total"] - st.get("minor_faults_total", 0),
                st["swapins_total"] + st.get("pages_written_total", st["swapouts_total"]),
                proc_cpu_s(self.pid), self._split(st))

    @staticmethod
    def _split(st: dict) -> dict:
        split = {k: st.get(k, 0) for k in SPLIT_COUNTERS}
        # fast_path_faults_total counts the fault threads' minor faults too;
        # like the faults column, the split leaves them out.
        split["fast_path_faults_total"] -= st.get("fast_path_minor_faults_total", 0)
        split.update(lock_wait_tail(st))
        return split

    def facts(self) -> dict:
        st = self.client.status()
        return {k: st.get(k) for k in ("resident_bytes", "max_resident_bytes", "swapped_bytes",
                                       "readahead_pages_total", "write_errors_total", "read_errors_total",
                                       "minor_faults_total", "sampled_pages_total", "budget_waits_total",
                                       "dirty_waits_total", "pages_cleaned_total", "fast_path_passed_faults")}


class KernelCounters:
    def __init__(self, cgroup: str) -> None:
        self.cgroup = cgroup

    def snap(self) -> tuple[int, int, float, dict]:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return ru.ru_majflt, vmstat_swap_pages(), ru.ru_stime, {}

    def facts(self) -> dict:
        return cgroup_facts(self.cgroup)


class NoCounters:
    def snap(self) -> tuple[int, int, float, dict]:
        return 0, 0, 0.0, {}

    def facts(self) -> dict:
        return {}


# ------------------------------------------------------------------ memory

class UswapMemory:
    """Each region on its own connection: closing a region while the daemon
    still writes it back can make the daemon drop that connection (seen with
    first-touch's region per repetition), which must not end the run."""

    def __init__(self, socket: str, size: int) -> None:
        import uswap
        self.connect = lambda: uswap.connect(socket)
        self.client = self.connect()  # status only; holds no region
        self.size = size

    def alloc(self):
        client = self.connect()
        try:
            region = client.alloc(self.size)
        except BaseException:
            client.close()
            raise
        return np.frombuffer(region.buf, dtype=np.uint8).reshape(-1, PAGE), (client, region)

    def free(self, handle) -> None:
        client, region = handle
        try:
            region.close()
        except BufferError:  # an array still points at it (only on an error path): exiting anyway
            pass
        client.regions.clear()
        client.close()

    def close(self) -> None:
        self.client.close()


class AnonMemory:
    def __init__(self, size: int) -> None:
        self.size = size

    def alloc(self):
        m = mmap.mmap(-1, self.size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        if hasattr(mmap, "MADV_NOHUGEPAGE"):
            m.madvise(mmap.MADV_NOHUGEPAGE)
        return np.frombuffer(m, dtype=np.uint8).reshape(-1, PAGE), m

    def free(self, handle) -> None:
        try:
            handle.close()
        except BufferError:  # an array still points at it (only on an error path): exiting anyway
            pass

    def close(self) -> None:
        pass


def own_memory_cgroup() -> str:
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            if "memory" in controllers.split(","):
                return "/sys/fs/cgroup/memory" + path
    raise RuntimeError("no cgroup v1 memory controller in /proc/self/cgroup")


def move_to_cgroup(path: str) -> None:
    with open(os.path.join(path, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))


def cgroup_facts(path: str) -> dict:
    """What the memory cgroup holds with the region still mapped after the
    last pass (a sanity check that it swapped), and its peak usage."""
    facts = {}
    for name in ("memory.limit_in_bytes", "memory.max_usage_in_bytes"):
        with open(os.path.join(path, name)) as f:
            facts[name.split(".", 1)[1]] = int(f.read())
    with open(os.path.join(path, "memory.stat")) as f:
        for line in f:
            k, v = line.split()
            if k in ("swap", "rss", "cache", "swapcached"):
                facts[k] = int(v)
    return facts


# ------------------------------------------------------------------ running

def rep_record(seconds: float | None, nbytes: int | None, c0, c1, lat_ns=None, bad: int = 0) -> dict:
    rec = {"seconds": seconds, "bytes": nbytes,
           "faults": c1[0] - c0[0], "pages": c1[1] - c0[1], "cpu_s": c1[2] - c0[2], "bad": bad}
    rec.update({k.removesuffix("_total"): c1[3][k] - c0[3][k] for k in c1[3]})
    if lat_ns is not None:
        p50, p99 = np.percentile(lat_ns, [50, 99]) / 1000.0
        rec.update(p50_us=float(p50), p99_us=float(p99))
    return rec


def prepare(spec: dict) -> dict:
    """Everything sized by the workload, made before any cgroup move."""
    w, p = spec["workload"], spec["params"]
    npages = spec["size"] // PAGE
    reps = spec["repeat"]
    seed = p["seed"]
    out: dict = {"npages": npages}
    if w in ("random-read", "random-write"):
        n = p["random_n"]
        out["traces"] = [wl.make_trace("uniform", npages, n, seed + r).tolist() for r in range(reps + 1)]
        out["lat"] = [np.zeros(n, np.int64) for _ in range(reps + 1)]
    elif w == "zipf-read":
        n = p["zipf_n"]
        out["traces"] = [t.tolist() for t in wl.zipf_passes(npages, p, reps)]
        out["lat"] = [np.zeros(len(t), np.int64) for t in out["traces"]]
    elif w == "scale":
        out["scale"] = bench_scale.prepare(npages, p["scale_ops"], seed, reps + 1)
    elif w == "mt-mix":
        n, k = p["mt_ops"], p["mt_threads"]
        rng = np.random.default_rng(seed)
        out["mt"] = []
        for _ in range(reps + 1):
            traces = [rng.integers(0, npages, n).tolist() for _ in range(k)]
            writes = [(rng.random(n) < p["mt_write_frac"]).tolist() for _ in range(k)]
            lats = [np.zeros(n, np.int64) for _ in range(k)]
            out["mt"].append((traces, writes, lats))
    return out


def run_memory(spec: dict, mem, counters, prep: dict, end: dict) -> list[dict]:
    """Warm-up and measured passes; `end` gets counters.facts() taken after
    the last pass, before the memory is given back."""
    w, reps, size = spec["workload"], spec["repeat"], spec["size"]
    out = []
    if w == "first-touch":
        for r in range(reps + 1):  # r == 0: warm-up
            a, h = mem.alloc()
            c0 = counters.snap()
            dt = wl.fill(a)
            c1 = counters.snap()
            if r == reps:
                end.update(counters.facts())
            del a
            mem.free(h)
            if r:
                out.append(rep_record(dt, size, c0, c1))
        return out

    a, h = mem.alloc()
    try:
        wl.fill(a)  # setup: every page written once (about 3/4 of them end up swapped out)
        for r in range(reps + 1):  # r == 0: warm-up pass
            c0 = counters.snap()
            if w == "seq-read":
                dt, bad = wl.seq_read(a)
                c1 = counters.snap()
                rec = rep_record(dt, size, c0, c1, bad=bad)
            elif w in ("random-read", "zipf-read"):
                trace, lat = prep["traces"][r], prep["lat"][r]
                bad = wl.access_read(a, trace, lat)
                c1 = counters.snap()
                rec = rep_record(None, None, c0, c1, lat, bad)
            elif w == "random-write":
                trace, lat = prep["traces"][r], prep["lat"][r]
                bad = wl.access_write(a, trace, lat)
                c1 = counters.snap()
                rec = rep_record(None, None, c0, c1, lat, bad)
            elif w == "mt-mix":
                traces, writes, lats = prep["mt"][r]
                dt, bad = wl.mt_mix(a, traces, writes, lats)
                c1 = counters.snap()
                lat = np.concatenate(lats)
                rec = rep_record(dt, lat.size * PAGE, c0, c1, lat, bad)
            else:
                raise ValueError(f"unknown workload {w!r}")
            if r:
                rec["_lat"] = lat if w in ("random-read", "random-write", "zipf-read", "mt-mix") else None
                out.append(rec)
        end.update(counters.facts())
    finally:
        a = None
        mem.free(h)
    return out


def run_raw(spec: dict, prep: dict) -> list[dict]:
    from uswap import native
    from uswap.store import open_store
    w, reps, size = spec["workload"], spec["repeat"], spec["size"]
    chunk = spec["params"]["raw_chunk"]
    store = open_store(spec["backing"], spec["store_size"])
    buf = native.AlignedBuffer(max(chunk, PAGE))
    nc = NoCounters()
    out = []
    try:
        view = np.frombuffer(buf.view(), dtype=np.uint64)
        view[:] = wl.PATTERN
        base = PAGE  # slot 0 holds the uswap store header: leave it alone
        if w != "first-touch" and w != "random-write":
            wl.raw_seq_write(store, buf, base, size, chunk)  # setup: real data, not unwritten extents
        for r in range(reps + 1):
            c0 = nc.snap()
            if w == "first-touch":
                rec = rep_record(wl.raw_seq_write(store, buf, base, size, chunk), size, c0, c0)
            elif w == "seq-read":
                rec = rep_record(wl.raw_seq_read(store, buf, base, size, chunk), size, c0, c0)
            elif w in ("random-read", "random-write"):
                trace, lat = prep["traces"][r], prep["lat"][r]
                wl.raw_random(store, buf, base, trace, lat, write=(w == "random-write"))
                rec = rep_record(None, None, c0, c0, lat)
                rec["_lat"] = lat
            else:
                raise ValueError(f"workload {w!r} does not apply to a raw store")
            if r:
                out.append(rec)
    finally:
        del view
        buf.free()
        store.close()
    return out


def main() -> int:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    result: dict = {}
    end: dict = {}
    try:
        if spec.get("cpus") is not None:
            os.sched_setaffinity(0, spec["cpus"])  # bench.py --pin: before any thread starts
        prep = prepare(spec)
        kind = spec["kind"]
        if kind == "raw":
            reps = run_raw(spec, prep)
        elif kind == "uswap":
            mem = UswapMemory(spec["socket"], spec["size"])
            try:
                counters = UswapCounters(mem.client, spec["daemon_pid"])
                if spec["workload"] == "scale":
                    sparse = UswapMemory(spec["socket"], bench_scale.SPARSE_SIZE)
                    try:
                        reps = bench_scale.run(spec, mem, counters, prep["scale"], spec["daemon_pid"],
                                               lambda: (*sparse.alloc(), sparse.free), end)
                    finally:
                        sparse.close()
                else:
                    reps = run_memory(spec, mem, counters, prep, end)
            finally:
                mem.close()
        elif kind == "kernel":
            home = own_memory_cgroup()
            with open(os.path.join(spec["cgroup"], "memory.max_usage_in_bytes"), "w") as f:
                f.write("0")  # the peak of this run only
            move_to_cgroup(spec["cgroup"])
            try:
                counters = KernelCounters(spec["cgroup"])
                if spec["workload"] == "scale":
                    reps = bench_scale.run(spec, AnonMemory(spec["size"]), counters, prep["scale"], None,
                                           lambda: bench_scale.anon_sparse(bench_scale.SPARSE_SIZE), end)
                else:
                    reps = run_memory(spec, AnonMemory(spec["size"]), counters, prep, end)
            finally:
                move_to_cgroup(home)
        else:
            raise ValueError(f"unknown kind {kind!r}")
        samples = None
        for rec in reps:
            lat = rec.pop("_lat", None)
            if lat is not None and spec.get("keep_samples"):
                samples = (samples or []) + np.round(lat / 1000.0, 2).tolist()
        result = {"reps": reps, "samples_us": samples, "end_state": end}
        rc = 0
    except BaseException:
        result = {"error": traceback.format_exc()}
        rc = 1
    with open(spec["result"], "w") as f:
        json.dump(result, f)
    return rc


if __name__ == "__main__":
    sys.exit(main())
