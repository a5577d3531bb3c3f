"""The one small interface every backing store implements.

A store is a fixed-size array of bytes addressed by offset, locked by the one
daemon that opened it until it is closed (uswap/store/lock.py).  Once the daemon
runs, its methods are called on the Python I/O threads (uswap/daemon/iopool.py),
several at once, so every method must be thread-safe; each call blocks its own
thread only, never the engine thread, which never calls a store (only start-up
does, writing the store header before the event loop runs).

A store that declares native I/O (Store.native_io: the file and nfs:// stores)
has its data path run by C threads instead -- the C I/O pool (native/iopool.c)
and the fault threads' swap-ins (native/fastpath.c) -- which reach its fd or
its lent libnfs connections directly, never through these methods.  Its Python
methods then serve the rest: the write probe after failed writes
(Engine._probe_store) and an nfs:// job while no lent connection is idle.

Durability contract (docs/design.md invariant 1): `write` returns only once the bytes are
stable on the store, i.e. they would survive a crash or restart of the store's
server. A page is dropped from memory on the strength of that return.
"""
from __future__ import annotations

import abc
import errno
from dataclasses import dataclass
from typing import Protocol

#: Errors with which a write is refused outright: the store (or its server)
#: answered about the request itself, or the request never left this host.
#: Such a write is over and can never land later. Every other error -- a
#: timeout, a connection reset or refused mid-request, a soft mount's EIO, an
#: interrupted call, anything unknown -- leaves the request possibly queued
#: somewhere on its way and still to be executed.
WRITE_REFUSED = frozenset({
    errno.ENOSPC, errno.EDQUOT, errno.EFBIG,    # no room: answered
    errno.EROFS, errno.EACCES, errno.EPERM,     # not allowed: answered
    errno.ESTALE,                               # the file handle is gone: answered
    errno.EINVAL, errno.EBADF,                  # refused before sending (bad range, store closed)
})


class ContextLender(Protocol):
    """Connections a store lends to native code, one job at a time
    (NfsStore.lend/checkout/checkin). A lent connection has `ctx` and `fh`,
    the libnfs context and file handle the C threads call with."""

    def lend(self, n: int) -> None:
        """Keep up to `n` connections ready for checkout(); never blocks."""

    def checkout(self):
        """An idle connection, now the caller's alone, or None; never blocks."""

    def checkin(self, conn, error: OSError | None) -> None:
        """Take `conn` back with the error of the call made on it (None: it
        succeeded)."""

    def io_error(self, conn, op: str, length: int, offset: int, err: int) -> OSError:
        """The OSError for a failed `op` on `conn` (before conn is checked in)."""


@dataclass(frozen=True)
class NativeIo:
    """How native code (native/iopool.c, native/fastpath.c) may do a store's
    reads and writes itself, without calling back into Python: the store
    promises that what the C threads do through this is exactly what its own
    read() and write() do. Build with on_fd() or on_nfs()."""

    #: FD or NFS.
    kind: str
    #: kind FD: an O_DIRECT file descriptor; pread/pwrite of whole pages on it
    #: are the store's read/write.
    fd: int = -1
    #: kind NFS: lends libnfs connections to the store's file, on which
    #: pread/pwrite are the store's read/write.
    lender: ContextLender | None = None

    FD = "fd"
    NFS = "nfs"

    @classmethod
    def on_fd(cls, fd: int) -> "NativeIo":
        if fd < 0:
            raise ValueError(f"native I/O on fd {fd}: not an open file descriptor")
        return cls(kind=cls.FD, fd=fd)

    @classmethod
    def on_nfs(cls, lender: ContextLender) -> "NativeIo":
        return cls(kind=cls.NFS, lender=lender)


def does_own_io(store: "Store", cls: type["Store"]) -> bool:
    """True when `store` reads and writes with `cls`'s own read and write. A
    store class that describes its I/O to native code (native_io) asks this
    first: a subclass (or a mixin before it) that replaced read or write does
    I/O the C threads would skip, so it must not inherit that description."""
    actual = type(store)
    return actual.read is cls.read and actual.write is cls.write


def require_native_io(store: "Store", user: str) -> NativeIo:
    """The store's native I/O, which `user` (a C component) is about to do;
    ValueError when the store declares none (its I/O must stay in Python)."""
    native = store.native_io()
    if native is None:
        raise ValueError(f"{user}: store {store.url} ({type(store).__name__}) declares no native I/O;"
                         " its reads and writes must go through its Python methods")
    return native


class Store(abc.ABC):
    """Fixed-size, page-aligned backing store."""

    #: Printable location, e.g. ``/var/lib/uswap/swapfile`` or ``nfs://host/export/file``.
    url: str
    #: Usable size in bytes (a multiple of 4096).
    size_bytes: int
    #: Required alignment of buffer address, length and offset for read/write.
    alignment: int = 4096
    #: True when a write that raised may still reach the store later (an NFS
    #: request that timed out can sit in the server's queue; so can one whose
    #: connection broke, or that a soft mount gave up on with EIO). The daemon
    #: then keeps the slots out of use for a while instead of reusing them at
    #: once, so a late write can never land on a slot holding newer data
    #: (invariant 3). See write_may_land_late.
    late_writes_possible: bool = False

    @abc.abstractmethod
    def write(self, addr: int, length: int, offset: int) -> None:
        """Write `length` bytes from memory at address `addr` to `offset`.

        Returns only when the data is stable; raises OSError (errno set) on any
        failure, including a short write or a timeout.
        """

    @abc.abstractmethod
    def read(self, addr: int, length: int, offset: int) -> None:
        """Read exactly `length` bytes at `offset` into memory at address `addr`.

        Raises OSError on failure, a short read or a timeout.
        """

    def write_may_land_late(self, err: OSError) -> bool:
        """True when the write that failed with `err` may still be executed
        later: the store can hold requests beyond a failed call
        (late_writes_possible) and the error is not an outright refusal
        (WRITE_REFUSED)."""
        return self.late_writes_possible and err.errno not in WRITE_REFUSED

    def native_io(self) -> NativeIo | None:
        """How native code may do this store's I/O itself, or None: then
        every read and write goes through this object's methods, on Python
        threads. Each store class answers for itself (see does_own_io); the
        default is None, so a store whose I/O has Python in it (the fault
        injector, any wrapper) is never bypassed."""
        return None

    def close(self) -> None:
        """Release the store (files, connections). Idempotent."""

    def describe(self) -> dict:
        return {"url": self.url, "size_bytes": self.size_bytes,
                "late_writes_possible": self.late_writes_possible}
