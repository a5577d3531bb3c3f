"""A real uswap client process for tests/system/test_real_processes.py:

    python -m tests.realproc_child --socket S --role steady  [--pages N]
    python -m tests.realproc_child --socket S --role SCENARIO [--pages N] [--op LO:HI] [...]

Every 8-byte word of a page holds (tag, page id, generation, word index), so
any wrong word says what it is instead: zeros, an older generation of the same
page (stale), another page, or another writer's data (see `describe_word`).

`steady` is the well-behaved second client: it rewrites and verifies its own
region pass after pass until it reads "stop" on stdin, then verifies every
byte once more. A scenario role fills its region, starts threads that keep
touching it (writers rewrite the pages outside the operated part, a reader
sweeps the operated part), makes one call of the scenario on the operated
part (splitting the mapping), checks the result, stops the threads and
verifies every byte it still owns. Output is one JSON object a line; the last
one is {"verdict": ...} with the wrong pages described by index, expected
and found values. Exit status 0 only when the verdict is clean.

A stall (a thread making no progress within its deadline) ends the process
with a verdict naming the thread and its kernel wait channel
("handle_userfault" means it waits for the daemon to serve a page fault).
"""
from __future__ import annotations

import argparse
import ctypes
import errno
import json
import multiprocessing
import os
import select
import signal
import subprocess
import sys
import threading
import time
import traceback

import numpy as np

import uswap

PAGE = 4096
WORDS = PAGE // 8
WORD_IDX = np.arange(WORDS, dtype=np.uint64)

TAG_SCENARIO, TAG_STEADY, TAG_FILE, TAG_CHILD = 1, 2, 3, 4
TAG_NAMES = {0: "zero-tag", TAG_SCENARIO: "scenario", TAG_STEADY: "steady", TAG_FILE: "file", TAG_CHILD: "child"}
MAX_DESCRIBED = 8           # wrong pages described in full; the rest are counted
PROGRESS_DEADLINE = 20.0    # seconds a touching thread may go without progress before it counts as stalled
WATCHDOG = 30.0             # seconds the main thread may go silent (stuck in a fault) before the process gives up

# <sys/mman.h>
PROT_NONE, PROT_READ, PROT_WRITE = 0, 1, 2
MAP_PRIVATE, MAP_ANONYMOUS, MAP_FIXED_NOREPLACE = 0x02, 0x20, 0x100000
MREMAP_MAYMOVE, MREMAP_FIXED = 1, 2
MADV = {"NORMAL": 0, "RANDOM": 1, "SEQUENTIAL": 2, "WILLNEED": 3, "DONTNEED": 4, "FREE": 8, "REMOVE": 9,
        "DONTFORK": 10, "DOFORK": 11, "HUGEPAGE": 14, "NOHUGEPAGE": 15, "DONTDUMP": 16, "DODUMP": 17,
        "COLD": 20, "PAGEOUT": 21, "POPULATE_READ": 22, "POPULATE_WRITE": 23}


# ---------------------------------------------------------------- the pattern

def encode(tag, ident, gen) -> np.ndarray:
    """Rows of page contents: word w of a page is tag<<60 | id<<36 | gen<<12 | w."""
    tag = np.asarray(tag, dtype=np.uint64)
    ident = np.asarray(ident, dtype=np.uint64)
    gen = np.asarray(gen, dtype=np.uint64)
    base = (tag << np.uint64(60)) | (ident << np.uint64(36)) | (gen << np.uint64(12))
    return base[..., None] | WORD_IDX


def decode_word(value: int) -> tuple[int, int, int, int]:
    v = int(value)
    return v >> 60, (v >> 36) & 0xFFFFFF, (v >> 12) & 0xFFFFFF, v & 0xFFF


def describe_word(value: int) -> str:
    v = int(value)
    if v == 0:
        return "0 (zero)"
    tag, ident, gen, word = decode_word(v)
    if tag in TAG_NAMES and word < WORDS:
        return f"{v:#018x} ({TAG_NAMES[tag]} page {ident} gen {gen} word {word})"
    return f"{v:#018x} (not a pattern word)"


def describe_page(where: str, page: int, got: np.ndarray, exp: np.ndarray) -> str:
    """One wrong page: how many words are wrong, the first of them, and what
    the page as a whole looks like (all zeros, stale, another page's)."""
    bad = np.flatnonzero(got != exp)
    w = int(bad[0])
    kind = ""
    if not got.any():
        kind = "; the whole page reads zeros"
    else:
        etag, eid, egen, _ = decode_word(exp[w])
        ftag, fid, fgen, _ = decode_word(got[w])
        if (ftag, fid) == (etag, eid) and fgen < egen:
            kind = f"; stale: an older generation ({fgen} < {egen})"
        elif (ftag, fid) == (etag, eid) and fgen > egen:
            kind = f"; a newer generation than expected ({fgen} > {egen})"
        elif ftag in TAG_NAMES and (ftag, fid) != (etag, eid):
            kind = f"; data of {TAG_NAMES[ftag]} page {fid}"
    return (f"{where}: page {page}: {bad.size} of {WORDS} words wrong; word {w}: expected "
            f"{describe_word(exp[w])}, found {describe_word(got[w])}{kind}")


