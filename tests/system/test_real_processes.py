"""Adversarial real processes (issue 8): every call a process may make on its
own region, made on PART of the region (splitting its mapping) while threads
of the same process keep touching the rest, under a budget a quarter of the
region's size so reclaim evicts all the time, and while a second,
well-behaved client rewrites and verifies its own region pass after pass.

The calls: mprotect, mlock, madvise of every kind, MADV_REMOVE, munmap of a
part, mremap (shrink, grow in place, move a part), fork (a child that reads,
one that writes its own region, one killed mid-read, a multiprocessing pool
with the fork start method, fork+exec children), and O_DIRECT reads into the
region with and without mlock. The programs are tests/realproc_child.py.

Verdicts, for every case:
- zero wrong bytes anywhere: the case's process verifies every byte it owns
  (a wrong page is reported with its index, the expected and the found word:
  zeros, stale generation, another page's data), and so does the second client;
- no client ever stalls: every wait has a deadline, and a stall names the
  thread and its kernel wait channel;
- the daemon keeps serving: it is alive, answers status with its accounting
  balanced (audit), releases both regions, logs no Traceback, and drains and
  exits 0 on SIGTERM.

Expected behaviour where a program does something uswap cannot follow:
- O_DIRECT into a part that is not mlocked breaks the README's rule for I/O
  into region memory: what that process sees of its region is only printed;
  everyone else is held to every verdict.
- MADV_REMOVE (the README says a client must not): the pages not removed stay
  intact, nothing stalls, the removed range is usable memory once rewritten.
- mremap moving a part: the region is registered at its original address;
  the rest stays intact and served; what the moved part holds is only
  reported (the case's notes), but reading it must not hang.
- A forked child shares the region (MAP_SHARED): it must read the parent's
  data, never zeros, and its reads must not change the parent's data. "The
  child writes its own pattern" is a child that connects to the daemon and
  writes a region of its own (writes into the shared region would change the
  parent's data by definition of MAP_SHARED).
- munmap or mremap-shrink of a part: the rest of the region stays intact and
  served (no stall); the unmapped pages are never touched again.
- The regrown tail after a shrink-and-grow-back (the realloc pattern): reading
  it must not hang; once rewritten it holds what was written.

How the case's process keeps the region busy (tests/realproc_child.py): a
reader owns the operated part plus 32 pages either side and sweeps them in
order, so its fault stream and the daemon's read-ahead cross the boundaries
the call creates in the mapping; two writers rewrite random runs of the other
pages; a sweeper reads those in order. A main thread silent for 30 s (stuck
in a fault) ends the process with a stall verdict naming every thread's
kernel wait channel.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

from tests.harness import Workload, assert_audit, status, wait_clean, wait_for
from tests.realproc_child import PAGE, TAG_FILE, encode, thread_waits

SCENARIO_PAGES = 1024       # 4 MiB region for the case's process
STEADY_PAGES = 512          # 2 MiB for the well-behaved second client
BUDGET = "1M"               # 256 pages: a sixth of what the two clients use
VERDICT_TIMEOUT = 75.0      # the child's own deadlines (20 s per wait) come first
ODIRECT_FILE_PAGES = 384


class Child(Workload):
    """A tests.realproc_child process, read with deadlines like a Workload."""

    def __init__(self, socket: str, role: str, *args: str) -> None:
        self.role = role
        self._spawn([sys.executable, "-m", "tests.realproc_child", "--socket", socket, "--role", role, *args])

    def stall_report(self) -> str:
        """Where each thread of a child that stopped answering is waiting."""
        waits = thread_waits(self.pid)
        return "; ".join(f"tid {t}: {w}" for t, w in sorted(waits.items())) or "(no threads: exited)"

    def wait_for_line(self, key: str, timeout: float) -> dict | str:
        """The first line carrying `key`, or a description of why none came."""
        try:
            return self.wait_line(lambda x: key in x, timeout)
        except AssertionError as e:
            stuck = self.stall_report() if self.poll() is None else "exited"
            return f"{self.role} (pid {self.pid}) gave no '{key}' line: {e}; threads: {stuck}"


def daemon_problems(d, pids: set[int]) -> list[str]:
    """The daemon is alive, answers, releases the regions of `pids` and
    keeps its accounting exact."""
    if d.proc.poll() is not None:
        return [f"daemon exited with {d.proc.returncode}"]
    try:
        wait_for("the exited clients' regions released",
                 lambda: (lambda st: st if not pids & {c["pid"] for c in st["clients"]} and st["audit"] is not None
                          else None)(status(d)), timeout=30)
        assert_audit(status(d))
    except (AssertionError, OSError) as e:
        return [f"daemon: {e}"]
    return []


def log_excerpt(d) -> str:
    """The daemon's region closes, and its first and last warnings and errors."""
    lines = d.log_text().splitlines()
    closes = [ln for ln in lines if " closing (" in ln]
    alarms = [ln for ln in lines if "WARNING" in ln or "ERROR" in ln or "Traceback" in ln]
    if len(alarms) > 20:
        alarms = alarms[:10] + [f"... {len(alarms) - 20} more warnings/errors ..."] + alarms[-10:]
    return "\n".join(closes + alarms)


