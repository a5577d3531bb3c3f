"""The lock file of an ``nfs://`` store: ``FILE.lock`` in the export.

See uswap/store/lock.py for the whole locking rule. Taking it: create the
file exclusively (NFSv3 exclusive CREATE: of several daemons racing, one
wins); if it exists, read the holder it names. The caller holds this host's
lock for the URL (lock.host_lock), so a holder of this host is a daemon that
is gone (died, or of an earlier boot): its file is taken over. Another
host's holder is refused.
"""
from __future__ import annotations

import errno
import logging
import os
import time

from uswap.store.libnfs import errtext, ffi, lib
from uswap.store.lock import Holder, busy_error

log = logging.getLogger(__name__)

#: How long a lock file that names no holder (another host is between its
#: exclusive CREATE and its WRITE) is re-read before it is refused as damaged.
UNNAMED_PATIENCE = 2.0
MAX_RECORD = 4096


def _open(ctx, path: str, flags: int) -> tuple[int, object]:
    fhp = ffi.new("struct nfsfh **")
    r = lib.us_nfs_open(ctx, path.encode(), flags, 0o600, fhp)
    return r, (fhp[0] if r == 0 else None)


def _addr(buf) -> int:
    return int(ffi.cast("uintptr_t", buf))


def _write_record(ctx, fh, data: bytes) -> int:
    buf = ffi.new("char[]", data)
    r = lib.us_nfs_pwrite_full(ctx, fh, _addr(buf), len(data), 0)
    return int(r)


def _read_holder(ctx, path: str) -> tuple[int, Holder | None]:
    """(0, holder or None) or (-errno, None)."""
    r, fh = _open(ctx, path, os.O_RDONLY)
    if r < 0:
        return r, None
    try:
        buf = ffi.new("char[]", MAX_RECORD)
        n = lib.us_nfs_pread_full(ctx, fh, _addr(buf), MAX_RECORD, 0)
        if n < 0:
            return int(n), None
        return 0, Holder.parse(ffi.buffer(buf, n)[:])
    finally:
        lib.us_nfs_close(ctx, fh)


def take(url: str, export: str, ctx, path: str) -> str:
    """Take the lock file of the store at `path` in `export`; returns its path.

    Raises StoreBusy naming the holder, or ValueError naming the file when it
    cannot be created or read."""
    lock_path = path + ".lock"
    where = f"{lock_path} in export {export}"
    me = Holder.me().to_bytes()
    unnamed_since = None
    while True:
        r, fh = _open(ctx, lock_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_SYNC)
        if r == 0:
            w = _write_record(ctx, fh, me)
            lib.us_nfs_close(ctx, fh)
            if w < 0:
                raise ValueError(f"NFS store {url}: cannot write its lock file {where}: "
                                 f"{os.strerror(-w)} ({errtext(ctx)})")
            return lock_path
        if r != -errno.EEXIST:
            raise ValueError(f"NFS store {url}: cannot create its lock file {where}: "
                             f"{os.strerror(-r)} ({errtext(ctx)})")
        r, holder = _read_holder(ctx, lock_path)
        if r == -errno.ENOENT:
            continue  # released between our CREATE and our read: try again
        if r < 0:
            raise ValueError(f"NFS store {url}: cannot read its lock file {where}: "
                             f"{os.strerror(-r)} ({errtext(ctx)})")
        if holder is not None and holder.is_this_host():
            _take_over(url, ctx, lock_path, where, holder, me)
            return lock_path
        if holder is None:
            # Another host between its CREATE and its WRITE, or a damaged file.
            now = time.monotonic()
            unnamed_since = unnamed_since if unnamed_since is not None else now
            if now - unnamed_since < UNNAMED_PATIENCE:
                time.sleep(0.05)  # polling another host's file: nothing to wait on
                continue
        raise busy_error(url, holder, where + (
            "; if that daemon is gone, remove the lock file on the server" if holder else
            "; it names no holder: remove it on the server if no daemon uses the store"))


def _take_over(url: str, ctx, lock_path: str, where: str, holder: Holder, me: bytes) -> None:
    """Rewrite a lock file left by a daemon of this host. Safe without an
    atomic compare: this host's daemons are ordered by the host lock we hold,
    and another host reading the file sees this host's name either way."""
    r, fh = _open(ctx, lock_path, os.O_RDWR | os.O_TRUNC | os.O_SYNC)
    if r < 0:
        raise ValueError(f"NFS store {url}: cannot take over its lock file {where}: "
                         f"{os.strerror(-r)} ({errtext(ctx)})")
    w = _write_record(ctx, fh, me)
    lib.us_nfs_close(ctx, fh)
    if w < 0:
        raise ValueError(f"NFS store {url}: cannot write its lock file {where}: "
                         f"{os.strerror(-w)} ({errtext(ctx)})")
    log.warning("NFS store %s: took over the lock left by %s, which is gone", url, holder.describe())


def release(ctx, lock_path: str) -> None:
    """Remove the lock file (best effort: a failure leaves a file of this
    host, which the next daemon here takes over)."""
    r = lib.us_nfs_unlink(ctx, lock_path.encode())
    if r < 0 and r != -errno.ENOENT:
        log.warning("cannot remove the store lock file %s: %s", lock_path, os.strerror(-r))
