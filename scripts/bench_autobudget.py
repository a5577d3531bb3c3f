#!/usr/bin/env python3
"""How `max_resident: auto` follows the host under a real memory hog.

    .venv/bin/python scripts/bench_autobudget.py [--hog 8G] [--step 2G] [--json FILE] [--plot FILE.png]

A daemon on a local store with `max_resident: auto` (auto_fraction --fraction,
auto_interval 1s, auto_max the store's size) serves one client that keeps
rewriting a 512 MiB region. A hog process then takes `--step` of anonymous
memory (touched) every 3 s up to `--hog`, holds it 6 s and exits. Every
half second the script records the budget, the resident bytes, the host's
available memory and its PSI memory pressure from `status`. Prints one JSON
line per sample; --json writes them all, --plot draws them (matplotlib).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tests.daemon_proc import DaemonProc  # noqa: E402
from tests.harness import Workload  # noqa: E402
from uswap.sizes import parse_size  # noqa: E402

HOG = """
import sys, time
step, top = int(sys.argv[1]), int(sys.argv[2])
held = []
while sum(map(len, held)) < top:
    held.append(b"\x01" * step)   # written: really resident
    time.sleep(3)
time.sleep(6)
"""


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hog", default="8G")
    ap.add_argument("--step", default="2G")
    ap.add_argument("--store-size", default="8G")
    ap.add_argument("--fraction", type=float, default=0.3, help="auto_fraction")
    ap.add_argument("--seconds", type=float, default=100, help="how long to sample")
    ap.add_argument("--json")
    ap.add_argument("--plot")
    args = ap.parse_args()
    samples = []
    with tempfile.TemporaryDirectory(prefix="uswap-autobudget-") as work:
        d = DaemonProc(work, os.path.join(work, "swapfile"), store_size=args.store_size, max_resident=None,
                       config={"max_resident": "auto", "auto_min": "64M", "auto_fraction": args.fraction,
                               "auto_interval": "1s"})
        w = Workload(d.socket, "--size", "512M", "--shared", "--seconds", str(args.seconds + 10))
        hog = None
        try:
            t0 = time.monotonic()
            while time.monotonic() - t0 < args.seconds:
                t = time.monotonic() - t0
                if hog is None and t > 5:
                    hog = subprocess.Popen([sys.executable, "-c", HOG, str(parse_size(args.step)),
                                            str(parse_size(args.hog))], stdout=subprocess.DEVNULL)
                st = d.status()
                b = st["budget"]
                row = {"t": round(t, 2), "budget": st["max_resident_bytes"], "resident": st["resident_bytes"],
                       "available": b.get("host_available_bytes"), "pressure": b.get("memory_pressure")}
                samples.append(row)
                print(json.dumps(row), flush=True)
                time.sleep(0.5)  # the sampling period
        finally:
            if hog is not None:
                hog.kill()
                hog.wait()
            w.kill()
            d.stop()
        changes = [line for line in d.log_text().splitlines() if "budget: auto:" in line]
    print(f"{len(changes)} budget changes logged; first: {changes[:1]}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(samples, f)
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        gib = 1 << 30
        ts = [s["t"] for s in samples]
        fig, ax = plt.subplots(figsize=(8, 4))
        ax.plot(ts, [s["available"] / gib for s in samples], label="host available")
        ax.plot(ts, [s["budget"] / gib for s in samples], label="budget (max_resident: auto)")
        ax.plot(ts, [s["resident"] / gib for s in samples], label="resident")
        ax.set_xlabel("seconds")
        ax.set_ylabel("GiB")
        ax.legend()
        fig.savefig(args.plot, dpi=100, bbox_inches="tight")
    return 0


if __name__ == "__main__":
    sys.exit(main())