def run_case(d, role: str, *args: str, breaks_rule: bool = False) -> dict:
    """Run one case next to the well-behaved client; fail with every problem
    seen (the case's verdict, the second client's, the daemon's).

    breaks_rule: the case does what the README's limits forbid, so what it
    sees of its own region is not asserted (it is printed); the second
    client and the daemon are held to every verdict all the same."""
    problems: list[str] = []
    own: list[str] = []  # the case's own problems when it breaks a rule
    steady = Child(d.socket, "steady", "--pages", str(STEADY_PAGES))
    case = None
    verdict: dict = {}
    try:
        first = steady.wait_for_line("pass", 60)
        if isinstance(first, str):
            raise AssertionError(first)
        case = Child(d.socket, role, "--pages", str(SCENARIO_PAGES), *args)
        got = case.wait_for_line("verdict", VERDICT_TIMEOUT)
        mine = own if breaks_rule else problems
        if isinstance(got, str):
            mine.append(f"case stalled or died: {got}")
        else:
            verdict = got["verdict"]
            if verdict["stall"]:
                mine.append(f"case stalled: {verdict['stall']}")
            mine += [f"case: {e}" for e in verdict["errors"]]
            if verdict["wrong_pages"]:
                mine.append(f"case: {verdict['wrong_pages']} wrong pages:\n    " + "\n    ".join(verdict["wrong"]))
            try:
                case.finish(30)
                if case.proc.returncode not in (0, 1) and not verdict["stall"]:  # 2: stalled, said above
                    mine.append(f"case exited {case.proc.returncode} after its verdict: {case.lines[-1:]}"
                                    f" {case.proc.stderr.read()[-1500:]}")
            except AssertionError as e:
                mine.append(f"case did not exit after its verdict (closing its region stalled?): {e}")
        # The second client must go on: one more whole pass after the case, then its final check.
        passes = max(line.get("pass", 0) for line in steady.lines)
        more = steady.wait_for_line("pass", 60) if steady.poll() is None else "exited"
        while isinstance(more, dict) and more["pass"] <= passes:
            more = steady.wait_for_line("pass", 60)
        if isinstance(more, str):
            problems.append(f"second client stalled after the case: {more}")
        else:
            steady.send("stop\n")
            done = steady.wait_for_line("done", 60)
            if isinstance(done, str):
                problems.append(f"second client's final check: {done}")
            elif done["wrong_pages"]:
                problems.append(f"second client: {done['wrong_pages']} wrong pages:\n    "
                                + "\n    ".join(done["wrong"]))
            try:
                steady.finish(30)
            except AssertionError as e:
                problems.append(f"second client did not exit: {e}")
    finally:
        for p in (steady, case):
            if p is not None:
                p.kill()
    pids = {steady.pid} | ({case.pid} if case else set())
    problems += daemon_problems(d, pids)
    if d.proc.poll() is None and not problems:
        try:
            wait_clean(d)
        except AssertionError as e:
            problems.append(f"daemon not clean after both clients left: {e}")
    log = d.log_text()
    if "Traceback" in log:
        problems.append("daemon log has a Traceback")
    if d.proc.poll() is None:
        try:
            rc = d.stop(timeout=30)
            if rc != 0:
                problems.append(f"daemon drain exited {rc}")
        except Exception as e:  # noqa: BLE001 - any failure to drain is the verdict
            problems.append(f"daemon did not drain on SIGTERM: {e!r}")
    if own:
        print(f"{role} broke a documented rule; what it saw of its own region:\n  " + "\n  ".join(own))
    assert not problems, (f"{role} {' '.join(args)}:\n  " + "\n  ".join(problems)
                          + f"\nnotes: {json.dumps(verdict.get('notes'))}\ndaemon log:\n{log_excerpt(d)}")
    return verdict


