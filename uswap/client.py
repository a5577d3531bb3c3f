"""Public client API: connect to the daemon and allocate swappable regions.

    with uswap.connect() as c:
        r = c.alloc(1 << 30)
        a = numpy.frombuffer(r.buf, dtype=numpy.uint8)

A region is a sealed memfd mapped MAP_SHARED here and in the daemon, and
registered with this process's own userfaultfd (MISSING|WP|MINOR). Both fds are
sent to the daemon once; this process keeps its own copies open for the
region's life, because if the last copy of the uffd closed the range would be
unregistered and evicted pages would read as zeros.

Daemon restarts: when the daemon's end of the connection goes away while
this process still has registered regions (the daemon crashed, was killed,
or handed over to a new one; a drained daemon unregisters them first), a
C thread of this client (native/keeper.c) connects again with backoff (20 ms
doubling to 1 s, for at most RECONNECT_TIMEOUT seconds) and sends every
region's uffd and memfd in `adopt` messages: the new daemon serves them
again under the same ids. It is a C thread because a thread of the program
that faults on a swapped page meanwhile blocks, holding the GIL if it is
Python code. A request made while it reconnects waits for it.

Fork: every region is mapped MADV_DONTFORK, so a child that does not go
through Python's os.fork (subprocess, posix_spawn, a C library's fork) has
no mapping there at all. os.fork (and multiprocessing's fork start method)
runs this module's at-fork hooks: the daemon snapshots the regions before the
fork, copy-on-write (uswap/daemon/fork.py), and the child maps its own copy
at the same addresses on a new connection before os.fork returns in it, so
`region.buf` and views of it keep working there. A child whose hook fails
gets a message on stderr naming the region and why; that region is closed in
the child (its memory is not mapped) and the parent is unaffected.
"""
from __future__ import annotations

import ctypes
import fcntl
import os
import socket
import sys
import threading
import weakref

from uswap import config, native, protocol, uffd
from uswap._uffd_cffi import ffi as _kffi, lib as _klib

PAGE = 4096
MADV_DONTFORK = 10
MAP_FIXED_NOREPLACE = 0x100000
PROT_READ, PROT_WRITE = 1, 2
PROT_READ_WRITE = PROT_READ | PROT_WRITE
MAP_SHARED = 1
REGISTER_ALL = uffd.REGISTER_MISSING | uffd.REGISTER_WP | uffd.REGISTER_MINOR

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

# How long the keeper (native/keeper.c) tries to reach a daemon that takes
# the regions back after the connection broke, in seconds; a request made
# meanwhile waits as long.
RECONNECT_TIMEOUT = 600.0
# Requests sent again to the next daemon when the last one died before
# answering (Client._again_on_the_next_daemon).
REPEATABLE_OPS = frozenset({"alloc", "free", "status", "discard"})

# Live clients, for the at-fork hooks.
_clients: "weakref.WeakSet[Client]" = weakref.WeakSet()


def _dont_fork(addr: int, length: int) -> None:
    """A child forked without our hooks gets no mapping of [addr, +length)."""
    if _libc.madvise(addr, length, MADV_DONTFORK) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"madvise(MADV_DONTFORK): {os.strerror(e)}")


def _protections(addr: int, length: int) -> list[tuple[int, int, int]]:
    """(start, end, PROT_*) of every mapping in [addr, +length) of this
    process whose protection is not read-write (from /proc/self/maps): what
    the program mprotect'ed, which a forked child's new mapping must keep."""
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            span, perms = line.split(None, 2)[:2]
            lo, hi = (int(x, 16) for x in span.split("-"))
            lo, hi = max(lo, addr), min(hi, addr + length)
            if lo >= hi:
                continue
            prot = (PROT_READ if perms[0] == "r" else 0) | (PROT_WRITE if perms[1] == "w" else 0)
            if prot != PROT_READ_WRITE:
                out.append((lo, hi, prot))
    return out


