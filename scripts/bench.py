#!/usr/bin/env python3
"""uswap side by side with kernel swap, raw store I/O and exact LRU/FIFO,
measured in one run on this machine (every figure is a ratio against a
baseline measured in the same run: these machines are noisy).

    .venv/bin/python scripts/bench.py [--quick] [--size 1G] [--repeat 3]
        [--systems a,b] [--workloads a,b] [--json FILE] [--readme README.md]
        [--plots DIR] [--nfs-url nfs://HOST/EXPORT] [--pin none|same|split]

A region of W bytes (default 1G; --quick: 256M) with a resident budget of W/4.

Workloads (scripts/bench_workloads.py; the same code on every system, each
(system, workload) in its own child process, scripts/bench_child.py):
  first-touch   write every page once, front to back            MiB/s
  seq-read      read every byte front to back, per pass         MiB/s
  random-read   4 KiB copies out of uniformly random pages      per-access p50/p99
  random-write  4 KiB copies into uniformly random pages        per-access p50/p99
  zipf-read     4 KiB reads, Zipf(a=1.2) over scattered pages   faults per pass, p50/p99
  mt-mix        4 threads, 75% reads / 25% writes, random pages MiB/s, per-access p50/p99
Program workloads (scripts/bench_programs.py; only when named in --workloads,
on unlimited, kernel-swap and uswap-file; their own throughput figure):
  exec-stress   stress-ng --vm with W bytes kept                bogo ops/s
  exec-redis    redis-server holding W bytes, random GETs       requests/s
Scale row (scripts/bench_scale.py; only when named in --workloads, on
kernel-swap, uswap-file and uswap-nfs; its own sizes):
  scale         an 8 GiB region (--quick: 1 GiB) under a budget of 1/8 of it,
                4 threads of mixed reads/writes, sequential runs and random
                pages: MiB/s, CPU per page, the daemon's metadata bytes per
                touched page, and the first fault after a 64 GiB sparse alloc
Systems:
  uswap-file    a uswap daemon, O_DIRECT store file on the root filesystem
  uswap-nfs     a uswap daemon, nfs:// store on the local NFS server
  kernel-swap   anonymous mmap in cgroup v1 memory cgroup uswap-bench limited to
                W/4, swap file on the root filesystem (on only around these runs)
  raw-file      O_DIRECT I/O on the uswap-file store file (sequential writes,
                sequential reads in --raw-chunk requests at queue depth 1,
                4 KiB random reads/writes)
  raw-nfs       the same through uswap.store.nfs.NfsStore on the uswap-nfs store
  lru-sim, fifo-sim  exact LRU / FIFO faults for the zipf-read passes at W/4 pages
  unlimited     the program workloads' baseline: ordinary memory, no limit
Every measurement is warmed up (a throwaway pass) and repeated (--repeat);
the figures are medians over the repetitions (cpu_us_per_page: totals).
Every ratio is computed per repetition, repetition i of one system over
repetition i of the other (scripts/bench_ratios.py), and printed as the
median of those ratios with their range and relative spread; the targets
are judged on that median. --readme needs --repeat 5 or more.
faults: uswap = faults_total delta of the daemon less its minor faults
(minor_faults_total: resident pages mapped again); kernel = the child's major
faults. cpu_us_per_page: uswap = daemon utime+stime per page swapped in or
written out (swapins_total + pages_written_total); kernel = the child's system
time per page of pswpin + pswpout (/proc/vmstat, machine-wide).

--pin places the measuring child and the daemon's threads: same (both on
CPU 0) or split (child on CPU 0, daemon on CPU 1); default none. uswap
records count per repetition the faults and swap-ins served on the fast
path's C threads (fast_path_faults, fast_path_swapins) beside all swap-ins.

Progress goes to stderr; the table, ratios and PASS/MISS target lines to stdout.
Root is needed (cgroups, swapon, userfaultfd). Everything it sets up (daemons,
the NFS server if it started it, swap file, cgroup, work directory) is torn
down on exit, also on error or SIGINT/SIGTERM.
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

import bench_programs as programs  # noqa: E402
import bench_report as report  # noqa: E402
import bench_scale  # noqa: E402
import bench_sim  # noqa: E402
import bench_workloads as wl  # noqa: E402
from bench_systems import CGROUP, KernelSwap, NfsServer, cleanup_stale, log, run_child  # noqa: E402
from tests.daemon_proc import DaemonProc  # noqa: E402
from tests.harness import status  # noqa: E402
from uswap.sizes import format_size, parse_size  # noqa: E402

PAGE = wl.PAGE
SYSTEMS = ("kernel-swap", "uswap-file", "raw-file", "uswap-nfs", "raw-nfs", "lru-sim", "fifo-sim", "unlimited")
WORKLOADS = wl.MEMORY_WORKLOADS  # what runs when --workloads is not given
# Run only when named: they take minutes each and measure whole programs,
# not the memory paths the default table and its targets are about.
PROGRAM_WORKLOADS = programs.PROGRAM_WORKLOADS
PROGRAM_SYSTEMS = ("unlimited", "kernel-swap", "uswap-file")
# The scale row (scripts/bench_scale.py): only when named, its own region and budget.
SCALE_WORKLOADS = ("scale",)
SCALE_SYSTEMS = ("kernel-swap", "uswap-file", "uswap-nfs")
EXTRA_WORKLOADS = PROGRAM_WORKLOADS + SCALE_WORKLOADS  # run only when named in --workloads
NFS_FILE = "uswap-bench-{pid}.store"  # in the NFS export, removed at the end
NFS_SCALE_FILE = "uswap-bench-{pid}-scale.store"
FAST_PATH_SPLIT = ("fast_path_faults", "fast_path_swapins", "swapins")  # per repetition, uswap only
# The fault threads' waits for the page lock, per repetition, uswap only
# (bench_child.lock_wait_tail): all, and those over 500 us and 1 ms.
LOCK_WAITS = ("lock_waits", "lock_waits_over_500us", "lock_waits_over_1ms")
PIN_MODES = ("none", "same", "split")
# --pin: (CPUs of the measuring child, CPUs of the daemon's threads), or None for no pinning
PIN_CPUS = {"none": None, "same": ({0}, {0}), "split": ({0}, {1})}
README_MIN_REPEAT = 5  # the README's table: a median and spread over fewer says too little
PARAMS = {  # per mode; W itself comes from --size / --quick
    "quick": {"random_n": 8000, "zipf_n": 60000, "mt_ops": 2500, "program_seconds": 10, "redis_gets": 20000},
    "full": {"random_n": 20000, "zipf_n": 200000, "mt_ops": 5000, "program_seconds": 20, "redis_gets": 50000},
}


def applies(system: str, workload: str) -> bool:
    if workload in PROGRAM_WORKLOADS:
        return system in PROGRAM_SYSTEMS
    if workload in SCALE_WORKLOADS:
        return system in SCALE_SYSTEMS
    if system == "unlimited":
        return False
    if system.startswith("raw-"):
        return workload in wl.RAW_WORKLOADS
    if system.endswith("-sim"):
        return workload == "zipf-read"
    return True


def parse_list(value: str | None, allowed: tuple[str, ...], what: str) -> list[str]:
    if not value:
        return list(allowed)
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad:
        raise SystemExit(f"bench: unknown {what} {', '.join(bad)}; choose from {', '.join(allowed)}")
    return items


def warm_guest_memory(nbytes: int) -> None:
    """Touch nbytes of fresh anonymous memory once and give it back: guest
    memory faults ~10x slower the first time it is used in these VMs."""
    m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE)
    a = np.frombuffer(m, dtype=np.uint8)
    a[::PAGE] = 1
    del a
    m.close()


def summarize(system: str, workload: str, result: dict) -> dict:
    run = {"workload": workload, "system": system, "p50_us": None, "p99_us": None,
           "mib_s": None, "faults": None, "cpu_us_per_page": None}
    if result.get("error"):
        run["error"] = result["error"].strip()
        return run
    reps = result["reps"]
    if any(r.get("bad") for r in reps):
        run["error"] = f"data check failed: {sum(r['bad'] for r in reps)} wrong pages read back"
    med = lambda xs: float(statistics.median(xs)) if xs else None  # noqa: E731
    run["p50_us"] = med([r["p50_us"] for r in reps if "p50_us" in r])
    run["p99_us"] = med([r["p99_us"] for r in reps if "p99_us" in r])
    run["mib_s"] = med([r["bytes"] / r["seconds"] / 2**20 for r in reps if r.get("seconds")])
    if not system.startswith("raw-"):
        run["faults"] = int(statistics.median([r["faults"] for r in reps]))
        pages = sum(r["pages"] for r in reps)
        if pages > 0:
            run["cpu_us_per_page"] = sum(r["cpu_s"] for r in reps) / pages * 1e6
    run["repeats"] = len(reps)
    run["per_repeat"] = [{k: (round(v, 2) if isinstance(v, float) else v) for k, v in (
        ("mib_s", r["bytes"] / r["seconds"] / 2**20 if r.get("seconds") else None),
        ("p50_us", r.get("p50_us")), ("p99_us", r.get("p99_us")), ("faults", r["faults"]),
        ("pages", r["pages"]), ("cpu_s", r["cpu_s"]), *((k, r.get(k)) for k in FAST_PATH_SPLIT + LOCK_WAITS))
        if v is not None} for r in reps]
    waits = sum(r.get("lock_waits", 0) for r in reps)
    if waits:
        # Of every wait of the repetitions together: the tail the engine's long holds make.
        run["lock_wait_over_500us_frac"] = round(sum(r["lock_waits_over_500us"] for r in reps) / waits, 5)
        run["lock_wait_over_1ms_frac"] = round(sum(r["lock_waits_over_1ms"] for r in reps) / waits, 5)
    if result.get("end_state"):
        run["end_state"] = result["end_state"]
    return run


def progress(i: int, n: int, run: dict, seconds: float) -> None:
    if run.get("error"):
        what = "ERROR " + run["error"].strip().splitlines()[-1][:120]
    elif "rate_unit" in run:
        what = f"{run['rate']:.1f} {run['rate_unit']}" + (f", OOM-killed {run['oom_kills']} times"
                                                          if run.get("oom_kills") else "")
    else:
        bits = []
        if run["p50_us"] is not None:
            bits.append(f"p50 {run['p50_us']:.1f} µs p99 {run['p99_us']:.1f} µs")
        if run["mib_s"] is not None:
            bits.append(f"{run['mib_s']:.0f} MiB/s")
        if run["faults"] is not None:
            bits.append(f"{run['faults']} faults")
        if run["cpu_us_per_page"] is not None:
            bits.append(f"{run['cpu_us_per_page']:.2f} µs cpu/page")
        if "lock_wait_over_500us_frac" in run:
            bits.append(f"lock waits >500 µs {run['lock_wait_over_500us_frac']:.2%}, "
                        f">1 ms {run['lock_wait_over_1ms_frac']:.2%}")
        what = ", ".join(bits)
    log(f"[{i:2}/{n}] {run['system']:11} {run['workload']:12} {what} ({seconds:.1f} s)")


@dataclass(frozen=True)
class Plan:
    """What this invocation measures, decided from the command line."""

    args: argparse.Namespace  # the options as given (output paths, --workdir, --nfs-url...)
    size: int                 # the region, W
    budget: int               # the resident budget, W/4
    systems: list[str]        # in run order: kernel swap first, its swap file on only then
    runs: list[tuple[str, str]]  # (system, workload), in run order
    params: dict              # the workloads' parameters (bench_workloads.py)
    timeout: float            # seconds allowed per child run
    config: dict              # --daemon-config settings


@dataclass
class Session:
    """The set-up of one bench invocation and what it has measured so far."""

    workdir: str
    file_backing: str
    nfs_backing: str | None = None
    setup_error: dict[str, str] = field(default_factory=dict)  # system -> why it cannot run
    runs: list[dict] = field(default_factory=list)
    samples: dict = field(default_factory=dict)  # (system, workload) -> per-access µs
    notes: list[str] = field(default_factory=list)

    def record(self, plan: Plan, run: dict, seconds: float) -> None:
        self.runs.append(run)
        progress(len(self.runs), len(plan.runs), run, seconds)


# What the fault and CPU columns count, under every table.
METRIC_NOTES = [
    "faults: uswap = daemon faults_total less minor_faults_total (every fault it served but the "
    "minor ones of resident pages, one per read-ahead window on sequential streams); kernel-swap = major faults of the process; sims = misses.",
    "CPU µs/page: uswap = daemon CPU per page swapped in or written; kernel-swap = system time of "
    "the process per page of pswpin+pswpout.",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="W=256M and fewer samples (a few minutes)")
    ap.add_argument("--size", help="region size W (default 1G; 256M with --quick); the budget is W/4")
    ap.add_argument("--repeat", type=int, default=3, help="measured repetitions per run (default 3)")
    ap.add_argument("--systems", help=f"comma list from: {','.join(SYSTEMS)}")
    ap.add_argument("--workloads", help=f"comma list from: {','.join(WORKLOADS + EXTRA_WORKLOADS)} "
                    f"(default: all but {','.join(EXTRA_WORKLOADS)})")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--readme", help="write the table into this README between the bench markers")
    ap.add_argument("--plots", default="bench-out", help="directory for the PNG plots (default bench-out/)")
    ap.add_argument("--nfs-url", help="use this export (nfs://HOST/EXPORT) instead of starting "
                    "scripts/nfs-server --name uswap-bench")
    ap.add_argument("--raw-chunk", default="512K", help="request size of raw sequential I/O (default 512K, "
                    "the daemon's readahead_max)")
    ap.add_argument("--samples", type=int, help="random accesses per pass (default 20000; 8000 with --quick)")
    ap.add_argument("--workdir", default="/var/tmp", help="where the store and swap files go (root filesystem)")
    ap.add_argument("--timeout", type=float, help="seconds allowed per child run")
    ap.add_argument("--pin", choices=PIN_MODES, default="none",
                    help="CPU placement: none (the scheduler's), same (the measuring process and the "
                         "daemon's threads on CPU 0), split (the measuring process on CPU 0, the daemon on "
                         "CPU 1); kernel-swap and raw runs: the measuring process on CPU 0 unless none")
    ap.add_argument("--daemon-config", action="append", default=[], metavar="KEY=VALUE",
                    help="a uswap daemon setting for the uswap systems (repeatable), e.g. "
                         "fault_threads=2; values are read as YAML scalars")
    return ap.parse_args(argv)


def make_plan(args: argparse.Namespace) -> Plan:
    """Check the options and decide the runs; SystemExit names a bad option."""
    if os.geteuid() != 0:
        raise SystemExit("bench: run as root (cgroups, swapon and /dev/userfaultfd need it)")
    size = parse_size(args.size or ("256M" if args.quick else "1G"), "--size")
    if size % (4 * PAGE) or size < 16 * 4 * PAGE:
        raise SystemExit("bench: --size must be a multiple of 16 KiB and at least 256 KiB")
    if args.repeat < 1:
        raise SystemExit("bench: --repeat must be at least 1")
    allowed = os.sched_getaffinity(0)
    if args.pin != "none" and not {0, 1} <= allowed:
        raise SystemExit(f"bench: --pin {args.pin} places work on CPUs 0 and 1; this process may run on CPUs "
                         f"{', '.join(map(str, sorted(allowed)))} only (use --pin none)")
    if args.readme and args.repeat < README_MIN_REPEAT:
        raise SystemExit(f"bench: --readme needs --repeat {README_MIN_REPEAT} or more (got {args.repeat}): "
                         f"the README's ratios and their spread are judged over at least "
                         f"{README_MIN_REPEAT} repetitions")
    chosen = parse_list(args.systems, SYSTEMS, "system")
    systems = [s for s in SYSTEMS if s in chosen]
    chosen = parse_list(args.workloads, WORKLOADS + EXTRA_WORKLOADS, "workload") if args.workloads else WORKLOADS
    workloads = [w for w in WORKLOADS + EXTRA_WORKLOADS if w in chosen]
    params = dict(PARAMS["quick" if args.quick else "full"], seed=20240601, zipf_a=1.2,
                  mt_threads=4, mt_write_frac=0.25, raw_chunk=parse_size(args.raw_chunk, "--raw-chunk"),
                  **bench_scale.PARAMS["quick" if args.quick else "full"])
    if args.samples:
        params["random_n"] = args.samples
    runs = [(s, w) for s in systems for w in workloads if applies(s, w)]
    if not runs:
        raise SystemExit("bench: nothing to run for these --systems and --workloads")
    return Plan(args=args, size=size, budget=size // 4, systems=systems, runs=runs, params=params,
                timeout=args.timeout or (300.0 if args.quick else 1200.0),
                config=daemon_config(args.daemon_config))


def tear_down_on_signals() -> None:
    """SIGTERM and SIGHUP unwind like an error, so every finally tears down."""
    def on_signal(signum, frame):
        log(f"bench: signal {signum}: tearing down")
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)


def run_plan(plan: Plan) -> Session:
    """Set up (work directory, NFS server), run every system's runs, tear down."""
    cleanup_stale(plan.args.workdir)
    workdir = os.path.join(plan.args.workdir, f"uswap-bench.{os.getpid()}")
    os.makedirs(workdir)
    nfs = NfsServer(url=plan.args.nfs_url)
    nfs_file = NFS_FILE.format(pid=os.getpid())
    session = Session(workdir=workdir, file_backing=os.path.join(workdir, "store"))
    log(f"bench: W {format_size(plan.size)}, budget {format_size(plan.budget)}, {plan.args.repeat} "
        f"repetitions, {len(plan.runs)} runs; work directory {workdir}")
    try:
        warm_guest_memory(plan.size + plan.budget)
        if any(s in ("uswap-nfs", "raw-nfs") for s, _ in plan.runs):
            try:
                session.nfs_backing = f"{nfs.start()}/{nfs_file}"
                log(f"bench: NFS store {session.nfs_backing}")
            except (RuntimeError, OSError) as e:
                session.setup_error["uswap-nfs"] = session.setup_error["raw-nfs"] = f"NFS server: {e}"
        for system in plan.systems:
            todo = [w for s, w in plan.runs if s == system]
            if system.endswith("-sim"):
                run_simulations(plan, session, system, todo)
            elif todo:
                run_system(plan, session, system, todo)
    finally:
        if session.nfs_backing:
            nfs.remove(nfs_file)
            nfs.remove(NFS_SCALE_FILE.format(pid=os.getpid()))
        nfs.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return session


