"""Issue 8 item 1: a forked child sees its regions as they were at fork, writes
stay on their side, and nothing the child does changes the parent's data.

Each test runs one scenario of this module as its own client process
(`python -m tests.daemon.test_fork SCENARIO SOCKET`), against a real daemon; the
scenario forks, checks every page on each side and prints one JSON line.
Parent and child synchronise through pipes, never by sleeping.
"""
from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np

from tests.harness import run_scenario, scenario_main, wait_forks_released
from uswap import protocol

PAGE_WORDS = 512


# ---------------------------------------------------------------- scenario side (client process)

def _pages(region) -> np.ndarray:
    return np.frombuffer(region.buf, np.uint64).reshape(-1, PAGE_WORDS)


def _value(npages: int, salt: int) -> np.ndarray:
    """The word that fills page i in a fill with `salt` (never zero)."""
    return np.arange(npages, dtype=np.uint64) * np.uint64(1_000_003) + np.uint64(salt)


def _fill(pages: np.ndarray, salt: int, which: np.ndarray | None = None) -> None:
    which = np.arange(len(pages)) if which is None else which
    pages[which] = _value(len(pages), salt)[which][:, None]


def _bad_pages(pages: np.ndarray, expected: np.ndarray) -> int:
    """Pages with any word different from the page's expected value."""
    bad = 0
    for lo in range(0, len(pages), 4096):
        chunk = pages[lo:lo + 4096]
        bad += int(np.count_nonzero((chunk != expected[lo:lo + 4096, None]).any(axis=1)))
    return bad


def _wait(pid: int) -> int:
    """The child's exit code, or -signal."""
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _say(fd: int, text: bytes = b"x") -> None:
    os.write(fd, text)


def _hear(fd: int) -> bytes:
    got = os.read(fd, 1)
    if not got:
        raise EOFError("the other side closed its pipe")
    return got


def scenario_issue(c, size: int) -> dict:
    """The issue's reproduction: the child reads one word of every 8th page."""
    region = c.alloc(size)
    pages = _pages(region)
    _fill(pages, 1)
    expected = _value(len(pages), 1)
    pid = os.fork()
    if pid == 0:
        seen = pages[::8, 0].copy()
        bad = np.flatnonzero(seen != expected[::8])
        if len(bad):
            sys.stderr.write(f"child: {len(bad)} bad of {len(seen)}: pages {(bad[:10] * 8).tolist()}"
                             f" saw {seen[bad[:10]].tolist()} want {expected[::8][bad[:10]].tolist()}\n")
        del pages
        c.close()  # the child's region and connection, freed by request
        os._exit(1 if len(bad) else 0)
    child = _wait(pid)
    return {"child": child, "parent_bad": _bad_pages(pages, expected)}


def scenario_private(c, size: int) -> dict:
    """Writes after the fork stay on their side, both ways."""
    region = c.alloc(size)
    pages = _pages(region)
    n = len(pages)
    _fill(pages, 1)
    p2c_r, p2c_w = os.pipe()
    c2p_r, c2p_w = os.pipe()
    even, third = np.arange(0, n, 2), np.arange(0, n, 3)
    pid = os.fork()
    if pid == 0:
        ok = _bad_pages(pages, _value(n, 1)) == 0
        _fill(pages, 2, even)                       # child writes B on even pages
        _say(c2p_w)
        _hear(p2c_r)                                # the parent has written C on every 3rd page
        want = _value(n, 1)
        want[even] = _value(n, 2)[even]
        ok = ok and _bad_pages(pages, want) == 0
        os._exit(0 if ok else 1)
    _hear(c2p_r)
    parent_bad_after_child_write = _bad_pages(pages, _value(n, 1))
    _fill(pages, 3, third)                          # parent writes C on every 3rd page
    _say(p2c_w)
    child = _wait(pid)
    want = _value(n, 1)
    want[third] = _value(n, 3)[third]
    return {"child": child, "parent_bad_after_child_write": parent_bad_after_child_write,
            "parent_bad": _bad_pages(pages, want)}


