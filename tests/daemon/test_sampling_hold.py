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

from uswap.daemon import clientmaps
from uswap.daemon.sampling import AccessSampler

PAGE = 4096
NPAGES = 4096

CLIENT = """
import ctypes, mmap, sys
fd, n = int(sys.argv[1]), int(sys.argv[2])
m = mmap.mmap(fd, n * 4096, mmap.MAP_SHARED)
for p in range(n):
    m[p * 4096] = p % 251 + 1
print(ctypes.addressof(ctypes.c_char.from_buffer(m)), flush=True)
sys.stdin.readline()
"""

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)


def test_the_hold_maps_nothing_into_the_daemon_and_the_pages_leave_the_client():
    memfd = os.memfd_create("uswap-test-hold", os.MFD_CLOEXEC)
    os.ftruncate(memfd, NPAGES * PAGE)
    child = subprocess.Popen([sys.executable, "-c", CLIENT, str(memfd), str(NPAGES)], pass_fds=[memfd],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    daddr = libc.mmap(None, NPAGES * PAGE, mmap.PROT_READ, mmap.MAP_SHARED, memfd, 0)
    assert daddr not in (None, ctypes.c_void_p(-1).value)
    try:
        addr = int(child.stdout.readline())
        pages = np.concatenate((np.arange(0, NPAGES // 2), np.arange(NPAGES // 2, NPAGES, 2)))
        assert clientmaps.in_page_tables(child.pid, addr, pages).all()
        region = types.SimpleNamespace(id=1, owner=types.SimpleNamespace(pid=child.pid), closing=False,
                                       addr=addr, daddr=daddr, size=NPAGES * PAGE, memfd=memfd)
        sampler = AccessSampler()
        faults = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        assert sampler.sample(region, pages)
        faults = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - faults
        # A vmsplice of the view faulted them in: 260 faults here (a fault-around window of 16 pages each).
        assert faults < 32, f"{faults} page faults of this thread while it sampled {len(pages)} pages"
        assert sampler.sampled == len(pages)
        assert not clientmaps.in_page_tables(child.pid, addr, pages).any()
        left = np.setdiff1d(np.arange(NPAGES), pages)
        assert clientmaps.in_page_tables(child.pid, addr, left).all()  # the pages not asked for stay
        assert _bytes_in(sampler._pipe[0]) == 0  # the pipe was emptied: no page held past the sample
        view = (ctypes.c_char * (NPAGES * PAGE)).from_address(daddr)
        assert [view[p * PAGE][0] for p in range(NPAGES)] == [p % 251 + 1 for p in range(NPAGES)]
    finally:
        child.stdin.close()
        child.wait()
        libc.munmap(daddr, NPAGES * PAGE)
        os.close(memfd)



def _bytes_in(pipe_r: int) -> int:
    n = ctypes.c_int()
    fcntl.ioctl(pipe_r, termios.FIONREAD, n)
    return n.value