def run_simulations(plan: Plan, session: Session, system: str, todo: list[str]) -> None:
    """Exact LRU or FIFO (system lru-sim / fifo-sim) over the zipf-read passes."""
    npages, cap = plan.size // PAGE, plan.budget // PAGE
    for workload in todo:
        t0 = time.monotonic()
        passes = wl.zipf_passes(npages, plan.params, plan.args.repeat)
        faults = bench_sim.simulate(system[:-4], npages, cap, passes)
        run = {"workload": workload, "system": system, "p50_us": None, "p99_us": None,
               "mib_s": None, "faults": int(statistics.median(faults)), "cpu_us_per_page": None,
               "repeats": len(faults), "per_repeat": [{"faults": f} for f in faults]}
        session.record(plan, run, time.monotonic() - t0)


def run_system(plan: Plan, session: Session, system: str, todo: list[str]) -> None:
    """One measured system's runs, each in its own child process; kernel swap
    is on only around its own runs."""
    swap_size = max([2 * plan.size] + [bench_scale.store_size(plan.params["scale_size"])
                                       for w in todo if w in SCALE_WORKLOADS])
    kswap = (KernelSwap(os.path.join(session.workdir, "swapfile"), swap_size, plan.budget)
             if system == "kernel-swap" else None)
    try:
        if kswap:
            start_kernel_swap(kswap, session)
        for workload in todo:
            if system in session.setup_error:
                session.record(plan, summarize(system, workload, {"error": session.setup_error[system]}), 0.0)
                continue
            t0 = time.monotonic()
            if workload in PROGRAM_WORKLOADS:
                run = programs.summarize(system, workload, run_program(plan, session, system, workload))
            elif workload in SCALE_WORKLOADS:
                run = bench_scale.summarize(system, run_scale(plan, session, system, kswap), plan.params["scale_size"])
            else:
                result = run_workload(plan, session, system, workload)
                if result.get("samples_us"):
                    session.samples[(system, workload)] = result["samples_us"]
                run = summarize(system, workload, result)
            session.record(plan, run, time.monotonic() - t0)
    finally:
        if kswap:
            stop_kernel_swap(kswap, session)