class Verifier:
    """What every page of `a` must hold (tag, id, generation per page), and
    the wrong pages found so far. Pages are written only through `write`."""

    def __init__(self, a: np.ndarray, tag: int) -> None:
        self.a = a
        n = a.shape[0]
        self.tag = np.full(n, tag, np.uint64)
        self.ident = np.arange(n, dtype=np.uint64)
        self.gen = np.zeros(n, np.uint64)
        self.lock = threading.Lock()
        self.wrong: list[str] = []
        self.wrong_pages = 0

    def expected(self, pages: np.ndarray) -> np.ndarray:
        return encode(self.tag[pages], self.ident[pages], self.gen[pages])

    def write(self, pages: np.ndarray) -> None:
        """Next generation of `pages` (the caller owns them)."""
        self.gen[pages] += 1
        self.a[pages] = self.expected(pages)

    def check(self, pages: np.ndarray, where: str) -> int:
        """Compare every byte of `pages`; record and count the wrong ones."""
        got = self.a[pages]
        exp = self.expected(pages)
        rows = np.flatnonzero((got != exp).any(axis=1))
        if rows.size:
            with self.lock:
                self.wrong_pages += rows.size
                for r in rows[:max(0, MAX_DESCRIBED - len(self.wrong))]:
                    self.wrong.append(describe_page(where, int(pages[r]), got[r], exp[r]))
        return int(rows.size)

    def gen_floor(self) -> np.ndarray:
        """The oldest generation a concurrent reader may still see of each
        page: a writer counts the next generation before it writes it."""
        return np.maximum(self.gen, 1) - 1

    def check_at_least(self, pages: np.ndarray, gen_floor: np.ndarray, where: str) -> tuple[int, list[str]]:
        """For a forked child, whose copy of the expectations stops at the fork
        while the parent's writers go on: each word must be its page's, with a
        generation no older than at the fork. Lock-free (a lock held by a
        parent thread at fork time would never be released in the child).
        Returns the number of wrong pages and the first ones described."""
        got = self.a[pages]
        exp = self.expected(pages)
        fields = ~np.uint64(0xFFFFFF << 12)
        same_place = (got & fields) == (exp & fields)
        fresh = ((got >> np.uint64(12)) & np.uint64(0xFFFFFF)) >= gen_floor[pages][:, None]
        rows = np.flatnonzero(~(same_place & fresh).all(axis=1))
        return int(rows.size), [describe_page(where, int(pages[r]), got[r], exp[r]) for r in rows[:MAX_DESCRIBED]]


# ---------------------------------------------------------------- libc

class Libc:
    """The memory calls a program makes on its own region, through ctypes.
    Each returns 0 or the errno it failed with (mremap/mmap: the address)."""

    def __init__(self, trace=None) -> None:
        self.trace = trace or (lambda what: None)  # told of each call before it is made
        self.c = ctypes.CDLL(None, use_errno=True)
        vp, sz, i = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int
        for name, args, res in (("mprotect", [vp, sz, i], i), ("mlock", [vp, sz], i), ("munlock", [vp, sz], i),
                                ("madvise", [vp, sz, i], i), ("munmap", [vp, sz], i),
                                ("mremap", [vp, sz, sz, i, vp], vp), ("mmap", [vp, sz, i, i, i, ctypes.c_long], vp),
                                ("memset", [vp, i, sz], vp)):
            fn = getattr(self.c, name)
            fn.argtypes, fn.restype = args, res

    def _rc(self, ret: int) -> int:
        return 0 if ret == 0 else ctypes.get_errno()

    def mprotect(self, addr: int, size: int, prot: int) -> int:
        self.trace(f"mprotect({addr:#x}, {size // PAGE} pages, {prot})")
        return self._rc(self.c.mprotect(addr, size, prot))

    def mlock(self, addr: int, size: int) -> int:
        self.trace(f"mlock({addr:#x}, {size // PAGE} pages)")
        return self._rc(self.c.mlock(addr, size))

    def munlock(self, addr: int, size: int) -> int:
        self.trace(f"munlock({addr:#x}, {size // PAGE} pages)")
        return self._rc(self.c.munlock(addr, size))

    def madvise(self, addr: int, size: int, advice: int) -> int:
        self.trace(f"madvise({addr:#x}, {size // PAGE} pages, {advice})")
        return self._rc(self.c.madvise(addr, size, advice))

    def munmap(self, addr: int, size: int) -> int:
        self.trace(f"munmap({addr:#x}, {size // PAGE} pages)")
        return self._rc(self.c.munmap(addr, size))

    def mremap(self, addr: int, old: int, new: int, flags: int, new_addr: int = 0) -> tuple[int | None, int]:
        self.trace(f"mremap({addr:#x}, {old // PAGE} -> {new // PAGE} pages, flags {flags})")
        got = self.c.mremap(addr, old, new, flags, new_addr)
        if got is None or got == ctypes.c_void_p(-1).value:
            return None, ctypes.get_errno()
        return got, 0

    def mmap_reserve(self, size: int, at: int = 0) -> int | None:
        """An inaccessible anonymous range (at `at` only if it is free)."""
        flags = MAP_PRIVATE | MAP_ANONYMOUS | (MAP_FIXED_NOREPLACE if at else 0)
        got = self.c.mmap(at or None, size, PROT_NONE, flags, -1, 0)
        if got is None or got == ctypes.c_void_p(-1).value or (at and got != at):
            return None
        return got


def errname(e: int) -> str:
    return "0" if e == 0 else errno.errorcode.get(e, str(e))


# ---------------------------------------------------------------- diagnostics

