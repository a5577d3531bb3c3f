"""The access sampler's hold (sampling.py, native/pagehold.h), in process on
a real memfd mapped shared by a real child process (the client) and by this
process (the daemon's view, as Region.daddr).

The pages are held in the pipe by a splice from the memfd, which maps them
nowhere: the daemon's thread takes no page fault for them. The hold was a
vmsplice of the daemon's own mapping, whose get_user_pages faulted every
sampled page into it (counted in the thread's minor faults) only for the
MADV_DONTNEED right after to unmap it again (issue 14: the two were 17%
of the engine thread's samples on a first-touch stream, py-spy). The sample itself
must still do its job: the pages leave the client's page tables, stay in
the memfd with their bytes, and the pipe is left empty.
"""
from __future__ import annotations

import contextlib
import ctypes
import fcntl
import mmap
import os
import resource
import subprocess
import sys
import termios
import types

import numpy as np
import pytest

from tests.daemon.test_sampling_adversarial import _mapping_swap_kb, kernel_swap  # noqa: F401 (a fixture)
from tests.swap_writes import SwapWrites
from uswap import native
from uswap.daemon import clientmaps
from uswap.daemon.sampling import MADV_PAGEOUT, SYS_PROCESS_MADVISE, AccessSampler, _iovec_array, _runs

PAGE = 4096
NPAGES = 4096

# The client writes every page, then empties its CPU's batch of pages not
# yet on the LRU lists (mlock drains the calling CPU's; the client is kept
# on one CPU so that it is the one its writes filled): MADV_PAGEOUT cannot
# isolate a page still in another CPU's batch and leaves it mapped (up to
# 31 of the last pages written stayed in the client's page tables, 1 run
# in 4 on 2 CPUs).
CLIENT = """
import ctypes, mmap, os, sys
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
fd, n = int(sys.argv[1]), int(sys.argv[2])
m = mmap.mmap(fd, n * 4096, mmap.MAP_SHARED)
for p in range(n):
    m[p * 4096] = p % 251 + 1
spare = mmap.mmap(-1, 4096)
at = ctypes.c_void_p(ctypes.addressof(ctypes.c_char.from_buffer(spare)))
libc = ctypes.CDLL(None)
libc.mlock(at, 4096)
libc.munlock(at, 4096)
print(ctypes.addressof(ctypes.c_char.from_buffer(m)), flush=True)
sys.stdin.readline()
"""

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
libc.syscall.restype = ctypes.c_long