def start_kernel_swap(kswap: KernelSwap, session: Session) -> None:
    """Swap file and cgroup on; a failure marks kernel-swap's runs as errors."""
    try:
        kswap.start()
    except (RuntimeError, OSError, subprocess.CalledProcessError) as e:
        session.setup_error["kernel-swap"] = f"kernel swap setup: {e}"
    if kswap.other_swaps:
        session.notes.append(f"other swap areas were active during kernel-swap: {', '.join(kswap.other_swaps)}")


def stop_kernel_swap(kswap: KernelSwap, session: Session) -> None:
    try:
        kswap.stop()
    except RuntimeError as e:
        log(f"bench: WARNING: kernel swap teardown incomplete: {e}")
        session.notes.append(f"kernel swap teardown incomplete: {e}")


def run_workload(plan: Plan, session: Session, system: str, workload: str) -> dict:
    """One (system, workload) run in a child process: the child's result."""
    spec = {"system": system, "workload": workload, "size": plan.size, "repeat": plan.args.repeat,
            "params": plan.params, "keep_samples": workload == "random-read",
            "store_size": 2 * plan.size, "cpus": child_cpus(plan)}
    if system == "kernel-swap":
        spec.update(kind="kernel", cgroup=CGROUP)
        return run_child(spec, session.workdir, plan.timeout)
    if system.startswith("raw-"):
        spec.update(kind="raw", backing=session.file_backing if system == "raw-file" else session.nfs_backing)
        return run_child(spec, session.workdir, plan.timeout)
    backing = session.file_backing if system == "uswap-file" else session.nfs_backing
    return run_uswap(spec, backing, os.path.join(session.workdir, system), plan.size, plan.budget,
                     plan.timeout, plan.config, daemon_cpus(plan))


