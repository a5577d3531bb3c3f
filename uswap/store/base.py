"""The one small interface every backing store implements.

A store is a fixed-size array of bytes addressed by offset.  The daemon calls it
from several I/O threads at once, so every method must be thread-safe, and each
call blocks its own thread only (never the fault loop, which never calls a store).

Durability contract (docs/design.md invariant 1): `write` returns only once the bytes are
stable on the store, i.e. they would survive a crash or restart of the store's
server. A page is dropped from memory on the strength of that return.
"""
from __future__ import annotations

import abc
import errno

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

    def close(self) -> None:
        """Release the store (files, connections). Idempotent."""

    def describe(self) -> dict:
        return {"url": self.url, "size_bytes": self.size_bytes,
                "late_writes_possible": self.late_writes_possible}
