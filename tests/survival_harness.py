"""The survival tests' two halves (tests/system/test_survival.py):

- the stamping client, a process of its own (`Workload.script(CLIENT, ...)`):
  it allocates regions, touches every page in the mode the test sets on its
  stdin (write / seq / rand / idle), verifies each page's stamp itself on every
  touch, and times every touch, so that the test can ask afterwards how long
  it stalled around a daemon's death;
- the test's side: a lineage of daemons on one socket, store and state
  directory (each generation logs to its own file), killing one at a moment
  chosen by its status counters, and the checks made after every restart.

Why a client of our own and not tests.workload: the workload runs a fixed
number of passes and cannot be told to switch between writing and the two
read streams, nor report its stalls.
"""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time

from tests.daemon_proc import ILLEGAL_TRANSITION, DaemonProc
from tests.harness import Workload, assert_audit, ctl, status, wait_for

PAGE = 4096
WORDS = PAGE // 8
# A touch slower than this is logged by the client as a stall (seconds); a
# normal touch, a swap-in from the NFS server included, takes well under it.
STALL_LOG_MIN = 0.02

# ------------------------------------------------------------------ client side

MODES = ("write", "seq", "rand", "churn", "idle", "free", "quit")
# churn mode: the pages of each short-lived region, and how many regions
# make one reported pass.
CHURN_PAGES = (1, 16)
CHURN_PASS = 8


def page_ident(tag: int, region: int, page: int) -> int:
    """Word 0 of a page: which client, region and page it belongs to, so a
    page served from another region's (or client's) slot is caught."""
    return (1 << 63) | (tag << 40) | (region << 24) | page


def page_check(ident: int, version: int) -> int:
    """Words 2 and 511 of a page: both ends of the page carry the same check,
    so a page whose start and end come from different writes is caught."""
    return (ident * 0x9E3779B97F4A7C15 + version * 0xC2B2AE3D27D4EB4F + 1) & 0xFFFF_FFFF_FFFF_FFFF


