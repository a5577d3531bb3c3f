"""Backing stores behind one small interface (uswap.store.base.Store)."""
from __future__ import annotations

import importlib.util

from uswap.store.base import Store

#: The Debian package an nfs:// store needs at build time (native/libnfs_option.py).
LIBNFS_PACKAGE = "libnfs-dev"


def nfs_built() -> bool:
    """Whether this uswap was built with libnfs (the optional uswap._nfs_cffi)."""
    return importlib.util.find_spec("uswap._nfs_cffi") is not None


def open_store(backing: str, size_bytes: int, nfs_timeout: float = 10.0) -> Store:
    """Open the store named by --backing: a path (O_DIRECT file) or nfs://HOST/EXPORT/FILE.

    Raises ValueError with a message naming the problem."""
    if backing.startswith("nfs://"):
        if not nfs_built():
            raise ValueError(f"backing: {backing}: this uswap was built without libnfs, which nfs:// stores"
                             f" need; install the Debian package {LIBNFS_PACKAGE} and build uswap again"
                             " (scripts/install or scripts/setup), or use a file path (a local disk or a"
                             " kernel NFS mount)")
        from uswap.store.nfs import NfsStore
        return NfsStore.open(backing, size_bytes, timeout_ms=int(nfs_timeout * 1000))
    if "://" in backing:
        raise ValueError(f"backing: {backing!r} has an unknown scheme; use /path/to/swapfile or nfs://host/export/file")
    from uswap.store.file import FileStore
    return FileStore.open(backing, size_bytes)


__all__ = ["Store", "open_store"]