@pytest.fixture
def daemon(start_daemon, file_backing):
    """A daemon on the file store with a budget a sixth of what the clients use."""
    return start_daemon(file_backing, store_size="64M", max_resident=BUDGET)


# ---------------------------------------------------------------- protection, locking

def test_mprotect_read_only_part(daemon):
    run_case(daemon, "mprotect")


def test_mlock_part(daemon):
    """128 pages locked: half the budget. (Locking the whole budget, 256
    pages, leaves every other fault of both clients to evict the page it just
    brought in: it completes, but at ~50 swap-ins a second, a thrash this
    test is not about; see the closing note of issue 8.)"""
    run_case(daemon, "mlock", "--op", "256:384")


# ---------------------------------------------------------------- madvise

MADVICE_CASES = ["DONTNEED", "FREE", "COLD", "PAGEOUT", "WILLNEED", "SEQUENTIAL,RANDOM,NORMAL",
                 "HUGEPAGE,NOHUGEPAGE", "DONTFORK,DOFORK", "DONTDUMP,DODUMP", "POPULATE_READ", "POPULATE_WRITE"]


@pytest.mark.parametrize("advice", MADVICE_CASES)
def test_madvise_part(daemon, advice):
    run_case(daemon, "madvise", "--advice", advice)


def test_madvise_remove_part(daemon):
    verdict = run_case(daemon, "madvise_remove")
    assert "removed pages read back" in verdict["notes"], verdict


# ---------------------------------------------------------------- unmapping, remapping

def test_munmap_part(daemon):
    run_case(daemon, "munmap_part")


def test_mremap_shrink(daemon):
    run_case(daemon, "mremap_shrink")


def test_mremap_grow_in_place(daemon):
    verdict = run_case(daemon, "mremap_grow")
    assert "regrown tail read back" in verdict["notes"], verdict


def test_mremap_move_part(daemon):
    verdict = run_case(daemon, "mremap_move")
    assert "moved part read back" in verdict["notes"], verdict


# ---------------------------------------------------------------- fork, exec

def test_fork_child_reads(start_daemon, backing):
    """The child's faults are served from the store: both stores."""
    d = start_daemon(backing, store_size="64M", max_resident=BUDGET)
    run_case(d, "fork_reads")


def test_fork_child_writes_its_own_region(daemon):
    run_case(daemon, "fork_writes")


def test_fork_child_killed_mid_read(daemon):
    run_case(daemon, "fork_killed")


def test_multiprocessing_fork_pool(daemon):
    run_case(daemon, "multiprocessing")


def test_subprocess_exec_children(daemon):
    run_case(daemon, "subprocess")


# ---------------------------------------------------------------- O_DIRECT into the region

@pytest.fixture
def direct_file(tmp_path):
    """Two versions of ODIRECT_FILE_PAGES pages on the root filesystem (ext4,
    which honours O_DIRECT): page i of version v is encode(TAG_FILE, i, v)."""
    path = tmp_path / "direct-source"
    ids = np.arange(ODIRECT_FILE_PAGES)
    with open(path, "wb") as f:
        for version in (1, 2):
            f.write(encode(np.full(ids.size, TAG_FILE), ids, np.full(ids.size, version)).tobytes())
        f.flush()
        os.fsync(f.fileno())
    assert os.path.getsize(path) == 2 * ODIRECT_FILE_PAGES * PAGE
    return str(path)


def test_odirect_read_into_mlocked_part(daemon, direct_file):
    """The documented rule: mlock region memory for the duration of I/O into it.
    128 pages: half the budget."""
    run_case(daemon, "odirect", "--op", "256:384", "--lock",
             "--direct-file", direct_file, "--file-pages", str(ODIRECT_FILE_PAGES))


def test_odirect_read_into_unlocked_part(start_daemon, backing, direct_file):
    """No mlock: each read pins 384 pages, more than the whole budget, so
    reclaim meets pages that are pinned for the read. Userspace cannot see a
    pin, so the README's rule is that such a buffer must be mlocked for the
    I/O; a client that breaks it may lose the read's data or wait for ever on
    a page whose store copy changed under the write (it is only printed
    here). What is asserted is that it harms no one else: the second client
    verifies every byte and never stalls, and the daemon stays balanced,
    serving and drains. The store's write latency decides how long a page
    stays in writeback: both stores."""
    d = start_daemon(backing, store_size="64M", max_resident=BUDGET)
    run_case(d, "odirect", "--op", f"256:{256 + ODIRECT_FILE_PAGES}",
             "--direct-file", direct_file, "--file-pages", str(ODIRECT_FILE_PAGES), breaks_rule=True)