def _map_at(fd: int, addr: int, length: int) -> None:
    """Map fd shared at exactly addr, which must be free."""
    got = _libc.mmap(addr, length, PROT_READ_WRITE, MAP_SHARED | MAP_FIXED_NOREPLACE, fd, 0)
    if got in (None, ctypes.c_void_p(-1).value):
        e = ctypes.get_errno()
        raise OSError(e, f"mmap at {addr:#x} (+{length}): {os.strerror(e)}")
    if got != addr:  # a kernel without MAP_FIXED_NOREPLACE takes it as a hint
        native.munmap(got, length)
        raise OSError(0, f"mmap at {addr:#x}: the kernel placed it at {got:#x}")


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
        self.lost: str | None = None  # why a forked child has no copy of this region

    def _lose(self, reason: str) -> None:
        """In a forked child: this region could not be set up. Nothing is
        mapped at its address; say so once, loudly, and make buf unusable."""
        self.closed = True
        self.lost = reason
        try:
            self.buf.release()
        except BufferError:
            pass  # views of it exist; touching them faults (nothing is mapped)
        sys.stderr.write(f"uswap: region at {self.addr:#x} ({self.size} bytes) is not available in"
                         f" forked child pid {os.getpid()}: {reason}\n")

    def _attach_in_child(self, client: "Client", token: str, prots: list[tuple[int, int, int]]) -> None:
        """Map the child's copy (a memfd the daemon made at fork) at our
        address with the parent's protections (`prots`), register a new uffd
        over it and hand that to the daemon."""
        reply, fds = client._exchange({"op": "fork_child", "token": token, "region": self.id})
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise UswapError(f"fork_child: expected the region's memfd, got {len(fds)} fds")
        memfd, uffd_fd, mapped = fds[0], -1, False
        try:
            _map_at(memfd, self.addr, self._mapped)
            mapped = True
            _dont_fork(self.addr, self._mapped)
            uffd_fd = uffd.open_uffd()
            uffd.register(uffd_fd, self.addr, self._mapped, REGISTER_ALL)
            for lo, hi, prot in prots:
                if _libc.mprotect(lo, hi - lo, prot) != 0:
                    e = ctypes.get_errno()
                    raise OSError(e, f"mprotect({lo:#x}, {hi - lo}, {prot}): {os.strerror(e)}")
            reply, _ = client._exchange({"op": "fork_attach", "token": token, "region": self.id}, [uffd_fd])
        except BaseException:
            if mapped:
                if uffd_fd >= 0:
                    try:
                        uffd.unregister(uffd_fd, self.addr, self._mapped)
                    except OSError:
                        pass
                native.munmap(self.addr, self._mapped)
            if uffd_fd >= 0:
                os.close(uffd_fd)
            os.close(memfd)
            raise
        self.id = reply["region"]
        self._uffd = uffd_fd
        self._memfd = memfd

    def discard(self, offset: int, length: int) -> None:
        """Drop [offset, offset+length) of the region, as MADV_DONTNEED drops
        private memory: the pages' contents and store slots are freed, and
        they read as zeros on their next touch. Both values are page aligned
        and inside the region. Returns once the pages have left memory."""
        self._client._request({"op": "discard", "region": self.id, "offset": offset, "length": length})

    def close(self) -> None:
        """Give the memory back. The region's contents are gone afterwards.

        Order matters: unregister first, so unmapping raises no event that
        nobody would read; then the mapping is replaced by an inaccessible
        reservation, the daemon told, and only then the range unmapped and
        the fds closed. Until the daemon has dropped the region it may still
        act on the range (the access sampler's MADV_PAGEOUT, sampling.py):
        kept reserved, the range cannot meanwhile hold new memory of ours
        that the advice would push to kernel swap.
        """
        if self.closed:
            return
        self.closed = True
        self._client._unkeep(self)  # before its fds close (keeper.c's invariant)
        self.buf.release()
        try:
            uffd.unregister(self._uffd, self.addr, self._mapped)
        except OSError:
            pass
        try:
            native.reserve(self.addr, self._mapped)
        except OSError:
            pass  # as libuswap: the (unregistered) mapping stays until the munmap below
        try:
            self._client._request({"op": "free", "region": self.id})
        except (UswapError, OSError, EOFError):
            pass  # daemon gone: it frees the region when it sees our socket close
        native.munmap(self.addr, self._mapped)
        os.close(self._uffd)
        os.close(self._memfd)

    def __enter__(self) -> "Region":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Client:
    """A connection to the uswap daemon."""

    def __init__(self, socket_path: str | None = None, name: str | None = None) -> None:
        """`name`: what status, metrics and `uswap top` call this client
        (1 to 64 printable characters); by default the process's name (comm)."""
        self.socket_path = config.socket_path(socket_path)
        self.name = name
        self._lock = threading.Lock()
        self.regions: list[Region] = []
        self._fork_locked = False  # the before-fork hook holds _lock
        self._fork_state: tuple | str | None = None  # fork_begin's (token, keep-alive fd, ids) or error
        # The reconnect thread (native/keeper.c), started with the first
        # region, and the process it belongs to (a forked child starts its own).
        self._keeper = _kffi.NULL
        self._keeper_pid = 0
        self._connect()
        _clients.add(self)

    def _connect(self) -> None:
        """A connection of our own, greeted (at creation, and in a forked child)."""
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self._sock.connect(self.socket_path)
        except OSError as e:
            self._sock.close()
            raise UswapError(f"cannot reach the uswap daemon at {self.socket_path}: {e.strerror}"
                             " (is `uswap run` running? set --socket or USWAP_SOCKET)") from None
        try:
            hello = {"op": "hello", "version": protocol.VERSION}
            if self.name is not None:
                hello["name"] = self.name
            # Straight over the socket, not through _exchange: a lost
            # connection there means "send again to the next daemon", but
            # here it means the daemon refused us (see below).
            protocol.send(self._sock, hello)
            reply, extra = protocol.recv(self._sock)
        except (OSError, EOFError, protocol.ProtocolError) as e:
            # A daemon that refuses a connection (busy, a per-uid limit)
            # answers and closes before reading our hello, so the hello can
            # fail with EPIPE: its reason still waits in our socket.
            reason = self._refusal_left_behind()
            self._sock.close()
            self._sock = None
            raise UswapError(reason or f"the uswap daemon at {self.socket_path} closed the connection"
                             f" during the handshake ({e})") from None
        for fd in extra:
            os.close(fd)
        if not reply.get("ok"):
            self._sock.close()
            self._sock = None
            raise UswapError(reply.get("error", "hello refused"))
        self.daemon_version = reply["version"]

    def _exchange(self, msg: dict, fds: list[int] | None = None) -> tuple[dict, list[int]]:
        """One request and its reply, with the fds it carries (the caller's).
        The caller holds _lock, or is the only thread (a fork hook)."""
        if self._sock is None:
            self._connect()  # a forked child's first request on a region-less client
        self._take_new_connection()
        try:
            protocol.send(self._sock, msg, fds)
            reply, extra = protocol.recv(self._sock)
        except (ConnectionError, EOFError) as e:
            # The daemon's end went away (EPIPE, ECONNRESET, EOF); any other
            # error is this request's own and no reconnect would mend it.
            reply, extra = self._again_on_the_next_daemon(msg, fds, e)
        for fd in extra:
            # Received fds are inheritable; ours must not leak into a program
            # another thread execs meanwhile (a keep-alive fd would hold a
            # fork snapshot for that program's life).
            os.set_inheritable(fd, False)
        if not reply.get("ok"):
            for fd in extra:
                os.close(fd)
            raise UswapError(reply.get("error", "request refused"))
        return reply, extra

    # ---------------------------------------------------------------- daemon restarts

    def _again_on_the_next_daemon(self, msg: dict, fds: list[int] | None,
                                  error: BaseException) -> tuple[dict, list[int]]:
        """The daemon went away during `msg` (killed, crashed, handed over),
        perhaps before the keeper noticed: wait for the keeper's connection
        to the next daemon and send `msg` there. Only requests that are
        right to repeat are: an alloc the dead daemon made but never answered
        left a region waiting for adoption with this memfd, and the next
        daemon answers the repeated alloc with that region (ops.py _alloc);
        a free goes again marked "repeated", so the next daemon drops the
        region if it waits there and is content when it is unknown (the
        dead daemon freed it); status and discard are the same twice. Anything else (fork
        requests: their snapshot died with the daemon) is an error naming
        the request."""
        op = msg.get("op")
        if op not in REPEATABLE_OPS or not self._mine():
            raise UswapError(f"{op}: the uswap daemon at {self.socket_path} went away before"
                             f" answering ({error})") from None
        fd = _klib.us_keeper_await_sock(self._keeper, RECONNECT_TIMEOUT)
        if fd < 0:
            raise UswapError(f"{op}: the uswap daemon at {self.socket_path} went away before answering"
                             f" ({error}), and no daemon took this client's regions back") from None
        old, self._sock = self._sock, socket.socket(fileno=fd)
        old.close()
        if op == "free":
            msg = dict(msg, repeated=True)
        protocol.send(self._sock, msg, fds)
        return protocol.recv(self._sock)

    def _mine(self) -> bool:
        return self._keeper != _kffi.NULL and self._keeper_pid == os.getpid()

    def _keep(self, region: Region) -> None:
        """Have the keeper re-send `region` to a new daemon if this one goes."""
        if not self._mine():
            k = _klib.us_keeper_new(self.socket_path.encode(), self._sock.fileno(), RECONNECT_TIMEOUT)
            if k == _kffi.NULL:
                raise OSError("cannot start the uswap client's reconnect thread")
            self._keeper, self._keeper_pid = k, os.getpid()
        if _klib.us_keeper_add(self._keeper, region.id, region.addr, region._mapped, region._uffd,
                               region._memfd) < 0:
            raise MemoryError("uswap client: cannot record the region for reconnects")

    def _unkeep(self, region: Region) -> None:
        if self._mine():
            _klib.us_keeper_remove(self._keeper, region.addr)

    def _take_new_connection(self) -> None:
        """The keeper's new connection, if it made one (waiting while it
        reconnects): ours from now on; the dead one is closed."""
        if not self._mine():
            return
        fd = _klib.us_keeper_take_sock(self._keeper, RECONNECT_TIMEOUT)
        if fd >= 0:
            old, self._sock = self._sock, socket.socket(fileno=fd)
            old.close()

    @property
    def reconnects(self) -> int:
        """How many times the keeper connected again and re-sent the regions."""
        return _klib.us_keeper_reconnects(self._keeper) if self._mine() else 0

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
            reply, extra = self._exchange(msg, fds)
        for fd in extra:
            os.close(fd)
        return reply

    # ---------------------------------------------------------------- fork

    def _fork_prepare(self) -> None:
        """Before fork (parent): hold the connection (no other thread may be
        mid-request across the fork) and have the daemon snapshot our live
        regions for the child."""
        self._lock.acquire()
        self._fork_locked = True
        self._fork_state = None
        live = [r for r in self.regions if not r.closed]
        if not live or self._sock is None:
            return
        try:
            reply, fds = self._exchange({"op": "fork_begin", "regions": [r.id for r in live]})
            if len(fds) != 1:
                for fd in fds:
                    os.close(fd)
                raise UswapError(f"fork_begin: expected a keep-alive fd, got {len(fds)}")
            # The child maps a new memfd over each region: it must keep what
            # the program mprotect'ed, as a forked child keeps its mappings'.
            prots = {r.id: _protections(r.addr, r._mapped) for r in live}
            self._fork_state = (reply["token"], fds[0], set(reply["regions"]), prots)
        except Exception as e:  # a hook must not raise: the child is told instead
            self._fork_state = f"fork_begin failed in the parent: {e!r}"

    def _fork_parent(self) -> None:
        """After fork (parent): the child holds its own copy of the keep-alive fd."""
        state, self._fork_state = self._fork_state, None
        if isinstance(state, tuple):
            os.close(state[1])
        if self._fork_locked:
            self._fork_locked = False
            self._lock.release()

    def _fork_child(self) -> None:
        """After fork (child): leave the parent's connection and fds alone
        (closing our copies only), then attach the snapshot on a new connection."""
        state, self._fork_state = self._fork_state, None
        self._fork_locked = False
        self._lock = threading.Lock()
        # The parent's keeper is not ours (its thread is not in this process,
        # its mutex may be held): left alone; one of our own starts below.
        self._keeper, self._keeper_pid = _kffi.NULL, 0
        if self._sock is not None:
            self._sock.close()  # our copy of the parent's connection; nothing is sent on it
            self._sock = None
        live = [r for r in self.regions if not r.closed]
        for region in live:
            for fd in (region._uffd, region._memfd):
                os.close(fd)  # the parent's uffd and memfd: our copies only
            region._uffd = region._memfd = -1
        keep_fd = state[1] if isinstance(state, tuple) else -1
        try:
            if not live:
                return  # connect on first use
            if not isinstance(state, tuple):
                raise UswapError(state or "no fork snapshot was taken")
            token, _, ids, prots = state
            self._connect()
            for region in live:
                if region.id not in ids:
                    region._lose("the daemon did not snapshot it at fork")
                    continue
                try:
                    region._attach_in_child(self, token, prots.get(region.id, []))
                    self._keep(region)
                except Exception as e:  # a hook must not raise; the region is unusable, say why
                    region._lose(repr(e))
        except Exception as e:
            for region in live:
                if not region.closed:
                    region._lose(repr(e))
        finally:
            if keep_fd >= 0:
                os.close(keep_fd)  # our snapshot is attached (or never will be)
        self.regions = [r for r in self.regions if not r.closed]

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
            uffd.register(uffd_fd, addr, mapped, REGISTER_ALL)
            _dont_fork(addr, mapped)
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
        with self._lock:
            self._keep(region)
        return region

    def status(self) -> dict:
        return self._request({"op": "status"})["status"]

    def set_budget(self, max_resident: int | str) -> dict:
        """Change the running daemon's budget: a size (bytes, or "512M"), or
        "auto" to follow the host again. Returns the reply (old_bytes,
        max_resident_bytes, mode); UswapError names a refused value."""
        return self._request({"op": "budget", "max_resident": max_resident})

    def inject(self, spec: dict) -> dict:
        """Change fault injection in a daemon started with USWAP_INJECT (tests only)."""
        return self._request({"op": "inject", "spec": spec})

    def close(self) -> None:
        for region in self.regions:
            region.close()
        self.regions = []
        _clients.discard(self)
        if self._mine():
            # A deliberate close: the keeper ends first, so the connection
            # closing below is not taken for the daemon going away.
            _klib.us_keeper_stop(self._keeper)
            self._keeper = _kffi.NULL
        if self._sock is not None:
            self._sock.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(socket: str | None = None, name: str | None = None) -> Client:
    """Connect to the daemon at `socket` (else $USWAP_SOCKET, else
    /run/uswap/uswap.sock), as `name` (default: the process's name)."""
    return Client(socket, name)


def _before_fork() -> None:
    for client in list(_clients):
        client._fork_prepare()


def _after_fork_parent() -> None:
    for client in list(_clients):
        client._fork_parent()


def _after_fork_child() -> None:
    for client in list(_clients):
        client._fork_child()


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_parent, after_in_child=_after_fork_child)
