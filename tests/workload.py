"""A stamping client for integration tests, run as its own process:

    python -m tests.workload --socket S --size 256M --passes 3 [--threads 4] [--shared]
                             [--until-told] [--hold]

Every page carries (page number, version, check word) in words [0..2] for
the writer of the page (partitioned mode), or in word 8*t for thread t of
--shared mode, where all threads write the same pages. Each pass verifies
what the previous pass wrote, then writes the next version. With
--until-told the run ends early once a line comes on stdin (the passes
with the one under way); with --hold it waits for a line after the run,
then verifies again (one or the other: both would read stdin). Exits 0
when every check passed; prints one JSON line per pass and a final JSON
summary.
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time

import numpy as np

import uswap
from uswap.sizes import parse_size

MAGIC = np.uint64(0x5EED_5A17_C0DE_0000)
WORDS = 512  # 64-bit words per page


def stamp(page_ids: np.ndarray, version: int) -> np.ndarray:
    return (page_ids.astype(np.uint64) * np.uint64(1_000_003)) ^ MAGIC ^ np.uint64(version)


def run_partitioned(a: np.ndarray, passes: int, threads: int, order: str, seed: int, out,
                    told: threading.Event | None = None) -> tuple[int, int]:
    """Up to `passes` passes (fewer once `told` is set: the passes end with
    the one under way); the errors and the passes made."""
    npages = a.shape[0]
    errors = [0] * threads
    parts = np.array_split(np.arange(npages), threads)
    # Whether to stop after this pass is decided once per pass, by the
    # barrier's action while every thread waits in it: all threads read the
    # same answer (each reading `told` itself could split them, one left
    # waiting for ever at the next barrier).
    done = [0, False]  # passes made, stop now

    def end_of_pass() -> None:
        done[0] += 1
        done[1] = told is not None and told.is_set()
    barrier = threading.Barrier(threads)  # every thread's part written and checked
    pass_end = threading.Barrier(threads, action=end_of_pass)  # the pass line printed

    def worker(t: int) -> None:
        rng = np.random.default_rng(seed + t)
        mine = parts[t]
        for v in range(1, passes + 1):
            idx = rng.permutation(mine) if order == "random" else mine
            for chunk in np.array_split(idx, max(1, len(idx) // 256)):
                if v > 1:
                    ok = (a[chunk, 0] == chunk) & (a[chunk, 1] == v - 1) & (a[chunk, 2] == stamp(chunk, v - 1))
                    errors[t] += int(np.count_nonzero(~ok))
                else:
                    errors[t] += int(np.count_nonzero(a[chunk, :3]))  # a new region reads zeros
                a[chunk, 0] = chunk
                a[chunk, 1] = v
                a[chunk, 2] = stamp(chunk, v)
            barrier.wait()
            if t == 0:
                print(json.dumps({"pass": v, "errors": sum(errors), "t": time.time()}), file=out, flush=True)
            pass_end.wait()
            if done[1]:
                break

    ts = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for th in ts:
        th.start()
    for th in ts:
        th.join()
    # Final check of the last version everywhere.
    made = done[0]
    ids = np.arange(npages)
    ok = (a[:, 0] == ids) & (a[:, 1] == made) & (a[:, 2] == stamp(ids, made))
    return sum(errors) + int(np.count_nonzero(~ok)), made


def run_shared(a: np.ndarray, seconds: float, threads: int, pages: int, seed: int, out,
               told: threading.Event | None = None) -> int:
    """All threads hammer the same `pages` pages for `seconds` (less once
    `told` is set); thread t owns word 8*t of each page and remembers the
    last value it wrote there. At the end every last write must be there
    (the seed's race: a write during writeback is lost if the page is
    dropped after it)."""
    last = np.zeros((threads, pages), np.uint64)
    stop = time.monotonic() + seconds
    counts = [0] * threads

    def worker(t: int) -> None:
        rng = np.random.default_rng(seed + t)
        col = 8 * t
        n = 0
        while time.monotonic() < stop and not (told is not None and told.is_set()):
            for p in rng.integers(0, pages, 64):
                n += 1
                a[p, col] = n
                last[t, p] = n
        counts[t] = n

    ts = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for th in ts:
        th.start()
    for th in ts:
        th.join()
    errors = 0
    for t in range(threads):
        errors += int(np.count_nonzero(a[:pages, 8 * t] != last[t]))
    print(json.dumps({"writes": sum(counts), "errors": errors}), file=out, flush=True)
    return errors


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--socket", required=True)
    ap.add_argument("--size", default="64M")
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--order", choices=["seq", "random"], default="seq")
    ap.add_argument("--shared", action="store_true")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--hold", action="store_true", help="after the run, wait for a line on stdin, verify again")
    ap.add_argument("--until-told", action="store_true",
                    help="end once a line comes on stdin: with the pass under way (at most --passes), or --shared's writes")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--name", help="the client's name in the daemon's status (default: the process's)")
    args = ap.parse_args()
    if args.until_told and args.hold:
        ap.error("--until-told and --hold both wait for a line on stdin: give one of them")
    size = parse_size(args.size)
    with uswap.connect(args.socket, name=args.name) as client:
        region = client.alloc(size)
        a = np.frombuffer(region.buf, dtype=np.uint64).reshape(-1, WORDS)
        print(json.dumps({"region": region.id, "pages": a.shape[0]}), flush=True)
        told = None
        if args.until_told:
            told = threading.Event()
            threading.Thread(target=lambda: (sys.stdin.readline(), told.set()), daemon=True).start()
        if args.shared:
            errors = run_shared(a, args.seconds, args.threads, a.shape[0], args.seed, sys.stdout, told)
        else:
            errors, made = run_partitioned(a, args.passes, args.threads, args.order, args.seed, sys.stdout, told)
        if args.hold:
            print(json.dumps({"holding": True}), flush=True)
            sys.stdin.readline()
            ids = np.arange(a.shape[0])
            if not args.shared:
                ok = (a[:, 0] == ids) & (a[:, 1] == made) & (a[:, 2] == stamp(ids, made))
                errors += int(np.count_nonzero(~ok))
        print(json.dumps({"done": True, "errors": errors}), flush=True)
        del a
        region.close()
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
