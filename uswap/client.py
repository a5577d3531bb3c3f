"""Public client API: connect to the daemon and allocate swappable regions.

    with uswap.connect() as c:
        r = c.alloc(1 << 30)
        a = numpy.frombuffer(r.buf, dtype=numpy.uint8)

A region is a sealed memfd mapped MAP_SHARED here and in the daemon, and
registered with this process's own userfaultfd (MISSING|WP|MINOR). Both fds are
sent to the daemon once; this process keeps its own copies open for the
region's life, because if the last copy of the uffd closed the range would be
unregistered and evicted pages would read as zeros (DESIGN §7).
"""
from __future__ import annotations

import fcntl
import os
import socket
import threading

from uswap import config, native, protocol, uffd

PAGE = 4096


class UswapError(Exception):
    """The daemon refused a request or is unreachable."""


class Region:
    """Memory managed by the daemon. `buf` is a writable memoryview of exactly `size` bytes."""

    def __init__(self, client: "Client", region_id: int, addr: int, size: int,
                 mapped: int, uffd_fd: int, memfd: int) -> None:
        self._client = client
        self.id = region_id
        self.addr = addr
        self.size = size
        self._mapped = mapped
        self._uffd = uffd_fd
        self._memfd = memfd
        self.buf: memoryview = native.buffer_at(addr, size)
        self.closed = False

    def close(self) -> None:
        """Give the memory back. The region's contents are gone afterwards.

        Order matters: unregister first, so unmapping raises no event that
        nobody would read, then unmap, then tell the daemon, then close fds.
        """
        if self.closed:
            return
        self.closed = True
        self.buf.release()
        try:
            uffd.unregister(self._uffd, self.addr, self._mapped)
        except OSError:
            pass
        native.munmap(self.addr, self._mapped)
        try:
            self._client._request({"op": "free", "region": self.id})
        except (UswapError, OSError, EOFError):
            pass  # daemon gone: it frees the region when it sees our socket close
        os.close(self._uffd)
        os.close(self._memfd)

    def __enter__(self) -> "Region":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Client:
    """A connection to the uswap daemon."""

    def __init__(self, socket_path: str | None = None) -> None:
        self.socket_path = config.socket_path(socket_path)
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self._sock.connect(self.socket_path)
        except OSError as e:
            self._sock.close()
            raise UswapError(f"cannot reach the uswap daemon at {self.socket_path}: {e.strerror}"
                             " (is `uswap run` running? set --socket or USWAP_SOCKET)") from None
        try:
            reply = self._request({"op": "hello", "version": protocol.VERSION})
        except (OSError, EOFError, protocol.ProtocolError) as e:
            # A busy daemon answers and closes before reading our hello: its
            # reason may still wait in our socket.
            reason = self._refusal_left_behind()
            self._sock.close()
            raise UswapError(reason or f"the uswap daemon at {self.socket_path} closed the connection"
                             f" during the handshake ({e})") from None
        except UswapError:
            self._sock.close()
            raise
        self.daemon_version = reply["version"]
        self.regions: list[Region] = []

    def _refusal_left_behind(self) -> str | None:
        """The error of a reply already in the socket, if there is one."""
        try:
            self._sock.settimeout(1.0)
            reply, extra = protocol.recv(self._sock)
        except (OSError, EOFError, protocol.ProtocolError):
            return None
        for fd in extra:
            os.close(fd)
        return reply.get("error") if not reply.get("ok") else None

    def _request(self, msg: dict, fds: list[int] | None = None) -> dict:
        with self._lock:
            protocol.send(self._sock, msg, fds)
            reply, extra = protocol.recv(self._sock)
        for fd in extra:
            os.close(fd)
        if not reply.get("ok"):
            raise UswapError(reply.get("error", "request refused"))
        return reply

    def alloc(self, nbytes: int) -> Region:
        """A new region of `nbytes` (rounded up to whole pages inside; `buf` is exact)."""
        if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes <= 0:
            raise ValueError(f"alloc: size {nbytes!r} is not accepted; use a positive number of bytes")
        mapped = (nbytes + PAGE - 1) // PAGE * PAGE
        memfd = os.memfd_create("uswap-region", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        uffd_fd = -1
        addr = 0
        try:
            os.ftruncate(memfd, mapped)
            fcntl.fcntl(memfd, fcntl.F_ADD_SEALS,
                        fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
            addr = native.mmap_shared(memfd, mapped)
            uffd_fd = uffd.open_uffd()
            uffd.register(uffd_fd, addr, mapped,
                          uffd.REGISTER_MISSING | uffd.REGISTER_WP | uffd.REGISTER_MINOR)
            reply = self._request({"op": "alloc", "size": mapped, "addr": addr}, [uffd_fd, memfd])
        except BaseException:
            if addr:
                if uffd_fd >= 0:
                    try:
                        uffd.unregister(uffd_fd, addr, mapped)
                    except OSError:
                        pass
                native.munmap(addr, mapped)
            if uffd_fd >= 0:
                os.close(uffd_fd)
            os.close(memfd)
            raise
        region = Region(self, reply["region"], addr, nbytes, mapped, uffd_fd, memfd)
        self.regions.append(region)
        return region

    def status(self) -> dict:
        return self._request({"op": "status"})["status"]

    def inject(self, spec: dict) -> dict:
        """Change fault injection in a daemon started with USWAP_INJECT (tests only)."""
        return self._request({"op": "inject", "spec": spec})

    def close(self) -> None:
        for region in self.regions:
            region.close()
        self.regions = []
        self._sock.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(socket: str | None = None) -> Client:
    """Connect to the daemon at `socket` (else $USWAP_SOCKET, else /run/uswap/uswap.sock)."""
    return Client(socket)