def run_scale(plan: Plan, session: Session, system: str, kswap: KernelSwap | None) -> dict:
    """The scale row on `system`: its own region and budget (scripts/bench_scale.py);
    kernel swap's cgroup limit is set to that budget for this run only, and
    uswap gets a store of its own, removed after the run (it is large)."""
    size = plan.params["scale_size"]
    spec = {"system": system, "workload": "scale", "size": size, "repeat": plan.args.repeat,
            "params": plan.params}
    timeout = plan.timeout * (4 if plan.args.quick else 2)
    if system == "kernel-swap":
        kswap.set_limit(bench_scale.budget(size))
        try:
            return run_child(dict(spec, kind="kernel", cgroup=CGROUP), session.workdir, timeout)
        finally:
            kswap.set_limit(plan.budget)
    if system == "uswap-file":
        backing = os.path.join(session.workdir, "scale.store")
    else:
        backing = session.nfs_backing.rsplit("/", 1)[0] + "/" + NFS_SCALE_FILE.format(pid=os.getpid())
    try:
        return with_daemon(backing, os.path.join(session.workdir, f"{system}.scale"), bench_scale.store_size(size),
                           bench_scale.budget(size), plan.config, lambda d: run_child(
                               dict(spec, kind="uswap", socket=d.socket, daemon_pid=d.proc.pid), session.workdir,
                               timeout))
    finally:
        if system == "uswap-file":
            try:
                os.unlink(backing)
            except FileNotFoundError:
                pass