def thread_waits(pid: int | str = "self") -> dict[str, str]:
    """Each thread's name and kernel wait channel (where a stalled one sleeps)."""
    out = {}
    base = f"/proc/{pid}/task"
    try:
        tids = os.listdir(base)
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"{base}/{tid}/comm") as f:
                comm = f.read().strip()
            with open(f"{base}/{tid}/wchan") as f:
                wchan = f.read().strip()
            with open(f"{base}/{tid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        out[tid] = f"{comm} state {state} wchan {wchan or '-'}"
    return out


class Stall(Exception):
    """A thread or child process made no progress within its deadline."""


_last = {"beat": time.monotonic(), "step": "start"}


def emit(obj: dict) -> None:
    _last["beat"] = time.monotonic()
    if "step" in obj or "phase" in obj:
        _last["step"] = obj.get("step") or obj.get("phase")
    print(json.dumps(obj), flush=True)


def start_watchdog(limit: float) -> None:
    """End the process with a stall verdict if the main thread says nothing
    for `limit` seconds (it is stuck in a fault: its own deadlines cannot
    fire). If the stuck thread holds the GIL, faulthandler (a C thread) dumps
    every thread's stack to stderr a little later and exits instead."""
    import faulthandler

    def watch() -> None:
        while time.monotonic() - _last["beat"] < limit:
            if _last.get("done"):
                faulthandler.cancel_dump_traceback_later()
                return
            faulthandler.dump_traceback_later(limit * 1.5, exit=True)  # re-armed while Python threads run
            time.sleep(0.5)
        emit({"verdict": {"scenario": "?", "ok": False, "errors": [], "notes": {}, "wrong_pages": 0, "wrong": [],
                          "stall": f"main thread silent for {limit}s after step {_last['step']!r}: threads "
                                   f"{thread_waits()}"}})
        os._exit(2)
    threading.Thread(target=watch, daemon=True).start()


# ---------------------------------------------------------------- touching threads

class Background:
    """Threads that keep the region busy while the scenario operates on part
    of it. The reader owns the zone: the operated part and ZONE_MARGIN pages
    either side. It sweeps the zone in order, only reading (so the part may be
    read-only), so its sequential fault stream (and the daemon's read-ahead)
    crosses both boundaries of the operated part, where the call splits the
    mapping. `writers` rewrite (verify, then next generation) random runs of
    the pages outside the zone; a sweeper reads those in order. Pages in
    `excluded` are never touched again; `sync()` returns once every thread has
    seen the current exclusions (so a page excluded before it may be unmapped)."""

    def __init__(self, v: Verifier, zone: np.ndarray, writers: int = 2, seed: int = 1) -> None:
        self.v = v
        n = v.a.shape[0]
        self.excluded = np.zeros(n, bool)
        self.reader_pages = zone
        self.reader_on = True
        in_zone = np.zeros(n, bool)
        in_zone[zone] = True
        outside = np.flatnonzero(~in_zone)
        runs = np.array_split(outside, max(1, outside.size // 8))   # runs of ~8 adjacent pages
        self.runs = [runs[t::writers] for t in range(writers)]
        self.outside = outside
        self.stop = threading.Event()
        self.epoch = 0
        self.seen: dict[str, int] = {}
        self.progress: dict[str, int] = {}
        self.sweeps = 0
        self.tids: dict[str, int] = {}
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._guard, args=(f"writer{t}", self._writer, t, seed + t),
                                         daemon=True) for t in range(writers)]
        for name, body in (("reader", self._reader), ("sweeper", self._sweeper)):
            self.threads.append(threading.Thread(target=self._guard, args=(name, body, 0, 0), daemon=True))

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def _guard(self, name: str, body, t: int, seed: int) -> None:
        self.tids[name] = threading.get_native_id()
        self.progress[name] = 0
        self.seen[name] = -1
        try:
            body(name, t, seed)
        except BaseException:
            self.errors.append(f"{name}: {traceback.format_exc(limit=3)}")
        finally:
            self.seen[name] = 1 << 62  # a finished thread never holds up sync()

    def _writer(self, name: str, t: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        mine = self.runs[t]
        while not self.stop.is_set():
            self.seen[name] = self.epoch
            run = mine[int(rng.integers(len(mine)))]
            run = run[~self.excluded[run]]
            if run.size:
                self.v.check(run, name)
                self.v.write(run)
            self.progress[name] += 1

    def _reader(self, name: str, t: int, seed: int) -> None:
        pos = 0
        while not self.stop.is_set():
            self.seen[name] = self.epoch
            if not self.reader_on:
                self.stop.wait(0.002)
                self.progress[name] += 1
                continue
            zone = self.reader_pages
            pages = zone[pos:pos + 8]
            pages = pages[~self.excluded[pages]]
            if pages.size:
                self.v.check(pages, name)
            pos += 8
            if pos >= zone.size:
                pos = 0
                self.sweeps += 1
            self.progress[name] += 1

    def _sweeper(self, name: str, t: int, seed: int) -> None:
        """Reads only; the writers may be rewriting what it reads, so a word
        passes if it is its page's with a generation no older than one below
        the expected one when the run was started (a writer counts the next
        generation before it writes it)."""
        pos = 0
        while not self.stop.is_set():
            self.seen[name] = self.epoch
            run = self.outside[pos:pos + 8]
            run = run[~self.excluded[run]]
            if run.size:
                floor = self.v.gen_floor()
                count, wrong = self.v.check_at_least(run, floor, name)
                if count:
                    with self.v.lock:
                        self.v.wrong_pages += count
                        self.v.wrong += wrong[:max(0, MAX_DESCRIBED - len(self.v.wrong))]
            pos = pos + 8 if pos + 8 < self.outside.size else 0
            self.progress[name] += 1

    def _stalled(self, names: list[str], what: str, timeout: float) -> Stall:
        waits = thread_waits()
        detail = "; ".join(f"{n} (tid {self.tids.get(n)}): {waits.get(str(self.tids.get(n)), '?')}" for n in names)
        return Stall(f"{what}: no progress within {timeout}s: {detail}")

    def sync(self, timeout: float = PROGRESS_DEADLINE) -> None:
        """Wait until every thread has passed its loop top since now."""
        self.epoch += 1
        want = self.epoch
        deadline = time.monotonic() + timeout
        while True:
            late = [n for n, s in self.seen.items() if s < want]
            if not late:
                return
            if time.monotonic() > deadline:
                raise self._stalled(late, "threads not back at their loop top", timeout)
            _last["beat"] = time.monotonic()
            time.sleep(0.001)

    def exclude(self, pages: np.ndarray) -> None:
        """Stop touching `pages`; returns once no thread is touching them."""
        self.excluded[pages] = True
        self.sync()

    def pause_reader(self) -> None:
        self.reader_on = False
        self.sync()

    def resume_reader(self) -> None:
        self.reader_on = True

    def wait_progress(self, rounds: int = 2, timeout: float = PROGRESS_DEADLINE) -> None:
        """Every thread completes `rounds` more iterations (the region is still served)."""
        start = dict(self.progress)
        deadline = time.monotonic() + timeout
        while True:
            late = [n for n in start if self.progress[n] < start[n] + rounds]
            if not late or self.errors:
                return
            if time.monotonic() > deadline:
                raise self._stalled(late, "touching threads", timeout)
            _last["beat"] = time.monotonic()
            time.sleep(0.002)

    def wait_sweeps(self, n: int = 1, timeout: float = PROGRESS_DEADLINE) -> None:
        """The reader reads the whole operated part `n` more times."""
        want = self.sweeps + n
        deadline = time.monotonic() + timeout
        while self.sweeps < want and not self.errors:
            if time.monotonic() > deadline:
                raise self._stalled(["reader"], "reader sweep over the operated part", timeout)
            _last["beat"] = time.monotonic()
            time.sleep(0.002)

    def finish(self, timeout: float = PROGRESS_DEADLINE) -> None:
        self.stop.set()
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        alive = [n for n, th in zip([*self.tids], self.threads) if th.is_alive()]
        if alive:
            raise self._stalled(alive, "stopping the touching threads", timeout)


# ---------------------------------------------------------------- the scenarios

ZONE_MARGIN = 32   # pages either side of the operated part that only the reader touches


def zone_of(op: tuple[int, int], n: int) -> np.ndarray:
    return np.arange(max(0, op[0] - ZONE_MARGIN), min(n, op[1] + ZONE_MARGIN))


class Scenario:
    """What a scenario function works with; `errors` are its own verdicts
    (a call that returned the wrong thing, a child that misbehaved)."""

    def __init__(self, args, client: uswap.Client, region, a: np.ndarray, v: Verifier, bg: Background,
                 op: tuple[int, int]) -> None:
        self.args = args
        self.client = client
        self.region = region
        self.a = a
        self.v = v
        self.bg = bg
        self.op = op
        self.op_pages = np.arange(*op)
        self.zone = zone_of(op, a.shape[0])
        self.libc = Libc(trace=self.step)
        self.notes: dict = {}
        self.errors: list[str] = []
        self.mapped = (region.size + PAGE - 1) // PAGE * PAGE

    def step(self, what: str) -> None:
        """Say what comes next (a stalled case then shows where it stopped)."""
        emit({"step": what})

    def addr(self, page: int) -> int:
        return self.region.addr + page * PAGE

    def op_span(self, lo: int | None = None, hi: int | None = None) -> tuple[int, int]:
        lo = self.op[0] if lo is None else lo
        hi = self.op[1] if hi is None else hi
        return self.addr(lo), (hi - lo) * PAGE

    def expect_ok(self, what: str, err: int, accept: tuple[int, ...] = (0,)) -> None:
        self.notes[what] = errname(err)
        if err not in accept:
            self.errors.append(f"{what} failed with {errname(err)} ({os.strerror(err)}); expected "
                               f"{' or '.join(errname(e) for e in accept)}")

    def rewrite_op(self, pages: np.ndarray | None = None) -> None:
        """The program writes its operated part again (reader paused: it
        would see half-written pages) and reads it back."""
        pages = self.zone if pages is None else pages
        pages = pages[~self.bg.excluded[pages]]
        self.step(f"rewrite pages {pages[0]}..{pages[-1]}")
        self.bg.pause_reader()
        for run in np.array_split(pages, max(1, pages.size // 32)):
            self.v.write(run)
            _last["beat"] = time.monotonic()
        self.v.check(pages, "rewritten operated part")
        self.bg.resume_reader()

    def wait_child(self, pid: int, timeout: float = PROGRESS_DEADLINE) -> int:
        """waitpid with a deadline: a child stuck in a fault is a stall."""
        deadline = time.monotonic() + timeout
        while True:
            got, status = os.waitpid(pid, os.WNOHANG)
            if got:
                return status
            if time.monotonic() > deadline:
                waits = thread_waits(pid)
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise Stall(f"forked child {pid} did not exit within {timeout}s: threads {waits}")
            _last["beat"] = time.monotonic()
            time.sleep(0.005)


def child_exit(ok: bool) -> None:
    os._exit(0 if ok else 1)


def fork_run(s: Scenario, body, timeout: float = PROGRESS_DEADLINE) -> tuple[int, dict]:
    """Fork; the child runs body() -> dict, sends it back as JSON through a
    pipe and _exits. Returns (wait status, the child's dict or {})."""
    rfd, wfd = os.pipe()
    s.step(f"fork: {getattr(body, '__name__', 'child')}")
    pid = os.fork()
    if pid == 0:
        os.close(rfd)
        try:
            result = body()
        except BaseException:
            result = {"exception": traceback.format_exc(limit=4)}
        os.write(wfd, json.dumps(result).encode())
        child_exit(not result.get("wrong") and "exception" not in result)
    os.close(wfd)
    status = s.wait_child(pid, timeout)
    data = b""
    while chunk := os.read(rfd, 65536):
        data += chunk
    os.close(rfd)
    return status, (json.loads(data) if data else {})


def describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit {os.WEXITSTATUS(status)}"


def sc_mprotect(s: Scenario) -> None:
    """PROT_READ on the middle part while the reader verifies it, a write
    there kills the writer with SIGSEGV as usual, then back to read-write."""
    addr, size = s.op_span()
    s.expect_ok("mprotect(PROT_READ)", s.libc.mprotect(addr, size, PROT_READ))
    s.bg.wait_sweeps(2)

    def write_read_only():
        s.libc.c.memset(s.addr(s.op[0] + 3), 0x55, 8)
        return {"survived": True}
    status, _ = fork_run(s, write_read_only)
    s.notes["write to read-only part"] = describe_status(status)
    if not (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSEGV):
        s.errors.append("a write to the read-only part should raise SIGSEGV;"
                        f" the writer's child {describe_status(status)}")
    s.bg.wait_sweeps(1)
    s.expect_ok("mprotect(PROT_READ|PROT_WRITE)", s.libc.mprotect(addr, size, PROT_READ | PROT_WRITE))
    s.rewrite_op()
    s.bg.wait_sweeps(1)


def sc_mlock(s: Scenario) -> None:
    """mlock the middle part, write it while locked, munlock."""
    addr, size = s.op_span()
    s.expect_ok("mlock", s.libc.mlock(addr, size))
    s.bg.wait_sweeps(2)
    s.rewrite_op()
    s.bg.wait_sweeps(1)
    s.expect_ok("munlock", s.libc.munlock(addr, size))
    s.bg.wait_sweeps(1)
    s.rewrite_op()


def sc_madvise(s: Scenario) -> None:
    """madvise(--advice, comma-separated, applied in order) on the middle part,
    each advice followed (while still in force) by a sweep and a rewrite of
    the part, twice over for a single advice: the content must
    survive every advice (MADV_DONTNEED on a shared mapping only drops the
    page tables). MADV_FREE is refused (EINVAL) on a shared mapping."""
    addr, size = s.op_span()
    advices = s.args.advice.split(",")
    for rnd in range(2 if len(advices) == 1 else 1):
        for name in advices:
            err = s.libc.madvise(addr, size, MADV[name])
            if name == "FREE":
                accept = (errno.EINVAL,)
            elif name in ("HUGEPAGE", "NOHUGEPAGE"):
                accept = (0, errno.EINVAL)   # EINVAL: kernel without transparent huge pages
            else:
                accept = (0,)
            s.expect_ok(f"madvise(MADV_{name}) round {rnd}", err, accept)
            if name == "DONTFORK":
                # the part is not inherited: a child that never touches it is unaffected
                status, _ = fork_run(s, lambda: {})
                if status != 0:
                    s.errors.append(f"a forked child with MADV_DONTFORK set on part: {describe_status(status)}")
            # the advice stays in force (the mapping split) while the part is read and rewritten
            s.bg.wait_sweeps(1)
            s.rewrite_op()
    s.bg.wait_sweeps(1)


def sc_madvise_remove(s: Scenario) -> None:
    """MADV_REMOVE punches the first half of the operated part out of the
    client's own memory (the README says a client must not: whatever the
    daemon makes of it, the pages not removed stay intact, nothing stalls,
    and the removed range is usable memory again once written)."""
    lo, hi = s.op
    mid = (lo + hi) // 2
    removed = np.arange(lo, mid)
    s.bg.pause_reader()
    s.bg.exclude(removed)          # the reader goes on over the rest of its zone
    s.bg.resume_reader()
    addr, size = s.op_span(lo, mid)
    s.expect_ok("madvise(MADV_REMOVE)", s.libc.madvise(addr, size, MADV["REMOVE"]))
    s.bg.wait_progress(2)
    s.bg.wait_sweeps(2)
    s.step("read the removed pages back")
    got = s.a[removed]
    exp = s.v.expected(removed)
    zero = int((~got.any(axis=1)).sum())
    intact = int((got == exp).all(axis=1).sum())
    s.notes["removed pages read back"] = {"pages": int(removed.size), "zeros": zero, "old content": intact,
                                          "other": int(removed.size) - zero - intact}
    for run in np.array_split(removed, max(1, removed.size // 32)):
        s.v.write(run)
    s.v.check(removed, "removed range written again")
    s.bg.excluded[removed] = False    # the reader takes it over again


def sc_munmap_part(s: Scenario) -> None:
    """munmap the middle part while the writers go on outside it."""
    s.bg.pause_reader()
    s.bg.exclude(s.op_pages)
    addr, size = s.op_span()
    s.expect_ok("munmap(middle part)", s.libc.munmap(addr, size))
    s.bg.resume_reader()           # on over the margins either side of the hole
    s.bg.wait_progress(3)
    s.bg.wait_sweeps(2)


def sc_mremap_shrink(s: Scenario) -> None:
    """mremap shrinks the region's mapping by its last quarter."""
    n = s.a.shape[0]
    tail = np.arange(n - n // 4, n)
    s.bg.exclude(tail)
    new, err = s.libc.mremap(s.region.addr, s.mapped, s.mapped - tail.size * PAGE, 0)
    s.expect_ok("mremap(shrink)", err)
    if err == 0 and new != s.region.addr:
        s.errors.append(f"mremap(shrink) moved the mapping to {new:#x} from {s.region.addr:#x}")
    s.bg.wait_progress(3)


def sc_mremap_grow(s: Scenario) -> None:
    """Two in-place grows (no MREMAP_MAYMOVE), the region staying at its
    address so its data must stay intact:
    - past the region's end by 64 pages, when the address range after it
      happens to be free (else ENOMEM, harmless); the grown part lies past
      the memfd's end and is never touched (SIGBUS), and is shrunk away again;
    - the realloc pattern: shrink the last 64 pages away, then grow back into
      the room that freed. The regrown tail is the region's memory at its
      original address again: reading it must not hang (what it holds is
      reported in the notes), and once rewritten it must hold what was written."""
    extra = GROW_PAGES * PAGE
    end = s.region.addr + s.mapped
    room = s.libc.mmap_reserve(extra, end)      # probe: is the range after the region free?
    s.notes["room after the region"] = room is not None
    if room is not None:
        s.libc.munmap(room, extra)
    new, err = s.libc.mremap(s.region.addr, s.mapped, s.mapped + extra, 0)
    s.expect_ok("mremap(grow past the end)", err, (0,) if room is not None else (0, errno.ENOMEM))
    if err == 0:
        s.bg.wait_progress(3)
        s.bg.wait_sweeps(1)
        _, err = s.libc.mremap(s.region.addr, s.mapped + extra, s.mapped, 0)
        s.expect_ok("mremap(shrink back to the region's size)", err)

    n = s.a.shape[0]
    tail = np.arange(n - GROW_PAGES, n)
    s.bg.exclude(tail)
    _, err = s.libc.mremap(s.region.addr, s.mapped, s.mapped - extra, 0)
    s.expect_ok("mremap(shrink by the tail)", err)
    s.bg.wait_progress(3)
    new, err = s.libc.mremap(s.region.addr, s.mapped - extra, s.mapped, 0)
    s.expect_ok("mremap(grow the tail back in place)", err)
    if err == 0 and new != s.region.addr:
        s.errors.append(f"mremap(grow in place) moved the mapping to {new:#x} from {s.region.addr:#x}")
    if err == 0:
        s.step("read the regrown tail")
        got = s.a[tail]
        exp = s.v.expected(tail)
        s.notes["regrown tail read back"] = {"pages": int(tail.size), "intact": int((got == exp).all(axis=1).sum()),
                                             "zeros": int((~got.any(axis=1)).sum())}
        s.step("rewrite the regrown tail")
        s.v.write(tail)
        s.v.check(tail, "regrown tail rewritten")
        s.bg.excluded[tail] = False   # the writers take it over again
    s.bg.wait_progress(3)
    s.rewrite_op()


def sc_mremap_move(s: Scenario) -> None:
    """mremap moves the middle part elsewhere (MREMAP_MAYMOVE|MREMAP_FIXED).
    The region is registered with the daemon at its original address: the
    rest of it must stay intact and served. What the moved part then holds
    is not promised (it is no longer at the address uswap manages); reading
    it must not hang, and what it held is reported in the notes."""
    addr, size = s.op_span()
    target = s.libc.mmap_reserve(size)
    if target is None:
        s.errors.append("could not reserve an address range to move to")
        return
    s.bg.pause_reader()
    s.bg.exclude(s.op_pages)
    new, err = s.libc.mremap(addr, size, size, MREMAP_MAYMOVE | MREMAP_FIXED, target)
    s.expect_ok("mremap(move middle part)", err)
    s.bg.resume_reader()           # on over the margins either side of the hole
    s.bg.wait_progress(3)
    s.bg.wait_sweeps(2)
    if err == 0:
        s.step("read the moved part")
        moved = np.ctypeslib.as_array((ctypes.c_uint64 * (size // 8)).from_address(new)).reshape(-1, WORDS)
        got = moved.copy()
        exp = s.v.expected(s.op_pages)
        s.notes["moved part read back"] = {"pages": int(s.op_pages.size),
                                           "intact": int((got == exp).all(axis=1).sum()),
                                           "zeros": int((~got.any(axis=1)).sum())}
        del moved
        s.expect_ok("munmap(moved part)", s.libc.munmap(new, size))
    s.bg.wait_progress(2)


def sc_fork_reads(s: Scenario) -> None:
    """A forked child reads every 8th page of the region and exits; it must
    see the parent's data (never zeros), and the parent's data must be
    unchanged by it."""
    floor = s.v.gen_floor()

    def child():
        pages = np.arange(0, s.a.shape[0], 8)
        count, wrong = s.v.check_at_least(pages, floor, "forked child reading every 8th page")
        return {"wrong": wrong, "count": count}
    status, result = fork_run(s, child)
    s.notes["child"] = describe_status(status)
    s.errors += [f"child: {w}" for w in result.get("wrong", [])]
    if result.get("count"):
        s.errors.append(f"the child read {result['count']} wrong pages of {s.a.shape[0] // 8}")
    if "exception" in result:
        s.errors.append(f"child raised: {result['exception']}")
    elif status != 0 and not result.get("wrong"):
        s.errors.append(f"forked child {describe_status(status)}")
    s.bg.wait_sweeps(2)


def sc_fork_writes(s: Scenario) -> None:
    """A forked child connects to the daemon itself, writes its own region
    with its own pattern and verifies it, while the parent's threads go on;
    the parent's data must be unchanged afterwards."""
    def child():
        with uswap.connect(s.args.socket) as c:
            r = c.alloc(128 * PAGE)
            a = np.frombuffer(r.buf, np.uint64).reshape(-1, WORDS)
            v = Verifier(a, TAG_CHILD)
            pages = np.arange(a.shape[0])
            for _ in range(3):
                v.write(pages)
                v.check(pages, "forked child's own region")
            wrong = v.wrong
            del a, v
            r.close()
        return {"wrong": wrong}
    status, result = fork_run(s, child)
    s.notes["child"] = describe_status(status)
    s.errors += [f"child: {w}" for w in result.get("wrong", [])]
    if "exception" in result:
        s.errors.append(f"child raised: {result['exception']}")
    elif status != 0:
        s.errors.append(f"forked child {describe_status(status)}")
    s.bg.wait_sweeps(2)


def sc_fork_killed(s: Scenario) -> None:
    """A forked child reads the operated part over and over; once it has read
    a few dozen pages it is SIGKILLed mid-read. The parent's data must be
    unchanged."""
    rfd, wfd = os.pipe()
    lo, hi = s.op
    floor = s.v.gen_floor()
    pid = os.fork()
    if pid == 0:
        os.close(rfd)
        while True:
            for p in range(lo, hi, 4):
                count, _ = s.v.check_at_least(np.arange(p, min(p + 4, hi)), floor, "child")
                os.write(wfd, b"x" if count else b".")
    os.close(wfd)
    seen = b""
    deadline = time.monotonic() + PROGRESS_DEADLINE
    while len(seen) < 16:
        ready, _, _ = select.select([rfd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            waits = thread_waits(pid)
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(rfd)
            raise Stall(f"forked reader {pid} read {len(seen) * 4} pages, then no progress within "
                        f"{PROGRESS_DEADLINE}s: threads {waits}")
        chunk = os.read(rfd, 4096)
        if not chunk:
            break
        seen += chunk
    os.kill(pid, signal.SIGKILL)
    status = s.wait_child(pid)
    os.close(rfd)
    s.notes["child"] = f"read {len(seen) * 4} pages, then {describe_status(status)}"
    if b"x" in seen:
        s.errors.append(f"the forked child read wrong data in {seen.count(b'x')} of its 4-page runs")
    if not (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL):
        s.errors.append(f"the forked reader should have died of SIGKILL; it {describe_status(status)}")
    s.bg.wait_sweeps(2)


_MP: dict = {}


def _mp_check(span: tuple[int, int]) -> tuple[int, list[str]]:
    """Runs in a multiprocessing worker forked from the scenario process."""
    v, floor = _MP["v"], _MP["floor"]
    return v.check_at_least(np.arange(*span), floor, f"worker {os.getpid()} pages {span[0]}..{span[1] - 1}")


def sc_multiprocessing(s: Scenario) -> None:
    """A multiprocessing pool (fork start method) checks the whole region in
    slices; the parent's data must be unchanged afterwards."""
    _MP.update(v=s.v, floor=s.v.gen_floor())
    n = s.a.shape[0]
    spans = [(lo, min(lo + 128, n)) for lo in range(0, n, 128)]
    ctx = multiprocessing.get_context("fork")
    pool = ctx.Pool(2)
    try:
        results = pool.map_async(_mp_check, spans).get(timeout=PROGRESS_DEADLINE)
    except multiprocessing.TimeoutError:
        waits = {p.pid: thread_waits(p.pid) for p in pool._pool}
        pool.terminate()
        raise Stall(f"multiprocessing workers did not finish within {PROGRESS_DEADLINE}s: {waits}") from None
    pool.close()
    workers = list(pool._pool)
    deadline = time.monotonic() + PROGRESS_DEADLINE
    while any(p.exitcode is None for p in workers) and time.monotonic() < deadline:
        time.sleep(0.01)
    stuck = [p.pid for p in workers if p.exitcode is None]
    pool.terminate()
    if stuck:
        s.errors.append(f"multiprocessing workers {stuck} did not exit after close()")
    described = [w for _, wrong in results for w in wrong]
    total = sum(count for count, _ in results)
    s.errors += [f"multiprocessing: {w}" for w in described[:MAX_DESCRIBED]]
    if total:
        s.errors.append(f"multiprocessing: the workers found {total} wrong pages in all")
    s.notes["worker exit codes"] = [p.exitcode for p in workers]
    s.bg.wait_sweeps(2)


EXEC_CHILD = """
import sys, numpy as np, uswap
from tests.realproc_child import Verifier, TAG_CHILD, WORDS
with uswap.connect(sys.argv[1]) as c:
    r = c.alloc(64 * 4096)
    a = np.frombuffer(r.buf, np.uint64).reshape(-1, WORDS)
    v = Verifier(a, TAG_CHILD)
    p = np.arange(a.shape[0])
    v.write(p); v.check(p, "exec child"); v.write(p); v.check(p, "exec child")
    print(v.wrong or "ok")
    del a, v
    r.close()
"""


def sc_subprocess(s: Scenario) -> None:
    """fork+exec children (subprocess) while the threads go on: a shell
    command, and a Python program that is a uswap client of its own."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for i in range(3):
        for argv in (["true"], [sys.executable, "-c", EXEC_CHILD, s.args.socket]):
            try:
                out = subprocess.run(argv, capture_output=True, text=True, timeout=PROGRESS_DEADLINE, cwd=repo)
            except subprocess.TimeoutExpired:
                raise Stall(f"exec child {argv[:2]} did not finish within {PROGRESS_DEADLINE}s") from None
            if out.returncode != 0 or (len(argv) > 1 and out.stdout.strip() != "ok"):
                s.errors.append(f"exec child {argv[:2]} round {i}: exit {out.returncode}: "
                                f"{out.stdout.strip()[-500:]} {out.stderr.strip()[-1500:]}")
        s.bg.wait_progress(2)
    s.bg.wait_sweeps(1)


def sc_odirect(s: Scenario) -> None:
    """O_DIRECT reads (os.preadv) from a file on the root filesystem into the
    operated part, six rounds alternating the file's two versions; with
    --lock the part is mlocked for the duration (the documented rule for I/O
    into region memory). Without it the kernel still pins the pages for the
    read, and the expectation is the same: once preadv returns, the region
    holds the file's bytes. A page dropped from the memfd while pinned would
    lose the data the device wrote into it: the page would read stale."""
    lo, hi = s.op
    addr, size = s.op_span()
    k = s.args.file_pages
    if hi - lo > k:
        s.errors.append(f"operated part of {hi - lo} pages is larger than the file version of {k}")
        return
    fd = os.open(s.args.direct_file, os.O_RDONLY | os.O_DIRECT)
    try:
        if s.args.lock:
            s.expect_ok("mlock", s.libc.mlock(addr, size))
        for rnd in range(6):
            version = 1 + rnd % 2
            s.bg.pause_reader()
            s.step(f"O_DIRECT preadv round {rnd} into pages {lo}..{hi - 1}")
            view = s.region.buf[lo * PAGE:hi * PAGE]
            try:
                got = os.preadv(fd, [view], (version - 1) * k * PAGE)
            finally:
                view.release()
            if got != size:
                s.errors.append(f"O_DIRECT read round {rnd}: {got} bytes of {size}")
            s.v.tag[lo:hi] = TAG_FILE
            s.v.ident[lo:hi] = np.arange(hi - lo)
            s.v.gen[lo:hi] = version
            s.v.check(s.op_pages, f"O_DIRECT read round {rnd} (file version {version})")
            s.bg.resume_reader()
            s.bg.wait_progress(2)
        if s.args.lock:
            s.expect_ok("munlock", s.libc.munlock(addr, size))
    finally:
        os.close(fd)
    s.bg.pause_reader()
    s.v.tag[lo:hi] = TAG_SCENARIO
    s.v.ident[lo:hi] = s.op_pages
    s.bg.resume_reader()
    s.rewrite_op()


SCENARIOS = {
    "mprotect": sc_mprotect,
    "mlock": sc_mlock,
    "madvise": sc_madvise,
    "madvise_remove": sc_madvise_remove,
    "munmap_part": sc_munmap_part,
    "mremap_shrink": sc_mremap_shrink,
    "mremap_grow": sc_mremap_grow,
    "mremap_move": sc_mremap_move,
    "fork_reads": sc_fork_reads,
    "fork_writes": sc_fork_writes,
    "fork_killed": sc_fork_killed,
    "multiprocessing": sc_multiprocessing,
    "subprocess": sc_subprocess,
    "odirect": sc_odirect,
}


# ---------------------------------------------------------------- main programs

def fill(v: Verifier) -> None:
    """First generation of every page, in runs (most of it gets evicted)."""
    pages = np.arange(v.a.shape[0])
    for run in np.array_split(pages, max(1, pages.size // 64)):
        v.write(run)


def run_steady(args) -> int:
    """The well-behaved client: verify-then-rewrite passes until "stop"."""
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
    with uswap.connect(args.socket) as client:
        region = client.alloc(args.pages * PAGE)
        a = np.frombuffer(region.buf, np.uint64).reshape(-1, WORDS)
        v = Verifier(a, TAG_STEADY)
        fill(v)
        emit({"region": region.id, "pages": args.pages})
        passes = 0
        runs = np.array_split(np.arange(args.pages), max(1, args.pages // 32))
        while not stop.is_set():
            for run in runs:
                v.check(run, f"steady pass {passes + 1}")
                v.write(run)
            passes += 1
            emit({"pass": passes, "wrong_pages": v.wrong_pages})
        v.check(np.arange(args.pages), "steady final check")
        emit({"done": True, "passes": passes, "wrong_pages": v.wrong_pages, "wrong": v.wrong})
        ok = v.wrong_pages == 0
        del a, v
        region.close()
    return 0 if ok else 1


GROW_PAGES = 64  # mremap_grow: pages the mapping grows by


def run_scenario(args) -> int:
    client = uswap.connect(args.socket)
    region = client.alloc(args.pages * PAGE)
    a = np.frombuffer(region.buf, np.uint64).reshape(-1, WORDS)
    v = Verifier(a, TAG_SCENARIO)
    fill(v)
    lo, hi = (int(x) for x in args.op.split(":"))
    emit({"region": region.id, "pages": args.pages, "op": [lo, hi]})
    bg = Background(v, zone_of((lo, hi), args.pages))
    s = Scenario(args, client, region, a, v, bg, (lo, hi))
    verdict: dict = {"scenario": args.role, "stall": None, "errors": s.errors, "notes": s.notes}
    start_watchdog(WATCHDOG)
    try:
        bg.start()
        bg.wait_progress(2)
        bg.wait_sweeps(1)
        emit({"phase": "call"})
        SCENARIOS[args.role](s)
        emit({"phase": "after call"})
        bg.wait_progress(2)
        bg.finish()
        emit({"phase": "final check"})
        final = np.flatnonzero(~bg.excluded)
        for run in np.array_split(final, max(1, final.size // 64)):
            v.check(run, "final check")
            _last["beat"] = time.monotonic()
    except Stall as e:
        verdict["stall"] = str(e)
    except Exception:
        s.errors.append(f"scenario raised: {traceback.format_exc(limit=5)}")
        try:
            bg.finish()
        except Stall as e:
            verdict["stall"] = str(e)
    s.errors += bg.errors
    verdict.update(wrong_pages=v.wrong_pages, wrong=v.wrong)
    verdict["ok"] = not (verdict["stall"] or s.errors or v.wrong_pages)
    _last["done"] = True
    emit({"verdict": verdict})
    if verdict["stall"]:
        os._exit(2)  # threads are stuck in the region: no orderly close is possible
    del a, s, bg
    v.a = None
    try:
        region.close()
        client.close()
        emit({"closed": True})
    except BaseException as e:
        emit({"close_failed": repr(e)})
        os._exit(3)
    return 0 if verdict["ok"] else 1


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--socket", required=True)
    ap.add_argument("--role", required=True, choices=["steady", *SCENARIOS])
    ap.add_argument("--pages", type=int, default=1024)
    ap.add_argument("--op", default="256:512", help="the operated part, pages LO:HI")
    ap.add_argument("--advice", default="DONTNEED", help="madvise: advices applied in order, e.g. SEQUENTIAL,RANDOM")
    ap.add_argument("--direct-file", help="odirect: the file to read with O_DIRECT")
    ap.add_argument("--file-pages", type=int, default=0, help="odirect: pages per version in the file")
    ap.add_argument("--lock", action="store_true", help="odirect: mlock the part for the reads")
    args = ap.parse_args()
    if args.role == "steady":
        return run_steady(args)
    return run_scenario(args)


if __name__ == "__main__":
    sys.exit(main())
