"""Backing stores behind one small interface (uswap.store.base.Store)."""
from __future__ import annotations

from uswap.store.base import Store


def open_store(backing: str, size_bytes: int, nfs_timeout: float = 10.0) -> Store:
    """Open the store named by --backing: a path (O_DIRECT file) or nfs://HOST/EXPORT/FILE.

    Raises ValueError with a message naming the problem."""
    if backing.startswith("nfs://"):
        from uswap.store.nfs import NfsStore
        return NfsStore.open(backing, size_bytes, timeout_ms=int(nfs_timeout * 1000))
    if "://" in backing:
        raise ValueError(f"backing: {backing!r} has an unknown scheme; use /path/to/swapfile or nfs://host/export/file")
    from uswap.store.file import FileStore
    return FileStore.open(backing, size_bytes)


__all__ = ["Store", "open_store"]