class StampingClient:
    """Regions whose every page holds (ident, version, check, ..., check);
    `versions` is what this process last wrote to each page (0: never
    written, the page must read zeros)."""

    def __init__(self, sock: str, tag: int, pages: int, nregions: int, seed: int) -> None:
        import numpy as np
        import uswap
        self.np = np
        self.tag = tag
        self.pages = pages
        self.client = uswap.connect(sock)
        self.regions = [self.client.alloc(pages * PAGE) for _ in range(nregions)]
        self.views = [np.frombuffer(r.buf, dtype=np.uint64).reshape(-1, WORDS) for r in self.regions]
        self.versions = [[0] * pages for _ in range(nregions)]
        self.rng = random.Random(seed)
        self.mode = "idle"
        self.mode_changed = threading.Event()
        self.stalls: list[tuple[float, float]] = []
        self.errors = 0
        self.passes = 0
        self.requests = 0  # alloc and free requests of churn mode
        self.lock = threading.Lock()

    def report(self, **fields) -> None:
        with self.lock:
            print(json.dumps(fields), flush=True)

    def touch(self, ri: int, p: int, write: bool) -> None:
        """Verify page p of region ri (the read faults it in), then, in write
        mode, stamp its next version. Times the whole touch."""
        row = self.views[ri][p]
        ident = page_ident(self.tag, ri, p)
        v = self.versions[ri][p]
        t0 = time.monotonic()
        got = (int(row[0]), int(row[1]), int(row[2]), int(row[WORDS - 1]))
        want = (ident, v, page_check(ident, v), page_check(ident, v)) if v else (0, 0, 0, 0)
        if got != want:
            self.errors += 1
            if self.errors <= 20:
                self.report(bad={"region": ri, "page": p, "want": [hex(x) for x in want],
                                 "got": [hex(x) for x in got], "t": time.monotonic()})
        if write:
            v += 1
            check = page_check(ident, v)
            row[0] = ident
            row[1] = v
            row[2] = check
            row[WORDS - 1] = check
            self.versions[ri][p] = v
        t1 = time.monotonic()
        if t1 - t0 > STALL_LOG_MIN:
            self.stalls.append((t0, t1))

    def one_pass(self, mode: str) -> bool:
        """Touch every page once (in order, or in a random permutation for
        rand); False if the mode changed before the pass ended."""
        n = len(self.views) * self.pages
        order = range(n) if mode != "rand" else self.rng.sample(range(n), n)
        start = time.monotonic()
        write = mode == "write"
        for flat in order:
            if self.mode != mode:
                return False
            ri, p = divmod(flat, self.pages)
            self.touch(ri, p, write)
        self.passes += 1
        self.report(**{"pass": self.passes, "mode": mode, "start": start, "end": time.monotonic(),
                       "errors": self.errors})
        return True

    def work(self) -> None:
        while True:
            mode = self.mode
            if mode == "quit":
                return
            if mode == "idle":
                self.mode_changed.wait()
                self.mode_changed.clear()
                continue
            if mode == "free":
                self.free_last()
                continue
            if mode == "churn":
                self.churn_pass()
                continue
            self.one_pass(mode)

    def churn_pass(self) -> None:
        """CHURN_PASS short-lived regions, one after the other: alloc, stamp
        every page, verify every page, free. A request that fails (the
        daemon died under it) is reported as churn_error: the client
        library is to carry requests across a daemon restart."""
        start = time.monotonic()
        for k in range(CHURN_PASS):
            if self.mode != "churn":
                return
            npages = self.rng.randint(*CHURN_PAGES)
            self.requests += 1
            self.report(sending="alloc", n=self.requests)
            try:
                region = self.client.alloc(npages * PAGE)
            except Exception as e:
                self.report(churn_error=f"alloc: {e!r}", t=time.monotonic())
                continue
            view = self.np.frombuffer(region.buf, dtype=self.np.uint64).reshape(-1, WORDS)
            for p in range(npages):
                ident = page_ident(self.tag, 100 + k, p)
                view[p, 0], view[p, 1], view[p, 2] = ident, 1, page_check(ident, 1)
            for p in range(npages):
                ident = page_ident(self.tag, 100 + k, p)
                got = (int(view[p, 0]), int(view[p, 1]), int(view[p, 2]))
                if got != (ident, 1, page_check(ident, 1)):
                    self.errors += 1
                    self.report(bad={"churn_region": region.id, "page": p, "got": [hex(x) for x in got]})
            del view
            self.requests += 1
            self.report(sending="free", n=self.requests)
            try:
                region.close()
            except Exception as e:
                self.report(churn_error=f"free: {e!r}", t=time.monotonic())
        self.passes += 1
        self.report(**{"pass": self.passes, "mode": "churn", "start": start, "end": time.monotonic(),
                       "errors": self.errors})

    def free_last(self) -> None:
        """Close the last region (dropping our view of it first: a region is
        not unmapped under a view), report its id, go idle."""
        view = self.views.pop()
        del view
        self.versions.pop()
        region = self.regions.pop()
        region.close()
        if self.mode == "free":
            self.mode = "idle"
        self.report(freed=region.id, t=time.monotonic())

    def commands(self) -> None:
        """stdin: `mode M`, `stalls SINCE` (the stalls that ended after SINCE,
        a time.monotonic() value: the clock is the machine's, shared with the
        test), `quit`."""
        for line in sys.stdin:
            words = line.split()
            if not words:
                continue
            if words[0] == "mode" and words[1] in MODES:
                self.mode = words[1]
                self.mode_changed.set()
                self.report(mode=words[1])
            elif words[0] == "stalls":
                since = float(words[1])
                self.report(stalls=[s for s in self.stalls if s[1] > since], now=time.monotonic())
            if self.mode == "quit":
                return
        self.mode = "quit"
        self.mode_changed.set()

    def final_check_and_close(self) -> int:
        """Verify every page once more, free the regions; the error count."""
        for ri in range(len(self.views)):
            for p in range(self.pages):
                self.touch(ri, p, write=False)
        del self.views
        for r in self.regions:
            r.close()
        self.client.close()
        return self.errors


def client_main() -> None:
    """argv: SOCKET TAG PAGES NREGIONS SEED. Prints {"pid", "regions"} once
    the regions exist, then report lines; ends with {"done", "errors"}."""
    sock, tag, pages, nregions, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    c = StampingClient(sock, tag, pages, nregions, seed)
    c.report(pid=os.getpid(), regions=[r.id for r in c.regions])
    worker = threading.Thread(target=c.work, daemon=True)
    worker.start()
    c.commands()
    worker.join()
    errors = c.final_check_and_close()
    c.report(done=True, errors=errors)
    sys.exit(3 if errors else 0)


CLIENT = "from tests.survival_harness import client_main; client_main()"

# ------------------------------------------------------------------ test side