def run_program(plan: Plan, session: Session, system: str, workload: str) -> dict:
    """One program workload on `system` (kernel swap is on around it already)."""
    rundir = os.path.join(session.workdir, f"{system}.{workload}")
    os.makedirs(rundir, exist_ok=True)

    def measure(socket: str | None) -> dict:
        prefix = programs.system_prefix(system, socket, CGROUP)
        return programs.measure(workload, prefix, plan.size, rundir, plan.params, plan.args.repeat, plan.timeout)

    if system != "uswap-file":
        return measure(None)
    # The program's memory is over W (allocator and redis overhead): room in the store for all of it.
    def measure_swapped(d: DaemonProc) -> dict:
        result = measure(d.socket)
        if not result.get("error") and status(d)["swapouts_total"] == 0:
            result = {"error": "the daemon swapped nothing out: the program's memory was not in uswap"}
        return result

    return with_daemon(session.file_backing, os.path.join(session.workdir, system), 2 * plan.size, plan.budget,
                       plan.config, measure_swapped)


def table_title(plan: Plan) -> str:
    return (f"W {format_size(plan.size)}, budget {format_size(plan.budget)}, {platform.release()}, "
            f"{os.cpu_count()} vCPU")


def table_header(plan: Plan) -> str:
    """The line above the table: how it was made."""
    return (f"Generated by `scripts/bench.py{' --quick' if plan.args.quick else ''}` on "
            f"{time.strftime('%Y-%m-%d')} ({table_title(plan)}): medians of {plan.args.repeat} repetitions "
            f"after a warm-up pass, each (system, workload) in its own process; each ratio is the median "
            f"of the ratios of repetition i of one system to repetition i of the other. kernel-swap: cgroup v1 "
            f"limit W/4, swap file on the same ext4 root as the uswap-file store.")


