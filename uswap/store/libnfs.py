"""The libnfs binding every nfs:// module shares: the cffi module built from
native/nfs.c, and the text libnfs keeps for a context's last error (one
place, for the store and for its lock file)."""
from __future__ import annotations

from uswap._nfs_cffi import ffi, lib

__all__ = ["ffi", "lib", "errtext"]


def errtext(ctx: object) -> str:
    """The libnfs error message of `ctx`'s last failed call, stripped."""
    return ffi.string(lib.us_nfs_error(ctx)).decode("utf-8", "replace").strip()
