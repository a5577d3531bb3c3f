"""The one small interface every backing store implements.

A store is a fixed-size array of bytes addressed by offset.  The daemon calls it
from several I/O threads at once, so every method must be thread-safe, and each
call blocks its own thread only (never the fault loop, which never calls a store).

Durability contract (DESIGN invariant 1): `write` returns only once the bytes are
stable on the store, i.e. they would survive a crash or restart of the store's
server. A page is dropped from memory on the strength of that return.
"""
from __future__ import annotations

import abc


class Store(abc.ABC):
    """Fixed-size, page-aligned backing store."""

    #: Printable location, e.g. ``/var/lib/uswap/swapfile`` or ``nfs://host/export/file``.
    url: str
    #: Usable size in bytes (a multiple of 4096).
    size_bytes: int
    #: Required alignment of buffer address, length and offset for read/write.
    alignment: int = 4096
    #: True when a write that raised may still reach the store later (an NFS
    #: request that timed out can sit in the server's queue). The daemon then
    #: keeps the slot out of use for a while instead of reusing it at once,
    #: so a late write can never land on a slot holding newer data (invariant 3).
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

    def close(self) -> None:
        """Release the store (files, connections). Idempotent."""

    def describe(self) -> dict:
        return {"url": self.url, "size_bytes": self.size_bytes}