def write_json(path: str, plan: Plan, runs: list[dict], notes: list[str], elapsed: float) -> None:
    args = plan.args
    with open(path, "w") as f:
        json.dump({"config": {"size": plan.size, "budget": plan.budget, "repeat": args.repeat, "quick": args.quick,
                              "params": plan.params, "kernel": platform.release(), "elapsed_s": round(elapsed, 1)},
                   "runs": runs, "ratios": [f.as_dict() for f in report.paired_figures(runs)],
                   "ratio_lines": report.ratios(runs), "targets": report.target_lines(runs),
                   "notes": notes}, f, indent=2)


def write_plots(plan: Plan, session: Session) -> None:
    try:
        for path in report.plots(session.runs, session.samples, plan.args.plots, table_title(plan)):
            log(f"bench: wrote {path}")
    except Exception as e:  # plots are a nicety; the numbers are already out
        log(f"bench: plots failed: {e}")


def print_table(md: str, elapsed: float) -> None:
    try:
        print()
        print(md)
        print(f"runtime {elapsed:.0f} s", flush=True)
    except BrokenPipeError:
        pass


def main() -> int:
    plan = make_plan(parse_args())
    tear_down_on_signals()
    t_start = time.monotonic()
    session = run_plan(plan)
    elapsed = time.monotonic() - t_start
    notes = session.notes + METRIC_NOTES
    md = report.markdown(session.runs, table_header(plan), notes)
    # Files first, the terminal last: a closed stdout must not cost the results.
    if plan.args.json:
        write_json(plan.args.json, plan, session.runs, notes, elapsed)
    if plan.args.readme:
        report.update_readme(plan.args.readme, md)
    write_plots(plan, session)
    print_table(md, elapsed)
    return 1 if any(r.get("error") for r in session.runs) else 0


