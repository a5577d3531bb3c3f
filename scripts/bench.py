#!/usr/bin/env python3
"""uswap side by side with kernel swap, raw store I/O and exact LRU/FIFO,
measured in one run on this machine (every figure is a ratio against a
baseline measured in the same run: these machines are noisy).

    .venv/bin/python scripts/bench.py [--quick] [--size 1G] [--repeat 3]
        [--systems a,b] [--workloads a,b] [--json FILE] [--readme README.md]
        [--plots DIR] [--nfs-url nfs://HOST/EXPORT]

A region of W bytes (default 1G; --quick: 256M) with a resident budget of W/4.

Workloads (scripts/bench_workloads.py; the same code on every system, each
(system, workload) in its own child process, scripts/bench_child.py):
  first-touch   write every page once, front to back            MiB/s
  seq-read      read every byte front to back, per pass         MiB/s
  random-read   4 KiB copies out of uniformly random pages      per-access p50/p99
  random-write  4 KiB copies into uniformly random pages        per-access p50/p99
  zipf-read     4 KiB reads, Zipf(a=1.2) over scattered pages   faults per pass, p50/p99
  mt-mix        4 threads, 75% reads / 25% writes, random pages MiB/s, per-access p50/p99
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
Every measurement is warmed up (a throwaway pass) and repeated (--repeat);
the figures are medians over the repetitions (cpu_us_per_page: totals).
faults: uswap = faults_total delta of the daemon; kernel = the child's major
faults. cpu_us_per_page: uswap = daemon utime+stime per page swapped in or
written out (swapins_total + pages_written_total); kernel = the child's system
time per page of pswpin + pswpout (/proc/vmstat, machine-wide).

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

import numpy as np
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

import bench_report as report  # noqa: E402
import bench_sim  # noqa: E402
import bench_workloads as wl  # noqa: E402
from bench_systems import CGROUP, KernelSwap, NfsServer, cleanup_stale, log, run_child  # noqa: E402
from tests.daemon_proc import DaemonProc  # noqa: E402
from uswap.sizes import format_size, parse_size  # noqa: E402

PAGE = wl.PAGE
SYSTEMS = ("kernel-swap", "uswap-file", "raw-file", "uswap-nfs", "raw-nfs", "lru-sim", "fifo-sim")
WORKLOADS = wl.MEMORY_WORKLOADS
PARAMS = {  # per mode; W itself comes from --size / --quick
    "quick": {"random_n": 8000, "zipf_n": 60000, "mt_ops": 2500},
    "full": {"random_n": 20000, "zipf_n": 200000, "mt_ops": 5000},
}


def applies(system: str, workload: str) -> bool:
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
        ("pages", r["pages"]), ("cpu_s", r["cpu_s"])) if v is not None} for r in reps]
    if result.get("end_state"):
        run["end_state"] = result["end_state"]
    return run


def progress(i: int, n: int, run: dict, seconds: float) -> None:
    if run.get("error"):
        what = "ERROR " + run["error"].strip().splitlines()[-1][:120]
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
        what = ", ".join(bits)
    log(f"[{i:2}/{n}] {run['system']:11} {run['workload']:12} {what} ({seconds:.1f} s)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="W=256M and fewer samples (a few minutes)")
    ap.add_argument("--size", help="region size W (default 1G; 256M with --quick); the budget is W/4")
    ap.add_argument("--repeat", type=int, default=3, help="measured repetitions per run (default 3)")
    ap.add_argument("--systems", help=f"comma list from: {','.join(SYSTEMS)}")
    ap.add_argument("--workloads", help=f"comma list from: {','.join(WORKLOADS)}")
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
    ap.add_argument("--daemon-config", action="append", default=[], metavar="KEY=VALUE",
                    help="a uswap daemon setting for the uswap systems (repeatable), e.g. "
                         "fault_threads=2; values are read as YAML scalars")
    args = ap.parse_args()

    if os.geteuid() != 0:
        raise SystemExit("bench: run as root (cgroups, swapon and /dev/userfaultfd need it)")
    size = parse_size(args.size or ("256M" if args.quick else "1G"), "--size")
    if size % (4 * PAGE) or size < 16 * 4 * PAGE:
        raise SystemExit("bench: --size must be a multiple of 16 KiB and at least 256 KiB")
    if args.repeat < 1:
        raise SystemExit("bench: --repeat must be at least 1")
    budget = size // 4
    systems = parse_list(args.systems, SYSTEMS, "system")
    systems = [s for s in SYSTEMS if s in systems]  # run order: kernel swap first, swap file on only then
    workloads = parse_list(args.workloads, WORKLOADS, "workload")
    workloads = [w for w in WORKLOADS if w in workloads]
    params = dict(PARAMS["quick" if args.quick else "full"], seed=20240601, zipf_a=1.2,
                  mt_threads=4, mt_write_frac=0.25, raw_chunk=parse_size(args.raw_chunk, "--raw-chunk"))
    if args.samples:
        params["random_n"] = args.samples
    timeout = args.timeout or (300.0 if args.quick else 1200.0)
    config = daemon_config(args.daemon_config)
    plan = [(s, w) for s in systems for w in workloads if applies(s, w)]
    if not plan:
        raise SystemExit("bench: nothing to run for these --systems and --workloads")

    def on_signal(signum, frame):
        log(f"bench: signal {signum}: tearing down")
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    t_start = time.monotonic()
    cleanup_stale(args.workdir)
    workdir = os.path.join(args.workdir, f"uswap-bench.{os.getpid()}")
    os.makedirs(workdir)
    nfs = NfsServer(url=args.nfs_url)
    nfs_file = f"uswap-bench-{os.getpid()}.store"
    file_backing = os.path.join(workdir, "store")
    nfs_backing = None
    runs: list[dict] = []
    samples: dict = {}
    notes: list[str] = []
    log(f"bench: W {format_size(size)}, budget {format_size(budget)}, {args.repeat} repetitions, "
        f"{len(plan)} runs; work directory {workdir}")
    try:
        warm_guest_memory(size + budget)
        setup_error: dict[str, str] = {}
        if any(s in ("uswap-nfs", "raw-nfs") for s, _ in plan):
            try:
                nfs_backing = f"{nfs.start()}/{nfs_file}"
                log(f"bench: NFS store {nfs_backing}")
            except (RuntimeError, OSError) as e:
                setup_error["uswap-nfs"] = setup_error["raw-nfs"] = f"NFS server: {e}"
        i = 0
        for system in systems:
            todo = [w for s, w in plan if s == system]
            if not todo:
                continue
            if system.endswith("-sim"):
                for workload in todo:
                    i += 1
                    t0 = time.monotonic()
                    npages, cap = size // PAGE, budget // PAGE
                    passes = wl.zipf_passes(npages, params, args.repeat)
                    faults = bench_sim.simulate(system[:-4], npages, cap, passes)
                    run = {"workload": workload, "system": system, "p50_us": None, "p99_us": None,
                           "mib_s": None, "faults": int(statistics.median(faults)), "cpu_us_per_page": None,
                           "repeats": len(faults), "per_repeat": [{"faults": f} for f in faults]}
                    runs.append(run)
                    progress(i, len(plan), run, time.monotonic() - t0)
                continue
            kswap = None
            if system == "kernel-swap":
                kswap = KernelSwap(os.path.join(workdir, "swapfile"), 2 * size, budget)
            try:
                if kswap:
                    try:
                        kswap.start()
                    except (RuntimeError, OSError, subprocess.CalledProcessError) as e:
                        setup_error[system] = f"kernel swap setup: {e}"
                    if kswap.other_swaps:
                        notes.append(f"other swap areas were active during kernel-swap: {', '.join(kswap.other_swaps)}")
                for workload in todo:
                    i += 1
                    t0 = time.monotonic()
                    if system in setup_error:
                        run = summarize(system, workload, {"error": setup_error[system]})
                        runs.append(run)
                        progress(i, len(plan), run, 0.0)
                        continue
                    spec = {"system": system, "workload": workload, "size": size, "repeat": args.repeat,
                            "params": params, "keep_samples": workload == "random-read",
                            "store_size": 2 * size}
                    if system == "kernel-swap":
                        spec.update(kind="kernel", cgroup=CGROUP)
                        result = run_child(spec, workdir, timeout)
                    elif system.startswith("raw-"):
                        spec.update(kind="raw", backing=file_backing if system == "raw-file" else nfs_backing)
                        result = run_child(spec, workdir, timeout)
                    else:
                        backing = file_backing if system == "uswap-file" else nfs_backing
                        result = run_uswap(spec, backing, os.path.join(workdir, system), size, budget, timeout,
                                           config)
                    run = summarize(system, workload, result)
                    if result.get("samples_us"):
                        samples[(system, workload)] = result["samples_us"]
                    runs.append(run)
                    progress(i, len(plan), run, time.monotonic() - t0)
            finally:
                if kswap:
                    try:
                        kswap.stop()
                    except RuntimeError as e:
                        log(f"bench: WARNING: kernel swap teardown incomplete: {e}")
                        notes.append(f"kernel swap teardown incomplete: {e}")
    finally:
        if nfs_backing:
            nfs.remove(nfs_file)
        nfs.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    elapsed = time.monotonic() - t_start

    title = (f"W {format_size(size)}, budget {format_size(budget)}, {platform.release()}, "
             f"{os.cpu_count()} vCPU")
    header = (f"Generated by `scripts/bench.py{' --quick' if args.quick else ''}` on "
              f"{time.strftime('%Y-%m-%d')} ({title}): medians of {args.repeat} repetitions after a "
              f"warm-up pass, each (system, workload) in its own process. kernel-swap: cgroup v1 limit "
              f"W/4, swap file on the same ext4 root as the uswap-file store.")
    notes += [
        "faults: uswap = daemon faults_total (every fault it served, one per read-ahead window on "
        "sequential streams); kernel-swap = major faults of the process; sims = misses.",
        "CPU µs/page: uswap = daemon CPU per page swapped in or written; kernel-swap = system time of "
        "the process per page of pswpin+pswpout.",
    ]
    md = report.markdown(runs, header, notes)
    # Files first, the terminal last: a closed stdout must not cost the results.
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": {"size": size, "budget": budget, "repeat": args.repeat, "quick": args.quick,
                                  "params": params, "kernel": platform.release(), "elapsed_s": round(elapsed, 1)},
                       "runs": runs, "ratios": report.ratios(runs), "targets": report.target_lines(runs),
                       "notes": notes}, f, indent=2)
    if args.readme:
        report.update_readme(args.readme, md)
    try:
        for path in report.plots(runs, samples, args.plots, title):
            log(f"bench: wrote {path}")
    except Exception as e:  # plots are a nicety; the numbers are already out
        log(f"bench: plots failed: {e}")
    try:
        print()
        print(md)
        print(f"runtime {elapsed:.0f} s", flush=True)
    except BrokenPipeError:
        pass
    return 1 if any(r.get("error") for r in runs) else 0


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
              config: dict | None = None) -> dict:
    """A fresh daemon for one run (same store file every time), the child, then a drain."""
    os.makedirs(sysdir, exist_ok=True)
    try:
        d = DaemonProc(sysdir, backing, store_size=str(2 * size), max_resident=str(budget), config=config)
    except RuntimeError as e:
        return {"error": f"daemon did not start: {e}"}
    result: dict = {}
    try:
        spec = dict(spec, kind="uswap", socket=d.socket, daemon_pid=d.proc.pid)
        result = run_child(spec, os.path.dirname(sysdir), timeout)
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
