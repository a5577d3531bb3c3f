"""Speaking the daemon's socket protocol by hand, for the tests of bad input
and of the server's limits: raw frames and fds, the daemon's answer or its
hang-up, the refusal a bad message must get, a region's pieces (memfd,
mapping, uffd) built without uswap.client, and a good client whose data
must survive whatever the others send."""
from __future__ import annotations

import fcntl
import os
import socket
import struct
import subprocess

import uswap
from tests.harness import Workload, status
from uswap import native, protocol, uffd

PAGE = 4096


class GoodClient:
    """A workload holding a 4 MiB region (mostly swapped out under the 1 MiB
    budget) for the whole test; verify() re-reads every stamp."""

    def __init__(self, d) -> None:
        self.d = d
        self.w = Workload(d.socket, "--size", "4M", "--passes", "1", "--hold")
        try:
            self.w.wait_line(lambda x: x.get("holding"), timeout=40)
        except BaseException:
            self.w.kill()
            raise

    def verify(self, timeout: float = 60) -> None:
        assert self.d.proc.poll() is None, f"daemon died:\n{self.d.log_text()[-5000:]}"
        self.w.send("verify\n")
        self.w.finish_ok(timeout)

    def kill(self) -> None:
        self.w.kill()


def assert_alive(d, case: str) -> None:
    try:
        st = status(d)  # still answers
    except (OSError, EOFError, uswap.UswapError) as e:
        try:
            d.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        raise AssertionError(f"daemon stopped answering after {case} ({e}); exit status "
                             f"{d.proc.poll()}:\n{d.log_text()[-5000:]}") from None
    assert any(c["regions"] for c in st["clients"]), st  # the good client's region is still served
    audit = st.get("audit")
    assert audit is None or (audit["charged_ok"] and audit["slots_ok"]), (case, audit)


def connect(d, greet: bool = True) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(d.socket)
    if greet:
        protocol.send(s, {"op": "hello", "version": protocol.VERSION})
        reply, _ = protocol.recv(s)
        assert reply["ok"], reply
    return s


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def send_raw(s: socket.socket, data: bytes, fds: list[int] | None = None) -> None:
    """Send a raw message; the daemon may hang up before it has all of it
    (e.g. after a bad length prefix), which is fine."""
    try:
        if fds:
            assert socket.send_fds(s, [data[:1]], fds) == 1
            data = data[1:]
        s.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        pass


def outcome(s: socket.socket) -> dict | None:
    """The daemon's reply, or None if it closed the connection instead."""
    try:
        reply, fds = protocol.recv(s)
    except (EOFError, ConnectionResetError):
        return None
    for fd in fds:
        os.close(fd)
    return reply


def is_closed(s: socket.socket) -> bool:
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def expect_refusal(d, s: socket.socket, case: str, *words: str, must_close: bool = False) -> None:
    """An error reply naming the problem (each of `words` in its text) and/or
    a closed connection; then the daemon must still be alive and serving."""
    reply = outcome(s)
    if reply is not None:
        assert reply.get("ok") is False, (case, reply)
        text = reply.get("error", "")
        for w in words:
            assert w.lower() in text.lower(), (case, w, text)
        if must_close:
            assert is_closed(s), (case, "connection left open after a protocol error")
    s.close()
    assert_alive(d, case)


class Pieces:
    """A client-side region under construction: memfd, mapping, uffd. Nothing
    here ever touches the mapped memory (a fault would wait for the daemon)."""

    def __init__(self, size: int = 4 * PAGE, memfd_size: int | None = None,
                 seals: int = fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL,
                 register: int = uffd.REGISTER_MISSING | uffd.REGISTER_WP | uffd.REGISTER_MINOR,
                 data: bool = False) -> None:
        self.size = size
        self.memfd = os.memfd_create("uswap-test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.memfd, memfd_size if memfd_size is not None else size)
        if data:
            os.pwrite(self.memfd, b"precious", 0)
        if seals:
            fcntl.fcntl(self.memfd, fcntl.F_ADD_SEALS, seals)
        self.addr = native.mmap_shared(self.memfd, size)
        self.uffd = uffd.open_uffd()
        self.registered = bool(register)
        if register:
            # The raw ioctl: uffd.register() itself refuses a registration
            # without WP/MINOR, which some cases here need.
            ioctls = uffd.ffi.new("uint64_t *")
            ret = uffd.lib.us_uffd_register(self.uffd, self.addr, size, register, ioctls)
            assert ret >= 0, os.strerror(-ret)

    def msg(self, **kw) -> dict:
        m = {"op": "alloc", "size": self.size, "addr": self.addr}
        m.update(kw)
        return m

    def close(self) -> None:
        if self.registered:
            uffd.unregister(self.uffd, self.addr, self.size)
        native.munmap(self.addr, self.size)
        os.close(self.uffd)
        os.close(self.memfd)