def daemon_config(pairs: list[str]) -> dict:
    """--daemon-config KEY=VALUE pairs as a settings dict (checked by the daemon)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--daemon-config: {pair!r} is not KEY=VALUE")
        out[key] = yaml.safe_load(value)
    return out


def run_uswap(spec: dict, backing: str, sysdir: str, size: int, budget: int, timeout: float,
              config: dict | None = None, cpus: set[int] | None = None) -> dict:
    """A fresh daemon for one run (same store file every time), the child, then a drain."""
    def measure(d: DaemonProc) -> dict:
        if cpus is not None:
            pin_process(d.proc.pid, cpus)
        return run_child(dict(spec, kind="uswap", socket=d.socket, daemon_pid=d.proc.pid),
                         os.path.dirname(sysdir), timeout)
    return with_daemon(backing, sysdir, 2 * size, budget, config, measure)


def child_cpus(plan: Plan) -> list[int] | None:
    pin = PIN_CPUS[plan.args.pin]
    return sorted(pin[0]) if pin else None


def daemon_cpus(plan: Plan) -> set[int] | None:
    pin = PIN_CPUS[plan.args.pin]
    return pin[1] if pin else None


def pin_process(pid: int, cpus: set[int]) -> None:
    """Every thread of process `pid` onto `cpus`; threads it starts later
    inherit the mask of the thread that starts them."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except ProcessLookupError:  # a thread that ended meanwhile
            pass


def with_daemon(backing: str, sysdir: str, store_size: int, budget: int, config: dict | None, measure) -> dict:
    """measure(daemon) with a fresh daemon, stopped after; a daemon that does
    not exit cleanly makes the result an error."""
    os.makedirs(sysdir, exist_ok=True)
    try:
        d = DaemonProc(sysdir, backing, store_size=str(store_size), max_resident=str(budget), config=config)
    except RuntimeError as e:
        return {"error": f"daemon did not start: {e}"}
    result: dict = {}
    try:
        result = measure(d)
    finally:
        try:
            rc = d.stop()
        except BaseException:
            d.kill()
            raise
        if rc != 0 and not result.get("error"):
            result["error"] = f"daemon exited with {rc}:\n{d.log_text()[-2000:]}"
    return result


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("bench: interrupted (everything it set up was torn down)")
        sys.exit(130)
