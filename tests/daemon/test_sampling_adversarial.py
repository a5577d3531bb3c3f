"""Access sampling (sampling.py) against the kernel, by experiment: what
MADV_PAGEOUT on the client's shared memfd mapping really does to pages the
client keeps writing, to a forked child's snapshot, with kernel swap on,
and to the daemon's fds when clients die while they are being sampled.

Every client here writes each page's value into its first and last word
and keeps a copy of what it wrote; a page that comes back with anything
else was lost or served stale (design.md invariants). A hot set is
rewritten all the time (dirty in a writable PTE when it is sampled, and
written again right after), while a stream of writes three budgets long
keeps reclaim, and so sampling, running.
"""
from __future__ import annotations

import fcntl
import os
import struct
import subprocess
import termios
import textwrap

import pytest

from tests.harness import Workload, assert_audit, finish_clean, status, wait_for
from tests.swap_writes import SwapWrites

BUDGET_PAGES = 1024
HOT_PAGES = 256

CLIENT = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    import uswap

    sock, npages, hot_n, rounds, forks = sys.argv[1], *map(int, sys.argv[2:6])
    c = uswap.connect(sock)
    r = c.alloc(npages * 4096)
    a = np.frombuffer(r.buf, dtype=np.uint64).reshape(-1, 512)
    expect = np.arange(1, npages + 1, dtype=np.uint64)
    for p in range(npages):
        a[p, 0] = a[p, 511] = expect[p]
    print(json.dumps({"addr": r.addr}), flush=True)
    sys.stdin.readline()

    def bad_pages():
        return int(np.count_nonzero((a[:, 0] != expect) | (a[:, 511] != expect)))

    bad_now = 0      # a hot page read back right after its write
    children = []
    for rnd in range(rounds):
        for p in range(hot_n, npages):
            expect[p] += np.uint64(npages)
            a[p, 0] = a[p, 511] = expect[p]
            h = p % hot_n
            expect[h] += np.uint64(npages)
            a[h, 0] = a[h, 511] = expect[h]
            bad_now += int(a[h, 0] != expect[h])
        if rnd < forks:
            # The child checks its snapshot (every page as at fork) while the
            # parent goes on writing and being sampled.
            pid = os.fork()
            if pid == 0:
                os._exit(1 if bad_pages() else 0)
            children.append(pid)
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in children]
    print(json.dumps({"bad_now": bad_now, "bad_end": bad_pages(), "children": codes}), flush=True)
    del a
    r.close()
    c.close()
    print(json.dumps({"done": True}), flush=True)