@contextlib.contextmanager
def _sampled_region(npages: int, open_flags: int | None = None):
    """A memfd of `npages` written by a client child (CLIENT) and mapped
    read-only here as the daemon's view, as the Region the sampler reads
    (id, owner.pid, closing, addr, daddr, size, memfd). With `open_flags`,
    region.memfd is the memfd reopened through /proc/self/fd with them, as a
    client can send it."""
    memfd = os.memfd_create("uswap-test-hold", os.MFD_CLOEXEC)
    os.ftruncate(memfd, npages * PAGE)
    given = memfd if open_flags is None else os.open(f"/proc/self/fd/{memfd}", open_flags | os.O_CLOEXEC)
    child = subprocess.Popen([sys.executable, "-c", CLIENT, str(memfd), str(npages)], pass_fds=[memfd],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    daddr = libc.mmap(None, npages * PAGE, mmap.PROT_READ, mmap.MAP_SHARED, given, 0)
    pidfd = os.pidfd_open(child.pid)  # as a session holds its client's (connections.peer_pidfd)
    try:
        assert daddr not in (None, ctypes.c_void_p(-1).value)
        addr = int(child.stdout.readline())
        yield types.SimpleNamespace(id=1, owner=types.SimpleNamespace(pid=child.pid, pidfd=pidfd), closing=False,
                                    addr=addr, daddr=daddr, size=npages * PAGE, memfd=given)
    finally:
        os.close(pidfd)
        child.stdin.close()
        child.wait()
        libc.munmap(daddr, npages * PAGE)
        for fd in {given, memfd}:
            os.close(fd)


def test_the_hold_maps_nothing_into_the_daemon_and_the_pages_leave_the_client():
    with _sampled_region(NPAGES) as region:
        pid, addr, daddr = region.owner.pid, region.addr, region.daddr
        pages = np.concatenate((np.arange(0, NPAGES // 2), np.arange(NPAGES // 2, NPAGES, 2)))
        assert clientmaps.in_page_tables(pid, addr, pages).all()
        sampler = AccessSampler()
        faults = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        assert sampler.sample(region, pages)
        faults = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - faults
        # A vmsplice of the view faulted them in: 260 faults here (a fault-around window of 16 pages each).
        assert faults < 32, f"{faults} page faults of this thread while it sampled {len(pages)} pages"
        assert sampler.sampled == len(pages)
        assert not clientmaps.in_page_tables(pid, addr, pages).any()
        left = np.setdiff1d(np.arange(NPAGES), pages)
        assert clientmaps.in_page_tables(pid, addr, left).all()  # the pages not asked for stay
        assert _bytes_in(sampler._pipe[0]) == 0  # the pipe was emptied: no page held past the sample
        view = (ctypes.c_char * (NPAGES * PAGE)).from_address(daddr)
        assert [view[p * PAGE][0] for p in range(NPAGES)] == [p % 251 + 1 for p in range(NPAGES)]


def _bytes_in(pipe_r: int) -> int:
    n = ctypes.c_int()
    fcntl.ioctl(pipe_r, termios.FIONREAD, n)
    return n.value


# Scattered pages (a run each: 4 pipes' worth of runs) and one long run
# across 4 pipes' worth of pages; every other page of the first half stays
# out of the sample.
SCATTERED = np.arange(0, NPAGES // 2, 2)
RUN = np.arange(NPAGES // 2, NPAGES)


@pytest.mark.parametrize("memfd_flags", [0, os.O_DIRECT], ids=["memfd", "memfd-reopened-O_DIRECT"])
def test_no_sampled_page_reaches_kernel_swap(kernel_swap, memfd_flags):
    """With kernel swap on, every sampled page stays out of it, whatever
    the open file the daemon was given for the memfd: a client can send a
    memfd reopened through /proc/self/fd with O_DIRECT (or set O_DIRECT on
    such a file at any time, the daemon sharing the open file), and a
    splice from an O_DIRECT file copies the pages (vfs_splice_read:
    copy_splice_read) instead of referencing them, which holds nothing.
    What the sampler's MADV_PAGEOUT wrote to swap is counted in this
    process (tests/swap_writes.py; the host's own reclaim may page out an
    unmapped memfd page too). The pages left out of the sample, paged out
    with no hold, show that this test sees the writes and kernel swap
    (Swap: of the client's mapping)."""
    with _sampled_region(NPAGES, os.O_RDWR | memfd_flags) as region, SwapWrites(os.getpid()) as writes:
        pid, addr, daddr = region.owner.pid, region.addr, region.daddr
        pages = np.concatenate((SCATTERED, RUN))
        sampler = AccessSampler()
        assert sampler.sample(region, pages)
        assert not clientmaps.in_page_tables(pid, addr, pages).any()
        assert writes.count() == 0, "sampled pages went to kernel swap: the pipe held none"
        # The control: the pages not sampled, paged out with nothing holding
        # them (before this process reads its view: fault-around would map
        # them here too, and the kernel leaves a page mapped twice).
        unheld = np.setdiff1d(np.arange(NPAGES // 2), SCATTERED)
        firsts, counts = _runs(unheld)
        iov = _iovec_array(addr, firsts, counts)
        pidfd = os.pidfd_open(pid)
        try:
            advised = libc.syscall(SYS_PROCESS_MADVISE, pidfd, ctypes.c_void_p(iov.ctypes.data), len(firsts),
                                   MADV_PAGEOUT, 0)
        finally:
            os.close(pidfd)
        assert advised == len(unheld) * PAGE
        assert writes.count() > 0, "pages paged out unheld were not seen written"
        assert _mapping_swap_kb(pid, addr) > 0, "pages paged out unheld did not show in Swap:"
        view = (ctypes.c_char * (NPAGES * PAGE)).from_address(daddr)
        assert [view[p * PAGE][0] for p in range(NPAGES)] == [p % 251 + 1 for p in range(NPAGES)]


def test_a_hole_in_a_sampled_run_stays_a_hole():
    """A RESIDENT page the client punched out of the memfd (MADV_REMOVE,
    which README forbids) must stay gone, for the engine to find it
    vanished (faults.py _vanished: its slot copy is served, or it reads as
    zeros if it had none). The hold splices the zero page for a hole; the
    vmsplice of the daemon's mapping it replaced faulted a zero page into
    the memfd there, which the client's next touch then mapped as its data."""
    with _sampled_region(64) as region:
        native.punch_hole(region.memfd, 8 * PAGE, 8 * PAGE)   # pages 8-15, in the middle of the run sampled
        assert AccessSampler().sample(region, np.arange(32))
        assert os.lseek(region.memfd, 8 * PAGE, os.SEEK_DATA) == 16 * PAGE, "a page was made in the hole"


def _with_pid(pid: int, argv: list[str], **kw) -> subprocess.Popen:
    """A process started with pid `pid` (free: its process was reaped), by
    /proc/sys/kernel/ns_last_pid (root): the kernel hands out the next pid
    after it. Other processes of the host may take it first: tried again."""
    for _ in range(200):
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(pid - 1))
        proc = subprocess.Popen(argv, **kw)
        if proc.pid == pid:
            return proc
        proc.kill()
        proc.wait()
    pytest.skip(f"could not get pid {pid} again (a busy host)")


@pytest.mark.skipif(os.geteuid() != 0, reason="ns_last_pid needs root")
def test_a_client_whose_pid_was_reused_is_never_sampled_through_the_new_process(tmp_path):
    """A client connects (its session takes its pidfd: SO_PEERPIDFD), then
    dies while its session lives on (another process may hold its socket),
    and its pid is reused by another program, which maps memory at the dead
    client's region's address. The sampler opened a pidfd by pid at each
    sample (pidfd_open(owner.pid)) and took that program's pages out of its
    page tables; through the session's pidfd the call fails (ESRCH) and the
    other program is untouched."""
    import socket

    from uswap.daemon.connections import peer_pidfd
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "sock"))
    listener.listen(1)
    dead = subprocess.Popen([sys.executable, "-c", "import socket, sys; s = socket.socket(socket.AF_UNIX);"
                             f" s.connect({str(tmp_path / 'sock')!r}); print(1, flush=True); sys.stdin.readline()"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    sock, _ = listener.accept()
    assert dead.stdout.readline().strip() == "1"
    pidfd = peer_pidfd(sock, dead.pid)
    assert pidfd >= 0
    dead.stdin.close()
    dead.wait()  # reaped: its pid is free
    memfd = os.memfd_create("uswap-test-reused", os.MFD_CLOEXEC)
    os.ftruncate(memfd, 64 * PAGE)
    other = _with_pid(dead.pid, [sys.executable, "-c", CLIENT, str(memfd), "64"], pass_fds=[memfd],
                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    daddr = libc.mmap(None, 64 * PAGE, mmap.PROT_READ, mmap.MAP_SHARED, memfd, 0)
    try:
        addr = int(other.stdout.readline())  # the dead client's region was here
        pages = np.arange(64)
        assert clientmaps.in_page_tables(other.pid, addr, pages).all()
        region = types.SimpleNamespace(id=1, owner=types.SimpleNamespace(pid=dead.pid, pidfd=pidfd), closing=False,
                                       addr=addr, daddr=daddr, size=64 * PAGE, memfd=memfd)
        sampler = AccessSampler()
        assert not sampler.sample(region, pages)  # the client is gone: not sampled
        assert sampler.sampled == 0 and sampler.failed == 1
        mapped = clientmaps.in_page_tables(other.pid, addr, pages)
        assert mapped.all(), f"{np.count_nonzero(~mapped)} pages of another process taken out of its page tables"
    finally:
        other.stdin.close()
        other.wait()
        libc.munmap(daddr, 64 * PAGE)
        os.close(memfd)
        os.close(pidfd)
        sock.close()
        listener.close()