def scenario_killed(c, size: int) -> dict:
    """A child killed while it writes every page changes nothing in the parent."""
    region = c.alloc(size)
    pages = _pages(region)
    n = len(pages)
    _fill(pages, 1)
    c2p_r, c2p_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        salt = 2
        while True:
            for lo in range(0, n, 1024):
                _fill(pages, salt, np.arange(lo, min(n, lo + 1024)))
                if lo == n // 2 and salt == 2:
                    _say(c2p_w)                     # half of the pages written once: kill me
            salt += 1
    _hear(c2p_r)
    os.kill(pid, signal.SIGKILL)
    child = _wait(pid)
    return {"child": child, "parent_bad": _bad_pages(pages, _value(n, 1))}


def scenario_exits(c, size: int) -> dict:
    """A child that exits at once: the parent then rewrites everything, and
    no page is copied for a child that is gone."""
    region = c.alloc(size)
    pages = _pages(region)
    n = len(pages)
    _fill(pages, 1)
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    child = _wait(pid)
    bad_before = _bad_pages(pages, _value(n, 1))
    deadline = time.monotonic() + 30
    while c.status()["fork"]["fork_pending"] or len(c.status()["clients"]) > 1:
        if time.monotonic() > deadline:
            raise AssertionError(f"the exited child's snapshot is still held: {c.status()['fork']}")
        time.sleep(0.01)  # polling a condition with a deadline
    # Copies made at the fork itself (a page whose zero fill or load was in
    # flight then is copied for the child) are not what this measures.
    copied_at_fork = c.status()["fork"]["fork_copied_pages_total"]
    _fill(pages, 2)
    return {"child": child, "parent_bad_before": bad_before, "parent_bad": _bad_pages(pages, _value(n, 2)),
            "copied": c.status()["fork"]["fork_copied_pages_total"] - copied_at_fork}


_mp_pages = None


def _mp_sum(bounds: tuple[int, int]) -> int:
    lo, hi = bounds
    return int(_mp_pages[lo:hi].sum(dtype=np.uint64))


