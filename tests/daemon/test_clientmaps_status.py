"""`clientmaps.StatusFile`: a client's /proc/PID/status kept open for its
VmLck (reclaim reads it for every region it looks at, Reclaim._lock_key).
Read through the open fd, the value is the one now, not the one at open;
the fd reads nothing of a process that replaced a dead one under the same
pid; and the daemon keeps one such fd per client that has regions under
reclaim, closed when the client leaves (no fd leaks across clients)."""
from __future__ import annotations

import ctypes
import logging
import mmap
import os
import select
import socket
import subprocess
import sys
import textwrap

import pytest

from tests.daemon.test_sampling_hold import _with_pid
from uswap import config
from uswap.daemon import clientmaps
from uswap.daemon.connections import Connections
from uswap.daemon.ratelimit import RateLimitedLog
from tests.harness import Workload, status, wait_for

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mlock.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_libc.munlock.argtypes = (ctypes.c_void_p, ctypes.c_size_t)


def test_status_file_reads_vmlck_as_it_is_now():
    status_file = clientmaps.StatusFile(os.getpid())
    m = mmap.mmap(-1, 64 * 4096)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    try:
        before = status_file.locked_kb()
        assert status_file.fd >= 0
        assert _libc.mlock(addr, 64 * 4096) == 0, ctypes.get_errno()
        try:
            # The same fd, read again: the kernel's text of now.
            assert status_file.locked_kb() == before + 256
            assert clientmaps.locked_kb(os.getpid()) == before + 256
        finally:
            _libc.munlock(addr, 64 * 4096)
        assert status_file.locked_kb() == before
    finally:
        status_file.close()
        del addr
        m.close()
    assert status_file.fd == -1


def test_status_file_of_a_dead_process_reads_zero():
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        m = mmap.mmap(-1, 16 * 4096)
        ok = _libc.mlock(ctypes.addressof(ctypes.c_char.from_buffer(m)), 16 * 4096) == 0
        os.write(ready_w, b"1" if ok else b"0")
        os.read(go_r, 1)
        os._exit(0)
    status_file = clientmaps.StatusFile(pid)
    try:
        assert os.read(ready_r, 1) == b"1"
        assert status_file.locked_kb() == 64
        os.write(go_w, b"x")
        os.waitpid(pid, 0)
        # Reaped: the fd names a process that is gone, whatever holds the pid now.
        assert status_file.locked_kb() == 0
    finally:
        status_file.close()
        for fd in (ready_r, ready_w, go_r, go_w):
            os.close(fd)


CLIENT = textwrap.dedent("""
    import sys
    import numpy as np
    import uswap
    from tests.client_program import out

    c = uswap.connect(sys.argv[1])
    r = c.alloc(2048 * 4096)
    a = np.frombuffer(r.buf, dtype=np.uint64).reshape(-1, 512)
    a[:, 0] = np.arange(len(a))      # 8 MiB through a 2 MiB budget: reclaim looks at it
    out(filled=True)
    sys.stdin.readline()
    assert int(a[:, 0].sum()) == len(a) * (len(a) - 1) // 2
    out(done=True)
""")


def _status_fds(daemon_pid: int, client_pid: int) -> int:
    """The daemon's fds open on the client's /proc/PID/status."""
    target = f"/proc/{client_pid}/status"
    n = 0
    for fd in os.listdir(f"/proc/{daemon_pid}/fd"):
        try:
            n += os.readlink(f"/proc/{daemon_pid}/fd/{fd}") == target
        except FileNotFoundError:
            continue   # closed meanwhile
    return n


def test_daemon_keeps_one_status_fd_per_client_and_closes_it(engine_backing, start_daemon):
    d = start_daemon(engine_backing, store_size="64M", max_resident="2M")
    clients = [Workload.script(CLIENT, d.socket) for _ in range(3)]
    try:
        for c in clients:
            assert c.next(60) == {"filled": True}
        for c in clients:
            assert _status_fds(d.proc.pid, c.pid) == 1
        for c in clients:
            c.send("\n")
            assert c.next(60) == {"done": True}
            c.finish(30)
        wait_for("the clients gone", lambda: not status(d)["clients"], 30)
        for c in clients:
            assert _status_fds(d.proc.pid, c.pid) == 0
    finally:
        for c in clients:
            c.kill()


LOCKER = textwrap.dedent("""
    import ctypes, mmap, sys
    libc = ctypes.CDLL(None, use_errno=True)
    m = mmap.mmap(-1, 64 * 4096)
    ok = libc.mlock(ctypes.c_void_p(ctypes.addressof(ctypes.c_char.from_buffer(m))), ctypes.c_size_t(64 * 4096)) == 0
    print(1 if ok else 0, flush=True)
    sys.stdin.readline()
""")


@pytest.mark.skipif(os.geteuid() != 0, reason="ns_last_pid needs root")
def test_a_session_whose_client_died_and_whose_pid_was_reused_reads_no_vmlck(tmp_path):
    """A client connects (a real Connections accepts it: its session takes
    its pidfd), dies before reclaim's first look at its status (the file is
    opened then, by pid), and its pid is taken again (`ns_last_pid`) by a
    program with 256 KiB mlocked. The session's status reads 0, as for any
    client that is gone; before, it opened the new program's
    /proc/PID/status and read its VmLck (then its maps and smaps)."""
    cfg = config.load(None, {"backing": str(tmp_path / "store"), "socket": str(tmp_path / "sock")})
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(cfg.socket)
    listener.listen(1)
    listener.setblocking(False)
    epoll = select.epoll()
    conns = Connections(cfg, None, epoll, RateLimitedLog(logging.getLogger("test"), 1.0, 5), listener)
    dead = subprocess.Popen([sys.executable, "-c", "import socket, sys; s = socket.socket(socket.AF_UNIX);"
                             f" s.connect({cfg.socket!r}); print(1, flush=True); sys.stdin.readline()"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    other = None
    try:
        assert dead.stdout.readline().strip() == "1"
        conns.accept()
        (session,) = conns.sessions.values()
        assert session.pid == dead.pid and session.pidfd >= 0
        dead.stdin.close()
        dead.wait()  # reaped: its pid is free
        other = _with_pid(dead.pid, [sys.executable, "-c", LOCKER], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True)
        assert other.stdout.readline().strip() == "1", "mlock failed"
        assert clientmaps.locked_kb(other.pid) >= 256  # what the pid's status says now

        assert session.proc_status.locked_kb() == 0, "the VmLck of the process that took the dead client's pid"
    finally:
        if other is not None:
            other.stdin.close()
            other.wait()
        for session in list(conns.sessions.values()):
            conns.drop(session, "test over")
        conns.close_listener()
        epoll.close()