class Lineage:
    """Daemons started one after the other on the same socket, store and
    state directory (DaemonProc.restart): each adopts what the last one
    left. `d` is the DaemonProc, `number` the current start (0 first) and
    `ready_at` the moment (time.monotonic) its ready line was seen."""

    def __init__(self, workdir: str, backing: str, max_resident: str = "1M", store_size: str = "64M",
                 config: dict | None = None, inject: dict | None = None) -> None:
        """`config`: the daemons' config file; rewrite it (self.d.write_config)
        to start the next daemon with other settings. `inject`: USWAP_INJECT
        of every start (None: the store is used directly)."""
        self.config = config
        self.inject = inject
        self.workdir = workdir
        self.backing = backing
        self.max_resident = max_resident
        self.store_size = store_size
        self.d: DaemonProc | None = None
        self.number = -1
        self.ready_at = 0.0

    @property
    def socket(self) -> str:
        return self.d.socket

    def start(self, wait: bool = True) -> DaemonProc:
        """The first daemon, or the next one once the last has exited;
        `wait` False: return before it is ready (then wait_ready())."""
        if self.d is None:
            self.d = DaemonProc(self.workdir, self.backing, store_size=self.store_size,
                                max_resident=self.max_resident, config=self.config, inject=self.inject)
        else:
            self.d.restart(wait=False, inject=self.inject)
        self.number += 1
        if wait or self.number == 0:
            self.wait_ready()
        return self.d

    def log_lines(self, start: int) -> int:
        """How many lines start `start` (0: the first daemon) has logged."""
        with open(self.d.log_paths[start]) as f:
            return sum(1 for _ in f)

    def lines_before_ready(self, start: int) -> int:
        """How many lines start `start` logged before its ready line."""
        with open(self.d.log_paths[start]) as f:
            for n, line in enumerate(f):
                if " ready:" in line:
                    return n
        raise AssertionError(f"daemon start {start} never logged its ready line")

    def wait_ready(self) -> float:
        self.d.wait_ready(timeout=60)
        self.ready_at = time.monotonic()
        return self.ready_at

    def alive(self) -> bool:
        return self.d.proc.poll() is None

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.d.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"daemon {self.number} still running after {timeout}s:\n"
                                 f"{self.d.log_text()[-5000:]}") from None

    def kill(self) -> int:
        return self.d.kill()

    def bad_lines(self) -> list[str]:
        """Illegal transitions and tracebacks in the log of any start."""
        if self.d is None:
            return []
        return [line for line in self.d.all_log_text().splitlines()
                if ILLEGAL_TRANSITION in line or "Traceback" in line]


class Clients:
    """The stamping client processes of one test."""

    def __init__(self, socket: str, n: int, pages: int, nregions: int, seed: int) -> None:
        self.procs: list[Workload] = []
        self.info: list[dict] = []
        self.regions = [nregions] * n  # each client's live regions
        self.modes = ["idle"] * n
        for tag in range(n):
            w = Workload.script(CLIENT, socket, tag + 1, pages, nregions, seed * 100 + tag)
            self.procs.append(w)
        for w in self.procs:
            self.info.append(w.wait_line(lambda x: "regions" in x, timeout=60))

    def set_modes(self, modes: list[str]) -> None:
        self.modes = list(modes)
        for w, m in zip(self.procs, modes):
            w.send(f"mode {m}\n")

    def check_no_bad(self) -> None:
        """Fail at once on any page a client found wrong, or any request
        that failed across a restart (read so far)."""
        for w in self.procs:
            bad = [line for line in w.lines if "bad" in line]
            assert not bad, f"client {w.pid} found pages lost or stale: {bad[:5]}"
            failed = [line for line in w.lines if "churn_error" in line]
            assert not failed, (f"client {w.pid}: {len(failed)} requests failed across a daemon restart"
                                f" (first, last: {failed[0]}, {failed[-1]})")

    def wait_pass_after(self, t: float, timeout: float, seed: int) -> None:
        """Every client completes a full pass (every page verified) that began
        after `t`; a client in idle mode is put to seq for it."""
        self.set_modes(["seq" if m == "idle" else m for m in self.modes])
        deadline = time.monotonic() + timeout
        for w in self.procs:
            w.wait_line(lambda x: "pass" in x and x["start"] > t, timeout=max(0.1, deadline - time.monotonic()))
        self.check_no_bad()
        for w in self.procs:
            last = [x for x in w.lines if "pass" in x][-1]
            assert last["errors"] == 0, f"seed {seed}: client {w.pid}: {last}"

    def longest_stall_after(self, t: float, timeout: float) -> tuple[float, int]:
        """The longest time any client's touch stayed stalled after `t`
        (a stall that began before t counts from t), and the client's pid."""
        worst, who = 0.0, 0
        for w in self.procs:
            w.send(f"stalls {t}\n")
        for w in self.procs:
            line = w.wait_line(lambda x: "stalls" in x, timeout=timeout)
            for start, end in line["stalls"]:
                if end - max(start, t) > worst:
                    worst, who = end - max(start, t), w.pid
        return worst, who

    def quit(self, timeout: float) -> None:
        for w in self.procs:
            w.send("mode quit\n")
        for w in self.procs:
            lines = w.finish(timeout)
            assert w.proc.returncode == 0, (lines[-5:], w.proc.stderr.read()[-3000:])
            assert lines[-1] == {"done": True, "errors": 0}, lines[-5:]

    @property
    def total_regions(self) -> int:
        return sum(self.regions)

    def pids(self) -> set[int]:
        return {info["pid"] for info in self.info}

    def kill_one(self, i: int) -> dict:
        """SIGKILL client i and stop counting it; its first report line."""
        self.procs.pop(i).kill()
        self.modes.pop(i)
        self.regions.pop(i)
        return self.info.pop(i)

    def free_one(self, i: int) -> None:
        """Client i closes its last region (its report comes later: the free
        request waits for a daemon, see wait_freed)."""
        self.procs[i].send("mode free\n")
        self.regions[i] -= 1
        self.modes[i] = "idle"

    def wait_freed(self, i: int, timeout: float) -> dict:
        """Client i's report that its region is freed (read already, or to come)."""
        w = self.procs[i]
        seen = [x for x in w.lines if "freed" in x]
        return seen[0] if seen else w.wait_line(lambda x: "freed" in x, timeout)

    def kill(self) -> None:
        for w in self.procs:
            w.kill()