def scenario_multiprocessing(c, size: int) -> dict:
    """multiprocessing with the fork start method reads the data in workers."""
    import multiprocessing
    global _mp_pages
    region = c.alloc(size)
    _mp_pages = _pages(region)
    n = len(_mp_pages)
    _fill(_mp_pages, 5)
    chunks = [(lo, min(n, lo + n // 8)) for lo in range(0, n, n // 8)]
    with multiprocessing.get_context("fork").Pool(2) as pool:
        got = pool.map(_mp_sum, chunks)
    want = [int((_value(n, 5)[lo:hi] * np.uint64(PAGE_WORDS)).sum(dtype=np.uint64)) for lo, hi in chunks]
    return {"sums_equal": got == want, "parent_bad": _bad_pages(_mp_pages, _value(n, 5))}


def scenario_exec(c, size: int) -> dict:
    """Children not forked by os.fork have no mapping of the region; a child
    that execs after os.fork costs no page copy."""
    region = c.alloc(size)
    pages = _pages(region)
    n = len(pages)
    _fill(pages, 1)
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    spawned = os.posix_spawn(sys.executable, [sys.executable, "-c", "pass"], os.environ)
    spawn_exit = _wait(spawned)
    forks_after_subprocess = c.status()["fork"]["forks_total"]
    # A fork below Python (libc's fork, as C libraries do): no hooks run, and
    # the region is not mapped in the child, so its touch faults there and
    # can never reach the parent's memory.
    libc = ctypes.CDLL(None, use_errno=True)
    pid = libc.fork()
    if pid == 0:
        ctypes.string_at(region.addr + 8 * 4096, 8)
        os._exit(0)
    raw_child = _wait(pid)
    pid = os.fork()
    if pid == 0:
        os.execv(sys.executable, [sys.executable, "-c", "pass"])
    exec_child = _wait(pid)
    deadline = time.monotonic() + 30
    while c.status()["fork"]["fork_pending"] or len(c.status()["clients"]) > 1:
        if time.monotonic() > deadline:
            raise AssertionError(f"the exec'd child's snapshot is still held: {c.status()['fork']}")
        time.sleep(0.01)  # polling a condition with a deadline
    fork = c.status()["fork"]
    return {"spawn_exit": spawn_exit, "forks_after_subprocess": forks_after_subprocess,
            "raw_child": raw_child, "exec_child": exec_child, "fork": fork,
            "parent_bad": _bad_pages(pages, _value(n, 1))}


def scenario_nested(c, size: int) -> dict:
    """A child forks a grandchild: each of the three sees its own data."""
    region = c.alloc(size)
    pages = _pages(region)
    n = len(pages)
    _fill(pages, 1)
    fourth, odd, fifth = np.arange(0, n, 4), np.arange(1, n, 2), np.arange(0, n, 5)
    c2p_r, c2p_w = os.pipe()
    p2c_r, p2c_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        _fill(pages, 2, fourth)                     # child: B on every 4th page
        mine = _value(n, 1)
        mine[fourth] = _value(n, 2)[fourth]
        gpid = os.fork()
        if gpid == 0:
            before = _bad_pages(pages, mine)
            _fill(pages, 3, odd)                    # grandchild: C on odd pages
            theirs = mine.copy()
            theirs[odd] = _value(n, 3)[odd]
            after = _bad_pages(pages, theirs)
            sys.stderr.write(f"grandchild: bad before {before} after {after}\n")
            os._exit(0 if before == after == 0 else 1)
        grandchild = _wait(gpid)
        _say(c2p_w)
        _hear(p2c_r)                                # the parent wrote D on every 5th page
        bad = _bad_pages(pages, mine)
        sys.stderr.write(f"child: grandchild exit {grandchild}, bad {bad}\n")
        os._exit(0 if grandchild == 0 and bad == 0 else 1)
    _hear(c2p_r)
    parent_bad_mid = _bad_pages(pages, _value(n, 1))
    _fill(pages, 4, fifth)
    _say(p2c_w)
    child = _wait(pid)
    want = _value(n, 1)
    want[fifth] = _value(n, 4)[fifth]
    return {"child": child, "parent_bad_mid": parent_bad_mid, "parent_bad": _bad_pages(pages, want)}


def fork_after_fill(c, size: int) -> tuple:
    """A region of `size` filled with salt 1, then a fork. Returns (region,
    pages, n, pid, c2p_w, p2c_r) in the child, which has said it runs,
    and the same with (c2p_r, p2c_w) in the parent, which has heard it."""
    region = c.alloc(size)
    pages = _pages(region)
    _fill(pages, 1)
    c2p_r, c2p_w = os.pipe()
    p2c_r, p2c_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        _say(c2p_w)
        return region, pages, len(pages), pid, c2p_w, p2c_r
    _hear(c2p_r)
    return region, pages, len(pages), pid, c2p_r, p2c_w


def scenario_parent_closes(c, size: int) -> dict:
    """The parent closes its region (as when it exits) while the child has
    read nothing yet: the child still sees every page as it was at fork."""
    region, pages, n, pid, _, p2c = fork_after_fill(c, size)
    if pid == 0:
        _hear(p2c)                                  # the parent's region is gone
        bad = _bad_pages(pages, _value(n, 1))
        sys.stderr.write(f"child: bad {bad}\n")
        os._exit(0 if bad == 0 else 1)
    del pages
    region.close()
    _say(p2c)
    return {"child": _wait(pid), "copied": c.status()["fork"]["fork_copied_pages_total"]}


def scenario_drain(c, size: int) -> dict:
    """The daemon drains (SIGTERM) while parent and child share pages: both
    get every page home, each with its own contents, before it exits."""
    region = c.alloc(size)
    pages = _pages(region)
    n = len(pages)
    _fill(pages, 1)
    daemon_pid = c.status()["pid"]
    c2p_r, c2p_w = os.pipe()
    p2c_r, p2c_w = os.pipe()
    half = np.arange(0, n, 2)
    pid = os.fork()
    if pid == 0:
        _fill(pages, 2, half)
        _say(c2p_w)
        _hear(p2c_r)                                # the daemon has drained and exited
        want = _value(n, 1)
        want[half] = _value(n, 2)[half]
        os._exit(0 if _bad_pages(pages, want) == 0 else 1)
    _hear(c2p_r)
    audit = c.status()["audit"]
    os.kill(daemon_pid, signal.SIGTERM)
    deadline = time.monotonic() + 120
    while os.path.exists(c.socket_path):            # the daemon removes it once drained
        if time.monotonic() > deadline:
            raise AssertionError("the daemon did not finish draining")
        time.sleep(0.02)  # polling a condition with a deadline
    _say(p2c_w)
    child = _wait(pid)
    return {"child": child, "parent_bad": _bad_pages(pages, _value(n, 1)), "audit_before": audit}


def scenario_hook_fails(c, size: int) -> dict:
    """The child cannot reach the daemon (its socket was moved away): its
    region is closed there with a message, the parent keeps its data, and the
    snapshot nobody attached is released."""
    region = c.alloc(size)
    pages = _pages(region)
    n = len(pages)
    _fill(pages, 1)
    moved = c.socket_path + ".moved"
    os.rename(c.socket_path, moved)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(w, json.dumps({"lost": region.lost, "closed": region.closed,
                                "regions": len(c.regions)}).encode())
        os._exit(0)
    os.close(w)
    seen = json.loads(os.read(r, 65536))
    child = _wait(pid)
    os.rename(moved, c.socket_path)
    deadline = time.monotonic() + 30
    while c.status()["fork"]["fork_pending"]:
        if time.monotonic() > deadline:
            raise AssertionError(f"the unattached snapshot is still held: {c.status()['fork']}")
        time.sleep(0.01)  # polling a condition with a deadline
    return {"child": child, "seen": seen, "parent_bad": _bad_pages(pages, _value(n, 1))}


def _poll(what: str, cond, timeout: float = 60) -> None:
    """Wait for cond() with a deadline (polling a condition, never a sleep as synchronisation)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"still waiting after {timeout}s for {what}")
        time.sleep(0.005)


def scenario_mlocked_in_flight(c, size: int) -> dict:
    """A parent page whose write is in flight at fork (the child reads it from
    the parent, AT_PARENT) and that its client mlocked meanwhile stays when
    the write ends (writeback.py); once unlocked it may be dropped as a clean
    page, and the child must then read it from the slot, not a punched hole."""
    libc = ctypes.CDLL(None, use_errno=True)
    for name in ("mlock", "munlock"):
        getattr(libc, name).argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)
    region = c.alloc(size)
    pages = _pages(region)
    n = len(pages)
    locked = n // 4  # the oldest pages, the first the per-uid share writes back
    _fill(pages, 1)
    _poll("writes in flight", lambda: c.status()["writeback_inflight"] > 0)
    assert libc.mlock(region.addr, locked * 4096) == 0, ctypes.get_errno()
    p2c_r, p2c_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        _hear(p2c_r)  # the parent's kept pages were dropped
        os._exit(0 if _bad_pages(pages[:locked], _value(n, 1)[:locked]) == 0 else 1)
    _poll("the writes ended", lambda: c.status()["writeback_inflight"] == 0)
    assert libc.munlock(region.addr, locked * 4096) == 0, ctypes.get_errno()
    vec = ctypes.create_string_buffer(locked)

    def dropped() -> int:
        assert libc.mincore(region.addr, locked * 4096, vec) == 0
        return sum(1 for b in vec.raw if not b & 1)

    # Reading the rest brings it in over the uid's share: its oldest
    # pages, the unlocked ones, are dropped clean.
    deadline = time.monotonic() + 60
    while dropped() < locked // 2 and time.monotonic() < deadline:
        int(pages[locked:, 0].sum())
    gone = dropped()
    _say(p2c_w)
    child = _wait(pid)
    return {"child": child, "dropped": gone, "locked": locked, "parent_bad": _bad_pages(pages, _value(n, 1))}


if __name__ == "__main__":
    scenario_main(globals(), sys.argv[1:], stops_daemon=("drain",))


# ---------------------------------------------------------------- tests (pytest side)

def run_fork_scenario(d, name: str, size: int, timeout: float = 300) -> dict:
    """Scenario NAME as its own client process; the daemon's audit (taken
    before the drain scenario stops it) must be exact."""
    result = run_scenario(__name__, d, name, size, timeout)
    audit = result.get("audit") or result["audit_before"]
    assert audit["charged_ok"] and audit["slots_ok"], result
    return result


def test_child_reading_every_8th_page_leaves_parent_intact(engine_backing, start_daemon):
    d = start_daemon(engine_backing, store_size="256M", max_resident="16M")
    result = run_fork_scenario(d, "issue", 64 << 20)
    assert result["child"] == 0, result
    assert result["parent_bad"] == 0, result
    wait_forks_released(d)


def test_writes_after_fork_stay_on_their_side(engine_backing, start_daemon):
    d = start_daemon(engine_backing, store_size="256M", max_resident="16M")
    result = run_fork_scenario(d, "private", 48 << 20)
    assert result["parent_bad_after_child_write"] == 0, result
    assert result["child"] == 0, result
    assert result["parent_bad"] == 0, result
    wait_forks_released(d)


def test_child_killed_mid_write_changes_nothing(engine_backing, start_daemon):
    d = start_daemon(engine_backing, store_size="256M", max_resident="16M")
    result = run_fork_scenario(d, "killed", 32 << 20)
    assert result["child"] == -signal.SIGKILL, result
    assert result["parent_bad"] == 0, result
    wait_forks_released(d)


def test_child_exit_releases_its_snapshot(file_backing, start_daemon):
    d = start_daemon(file_backing, store_size="256M", max_resident="16M")
    result = run_fork_scenario(d, "exits", 32 << 20)
    assert result["child"] == 0 and result["parent_bad_before"] == 0 and result["parent_bad"] == 0, result
    assert result["copied"] == 0, result
    wait_forks_released(d)


def test_multiprocessing_fork_workers_read_the_data(file_backing, start_daemon):
    d = start_daemon(file_backing, store_size="256M", max_resident="16M")
    result = run_fork_scenario(d, "multiprocessing", 32 << 20)
    assert result["sums_equal"] and result["parent_bad"] == 0, result
    wait_forks_released(d)


def test_exec_and_unhooked_children_cost_no_copy(file_backing, start_daemon):
    d = start_daemon(file_backing, store_size="256M", max_resident="16M")
    result = run_fork_scenario(d, "exec", 32 << 20)
    assert result["spawn_exit"] == 0 and result["exec_child"] == 0, result
    assert result["forks_after_subprocess"] == 0, result   # no hook ran: no snapshot
    assert result["raw_child"] == -signal.SIGSEGV, result  # not mapped in a libc-forked child
    assert result["fork"]["forks_total"] == 1 and result["fork"]["fork_copied_pages_total"] == 0, result
    assert result["parent_bad"] == 0, result
    wait_forks_released(d)


def test_nested_fork(file_backing, start_daemon):
    d = start_daemon(file_backing, store_size="256M", max_resident="16M")
    result = run_fork_scenario(d, "nested", 32 << 20)
    assert result["child"] == 0, result
    assert result["parent_bad_mid"] == 0 and result["parent_bad"] == 0, result
    wait_forks_released(d)


def test_child_that_cannot_attach_is_told_and_parent_keeps_data(file_backing, start_daemon):
    d = start_daemon(file_backing, store_size="256M", max_resident="16M")
    result = run_fork_scenario(d, "hook_fails", 32 << 20)
    assert result["child"] == 0 and result["parent_bad"] == 0, result
    assert result["seen"]["closed"] and result["seen"]["regions"] == 0, result
    assert "cannot reach the uswap daemon" in result["seen"]["lost"], result
    assert "is not available in forked child pid" in result["stderr"], result
    wait_forks_released(d)


def _raw(d, msg: dict, fds: list[int] | None = None) -> tuple[dict, socket.socket]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(d.socket)
    protocol.send(s, {"op": "hello", "version": protocol.VERSION})
    protocol.recv(s)
    protocol.send(s, msg, fds)
    reply, got = protocol.recv(s)
    for fd in got:
        os.close(fd)
    return reply, s


def test_bad_fork_requests_get_clear_errors(file_backing, start_daemon):
    d = start_daemon(file_backing, store_size="64M", max_resident="16M")
    cases = [
        ({"op": "fork_child", "token": "nope", "region": 1}, "unknown or expired fork token 'nope'"),
        ({"op": "fork_begin", "regions": "all"}, "regions 'all' must be a list of distinct live region ids"),
        ({"op": "fork_begin", "regions": [7]}, "regions [7] must be a list of distinct live region ids"),
        ({"op": "fork_attach", "token": "nope", "region": 1}, "fork_attach needs exactly 1 file descriptor"),
    ]
    for msg, words in cases:
        reply, s = _raw(d, msg)
        with s:
            assert reply["ok"] is False and words in reply["error"], (msg, reply)
            protocol.send(s, {"op": "status"})  # the connection lives on
            assert protocol.recv(s)[0]["ok"]
    r, w = os.pipe()
    try:
        reply, s = _raw(d, {"op": "fork_attach", "token": "nope", "region": 1}, [r])
        s.close()
        assert reply["ok"] is False and "unknown or expired fork token" in reply["error"], reply
    finally:
        os.close(r)
        os.close(w)
    wait_forks_released(d)


def test_child_reads_after_parent_closed(engine_backing, start_daemon):
    d = start_daemon(engine_backing, store_size="256M", max_resident="16M")
    result = run_fork_scenario(d, "parent_closes", 32 << 20)
    assert result["child"] == 0, result
    assert result["copied"] > 0, result  # the parent's dirty resident pages went to the child
    wait_forks_released(d)


def test_drain_brings_both_sides_home(file_backing, start_daemon):
    d = start_daemon(file_backing, store_size="256M", max_resident="16M")
    result = run_fork_scenario(d, "drain", 32 << 20)
    assert result["child"] == 0 and result["parent_bad"] == 0, result
    assert d.proc.wait(60) == 0


def test_child_reads_a_page_kept_mlocked_after_its_write(file_backing, start_daemon):
    """A page written back while a fork took place and mlocked before its write
    ended is kept (e41fa6e): its children still AT_PARENT there must move to
    its slot then (cow.parent_clean), for the page is dropped as an ordinary
    clean one once unlocked. They were left AT_PARENT, and read the punched
    parent page as zeros."""
    # Evicted for a per-uid share, with the budget's room to spare, so the
    # writes are still in flight when the writing ends (as in
    # test_reclaim_mlocked_io.py).
    d = start_daemon(file_backing, store_size="64M", max_resident="64M", inject={"write_delay": 0.5},
                     config={"max_resident_per_uid": "4M"})
    result = run_fork_scenario(d, "mlocked_in_flight", 8 << 20, timeout=180)
    assert result["dropped"] >= result["locked"] // 2, result
    assert result["child"] == 0 and result["parent_bad"] == 0, result