""")


def _mapping_swap_kb(pid: int, addr: int) -> int:
    """Swap: of the client's VMA at `addr` (/proc/PID/smaps; for a shared
    memfd mapping it counts the file's pages in kernel swap)."""
    with open(f"/proc/{pid}/smaps") as f:
        inside = False
        for line in f:
            head = line.split(None, 1)[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                inside = int(head.split("-")[0], 16) == addr
            elif inside and line.startswith("Swap:"):
                return int(line.split()[1])
    raise AssertionError(f"no mapping at {addr:#x} in pid {pid}")


@pytest.fixture
def kernel_swap(tmp_path):
    """A swap file of this test's own, on for the test and removed after."""
    path = tmp_path / "kswap"
    subprocess.run(["dd", "if=/dev/zero", f"of={path}", "bs=1M", "count=256", "status=none"], check=True)
    os.chmod(path, 0o600)
    subprocess.run(["mkswap", str(path)], check=True, capture_output=True)
    subprocess.run(["swapon", str(path)], check=True)
    try:
        yield str(path)
    finally:
        subprocess.run(["swapoff", str(path)], check=True)


def _run(d, npages: int, rounds: int, forks: int, client: str = CLIENT) -> tuple[dict, dict]:
    c = Workload.script(client, d.socket, npages, HOT_PAGES, rounds, forks)
    try:
        c.next(60)      # the region is allocated and written
        before = status(d)
        c.send()
        res = c.next(240)
        after = status(d)
        c.finish_done(timeout=60, daemon=d)
    finally:
        c.kill()
    return before, after | {"result": res}


def test_writes_around_sampling_are_never_lost(file_backing, start_daemon):
    """Hot pages written in a writable PTE right before and right after
    they are sampled, evicted and read back, and two forked children's
    snapshots checked while the parent goes on: every write comes back."""
    d = start_daemon(file_backing, store_size="64M", max_resident=f"{BUDGET_PAGES * 4 // 1024}M")
    npages = 4 * BUDGET_PAGES
    before, after = _run(d, npages, rounds=3, forks=2)
    res = after["result"]
    assert res == {"bad_now": 0, "bad_end": 0, "children": [0, 0]}, (res, after)
    assert after["sampled_pages_total"] - before["sampled_pages_total"] > BUDGET_PAGES, after
    assert after["minor_faults_total"] > before["minor_faults_total"], after
    assert after["swapins_total"] > before["swapins_total"], after   # sampled pages were evicted and came back
    assert_audit(after)
    finish_clean(d)


def test_sampled_pages_never_reach_kernel_swap(file_backing, start_daemon, kernel_swap):
    """With kernel swap on, MADV_PAGEOUT of a shared memfd page would write
    it to kernel swap if nothing else held it: the daemon's pipe must keep
    every sampled page out of it, and the data must stay right.

    What is counted is what the daemon's own reclaim wrote to swap (the
    kernel's record of it, tests/swap_writes.py: MADV_PAGEOUT's reclaim runs
    in the thread that asks), any page of any process. Not Swap: of the
    region: once the pipe is emptied a sampled page is an unmapped page of
    the memfd, and the host's own reclaim may page it out (this machine's
    DAMON pageout scheme did, now and then: 4-8 kB in a run, kdamond's
    writes each time)."""
    _sampled_pages_reach_no_kernel_swap(start_daemon, file_backing, CLIENT)



def _sampled_pages_reach_no_kernel_swap(start_daemon, file_backing, client: str) -> None:
    """Two sampled passes of `client` over four budgets under a real daemon:
    its data intact, pages sampled, and none written to kernel swap by the
    daemon's own reclaim (its MADV_PAGEOUT: tests/swap_writes.py)."""
    d = start_daemon(file_backing, store_size="64M", max_resident=f"{BUDGET_PAGES * 4 // 1024}M")
    with SwapWrites(d.proc.pid) as writes:
        before, after = _run(d, 4 * BUDGET_PAGES, rounds=2, forks=0, client=client)
        written = writes.count()
    assert after["result"] == {"bad_now": 0, "bad_end": 0, "children": []}, after
    assert after["sampled_pages_total"] - before["sampled_pages_total"] > BUDGET_PAGES, after
    assert written == 0, f"the daemon's MADV_PAGEOUT wrote {written} pages to kernel swap"
    assert_audit(after)
    finish_clean(d)


# The same client, but the memfd it sends is one it reopened through
# /proc/self/fd (another open file of the same memfd, on which O_DIRECT may
# be set), and it sets O_DIRECT on it once the region is allocated: the
# daemon shares that open file, and a splice from it copies the pages.
O_DIRECT_CLIENT = textwrap.dedent("""
    import fcntl, os
    reopened = []
    memfd_create = os.memfd_create
    def memfd_reopened(name, flags=0):
        fd = memfd_create(name, flags)
        reopened.append(os.open(f"/proc/self/fd/{fd}", os.O_RDWR | os.O_CLOEXEC))
        os.close(fd)
        return reopened[-1]
    os.memfd_create = memfd_reopened
""") + CLIENT.replace("r = c.alloc(npages * 4096)\n", "r = c.alloc(npages * 4096)\n"
                      "fcntl.fcntl(reopened[0], fcntl.F_SETFL, fcntl.fcntl(reopened[0], fcntl.F_GETFL) | os.O_DIRECT)\n")


def test_sampled_pages_never_reach_kernel_swap_whatever_the_memfds_flags(file_backing, start_daemon, kernel_swap):
    """As above, with a client that set O_DIRECT on the open file of the
    memfd it sent (native/pagehold.h holds from a file of its own)."""
    assert "F_SETFL" in O_DIRECT_CLIENT
    _sampled_pages_reach_no_kernel_swap(start_daemon, file_backing, O_DIRECT_CLIENT)

# A client whose `free` request looks, before it is sent, whether the
# region's range could be taken by a new mapping (MAP_FIXED_NOREPLACE
# succeeds only on a free range), and again once close() returned.
RESERVED_CLIENT = textwrap.dedent("""
    import ctypes, json, mmap, sys
    import uswap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                          ctypes.c_long)
    libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    MAP_FIXED_NOREPLACE = 0x100000

    def free_now(addr):
        got = libc.mmap(addr, 4096, mmap.PROT_READ | mmap.PROT_WRITE,
                        mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0)
        if got == addr:
            libc.munmap(got, 4096)
        return got == addr

    c = uswap.connect(sys.argv[1])
    r = c.alloc(64 * 4096)
    r.buf[:] = b"x" * len(r.buf)
    addr, seen = r.addr, {}
    real = c._request
    def request(msg, fds=None):
        if msg.get("op") == "free":
            seen["free_during_free"] = free_now(addr)
        return real(msg, fds)
    c._request = request
    r.close()
    print(json.dumps({"free_during_free": seen["free_during_free"], "free_after": free_now(addr)}), flush=True)
    c.close()
""")


def test_a_closed_regions_range_stays_reserved_until_the_daemon_freed_it(file_backing, start_daemon):
    """Until the daemon has the `free`, its sampler may still advise the
    range (MADV_PAGEOUT): the client keeps it reserved, so no new memory of
    its own can be there to be pushed to kernel swap (CI once saw 12 kB of
    a closing client's memory in kernel swap). Unreserved once freed."""
    d = start_daemon(file_backing, store_size="64M", max_resident="4M")
    c = Workload.script(RESERVED_CLIENT, d.socket)
    try:
        line = c.next(60)
    finally:
        c.kill()
    assert line == {"free_during_free": False, "free_after": True}, line
    finish_clean(d)


KILLED = textwrap.dedent("""
    import json, sys
    import numpy as np
    import uswap

    sock, npages = sys.argv[1], int(sys.argv[2])
    c = uswap.connect(sock)
    r = c.alloc(npages * 4096)
    a = np.frombuffer(r.buf, dtype=np.uint64).reshape(-1, 512)
    while True:
        for p in range(npages):
            a[p, 0] = p
            if p % 4 == 0:
                a[p % 128, 1] += 1
        print(json.dumps({"round": True}), flush=True)
""")


def _fds(pid: int) -> list[str]:
    """What the daemon's fds are, but its sockets (the status request's own
    connection closes on the daemon's side after the reply reaches us)."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        if not target.startswith("socket:"):
            out.append(target)
    return sorted(out)


def _client_fds(pid: int) -> list[str]:
    """The daemon's fds that belong to a client: memfds, userfaultfds and
    pidfds past the daemon's own one."""
    fds = _fds(pid)
    mine = [t for t in fds if t.startswith("/memfd:") or t == "anon_inode:[userfaultfd]"]
    pidfds = [t for t in fds if t == "anon_inode:[pidfd]"]
    return mine + pidfds[1:]


def _pipe_bytes(pid: int) -> int:
    """Bytes waiting in all of the daemon's pipes (FIONREAD through
    /proc/PID/fd: a second open of the same pipe, nothing is read)."""
    total = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        path = f"/proc/{pid}/fd/{fd}"
        try:
            if not os.readlink(path).startswith("pipe:"):
                continue
            own = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            total += struct.unpack("i", fcntl.ioctl(own, termios.FIONREAD, b"\0" * 4))[0]
        finally:
            os.close(own)
    return total


def test_clients_killed_while_sampled_leak_nothing(file_backing, start_daemon):
    """Clients SIGKILLed while reclaim samples their pages: the daemon's
    fds are the same after each (the sampler's one pipe, no pidfd of a
    client left open, no memfd or uffd kept), no page stays charged, the
    audit is exact."""
    d = start_daemon(file_backing, store_size="64M", max_resident=f"{BUDGET_PAGES * 4 // 1024}M")
    dpid = d.proc.pid
    counts = []
    for _ in range(4):
        c = Workload.script(KILLED, d.socket, 3 * BUDGET_PAGES)
        try:
            c.next(60)
            c.next(60)      # a whole round: reclaim and sampling were running
        finally:
            c.kill()
        wait_for("the client's regions released",
                 lambda: status(d)["resident_bytes"] == 0 and not status(d)["clients"], timeout=30)
        # A region's fds may close a moment after status shows it released
        # (a job that held them returning): wait until none of the dead
        # client's is left -- a leak never gets there and fails here.
        wait_for("the daemon holds no memfd, uffd or pidfd of the dead client", lambda: _client_fds(dpid) == [],
                 timeout=30)
        counts.append(_fds(dpid))
    st = status(d)
    assert st["sampled_pages_total"] > 0, st
    assert counts[1:] == counts[:1] * 3, counts
    assert sum(t == "anon_inode:[pidfd]" for t in counts[0]) == 1, counts[0]   # the daemon's own
    assert _pipe_bytes(dpid) == 0       # no page left held in the sampler's pipe
    assert_audit(st)
    assert st["store"]["used_bytes"] == 0, st
    finish_clean(d)