def adopted_regions(st: dict, pids: set[int]) -> int:
    """How many regions of the clients `pids` the daemon holds."""
    return sum(len(c["regions"]) for c in st["clients"] if c["pid"] in pids)


def kill_when(lin: Lineage, counter: str, threshold: int, timeout: float) -> dict:
    """SIGKILL the lineage's daemon as soon as its status counter `counter` reaches
    `threshold` (polled, never slept on); the last status seen before."""
    seen = {}

    def reached():
        st = status(lin.d)
        seen["st"] = st
        return st[counter] >= threshold
    wait_for(f"{counter} >= {threshold}", reached, timeout, interval=0.002)
    lin.kill()
    return seen["st"]


def swapped_by_usr1(d: DaemonProc, timeout: float = 10.0) -> int | None:
    """The daemon's swapped bytes, from the status line SIGUSR1 logs (a
    draining daemon has closed its socket: this is how to watch its
    counters then); None once it has exited."""
    mark = "SIGUSR1: status:"
    before = d.log_text().count(mark)
    d.proc.send_signal(signal.SIGUSR1)

    def logged():
        if d.proc.poll() is not None:
            return "exited"
        text = d.log_text()
        return text if text.count(mark) > before else None
    got = wait_for(f"daemon pid {d.proc.pid}'s SIGUSR1 status line", logged, timeout, interval=0.001)
    if got == "exited":
        return None
    return int(re.search(r"swapped (\d+) bytes", got.rsplit(mark, 1)[1]).group(1))


def check_store_accounting(st: dict, seed: int) -> None:
    """The audit is clean, no illegal transition, and the slots the store has
    in use are the swapped pages plus at most the swap cache (clean resident
    pages keep their slot, design 6.2) and the quarantine: no leaked slot."""
    assert st["audit"] is not None and st["audit"]["charged_ok"] and st["audit"]["slots_ok"], (seed, st["audit"])
    assert_audit(st)
    assert st["illegal_transitions_total"] == 0, (seed, st["illegal_transitions_total"])
    used = st["store"]["used_bytes"]
    swapped = st["swapped_bytes"]
    slack = st["resident_bytes"] + st["store"]["quarantined_bytes"]
    assert swapped <= used <= swapped + slack, (
        f"seed {seed}: store slots in use {used} bytes, swapped {swapped}, resident + quarantine {slack}"
        f" (audit {st['audit']})")


def settled_status(g: DaemonProc, timeout: float = 30.0) -> dict:
    """A status with an audit (None while a region closes)."""
    return wait_for("an audit", lambda: (lambda s: s if s["audit"] is not None else None)(status(g)), timeout)


def handover(g: DaemonProc) -> dict:
    """Ask daemon `g` for a handover over the socket (the control op)."""
    return ctl(g, {"op": "handover"})
