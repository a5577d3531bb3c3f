"""The direct-I/O file store: a fixed-size file on a local disk or a kernel NFS
mount, opened O_DIRECT so pages bypass the page cache both ways (a swap file
that went through the page cache would need memory to free memory)."""
from __future__ import annotations

import errno
import os
import stat

from uswap import native
from uswap._dio_cffi import lib
from uswap.store import header, lock
from uswap.store.base import NativeIo, Store, does_own_io

TMPFS_MAGIC = 0x01021994
RAMFS_MAGIC = 0x858458F6
NFS_MAGIC = 0x6969
# Filesystems known to buffer O_DIRECT (accept it but go through memory).
BUFFERING_FS = {TMPFS_MAGIC: "tmpfs", RAMFS_MAGIC: "ramfs"}
# Network filesystems (statfs f_type, linux/magic.h and the filesystems' own
# headers), on which a write that failed (timed out, a soft mount's EIO, a
# connection lost mid-request) may still be executed by the server later.
NETWORK_FS = {
    NFS_MAGIC: "nfs",
    0x517B: "smb",
    0xFF534D42: "cifs",
    0xFE534D42: "smb2",
    0x00C36400: "ceph",
    0x01021997: "9p",
    0x6B414653: "afs",
    0x0BD00BD0: "lustre",
    0x47504653: "gpfs",
    0x65735546: "fuse",  # sshfs, glusterfs...: the backend may be remote; assume so
}


def late_writes_possible_on(fs_type: int) -> bool:
    """Whether a failed write on a filesystem of statfs type `fs_type` may
    still land later: true for network filesystems (NETWORK_FS), false for
    local disks, where a write that returned has ended."""
    return fs_type in NETWORK_FS


class FileStore(Store):
    def __init__(self, path: str, fd: int, size_bytes: int) -> None:
        self.url = path
        self.path = path
        self.fd = fd
        self.size_bytes = size_bytes
        self.store_lock: lock.FlockLock | None = None  # set by open(); released by close()

    @classmethod
    def open(cls, path: str, size_bytes: int) -> "FileStore":
        """Create or open the store file, allocate it up front, check direct I/O.

        Raises ValueError with a clear message for anything unusable; never
        truncates or overwrites an existing file (the header check in
        uswap.store.header refuses foreign files before any write), and
        removes the file again if it created it. The lock file stays (lock.py).
        """
        if not os.path.isabs(path):
            raise ValueError(f"backing: {path!r} is not an absolute path; use /path/to/swapfile or nfs://host/export/file")
        parent = os.path.dirname(path)
        if not os.path.isdir(parent):
            try:
                os.makedirs(parent, mode=0o700, exist_ok=True)
            except OSError as e:
                raise ValueError(f"backing: cannot create directory {parent!r}: {e.strerror}") from None
        # One daemon per store (uswap/store/lock.py), taken before the file is
        # touched: a second daemon never resizes or reads a store in use.
        store_lock = lock.lock_file(path)
        try:
            return cls._open_locked(path, size_bytes, store_lock)
        except BaseException:
            store_lock.release()
            raise

    @classmethod
    def _open_locked(cls, path: str, size_bytes: int, store_lock: lock.FlockLock) -> "FileStore":
        # Under the store lock, so no other daemon creates it meanwhile: a
        # file this call creates is removed again if the store is refused.
        created = not os.path.lexists(path)
        fd = lib.us_open_direct(path.encode(), os.O_RDWR | os.O_CREAT, 0o600)
        if fd < 0:
            err = -fd
            if err == errno.ELOOP:
                raise ValueError(f"backing: {path!r} is a symbolic link; uswap does not follow links for its store")
            if err == errno.EINVAL:
                raise ValueError(f"backing: the filesystem of {path!r} does not support O_DIRECT")
            raise ValueError(f"backing: cannot open {path!r}: {os.strerror(err)}")
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ValueError(f"backing: {path!r} is not a regular file")
            fstype = lib.us_fs_type(fd)
            if fstype in BUFFERING_FS:
                raise ValueError(
                    f"backing: {path!r} is on {BUFFERING_FS[fstype]}, which accepts O_DIRECT but"
                    " buffers it in memory; put the store on a disk or an NFS mount")
            if st.st_size > 0:
                header.check_existing(_first_page(path), path)
            store = cls(path, fd, size_bytes)
            store.store_lock = store_lock
            # A kernel NFS (or other network) mount: a failed write's slots
            # are quarantined (Store.late_writes_possible).
            store.late_writes_possible = late_writes_possible_on(fstype)
            if st.st_size < size_bytes:
                try:
                    os.posix_fallocate(fd, st.st_size, size_bytes - st.st_size)
                except OSError as e:
                    raise ValueError(f"backing: cannot allocate {size_bytes} bytes for {path!r}: {e.strerror}") from None
            if fstype != NFS_MAGIC:
                store._check_really_direct()
            return store
        except BaseException:
            os.close(fd)
            if created:
                os.unlink(path)
            raise

    def _check_really_direct(self) -> None:
        """A filesystem that really does direct I/O refuses a misaligned read;
        one that buffers (whatever it claims) accepts it. Reading is harmless.
        Kernel NFS is exempt: its direct I/O is byte-granular."""
        buf = native.AlignedBuffer(8192)
        try:
            # ext4 answers reads of unwritten extents without any I/O, skipping
            # the alignment check: make page 0 real first. Writing zeros over a
            # page that reads as zeros loses nothing.
            self.read(buf.addr, 4096, 0)
            if not any(buf.view()[:4096]):
                self.write(buf.addr, 4096, 0)
            r = lib.us_pread_full(self.fd, buf.addr + 1, 512, 1)
        finally:
            buf.free()
        if r >= 0:
            raise ValueError(
                f"backing: the filesystem of {self.path!r} accepted a misaligned O_DIRECT read,"
                " so it buffers I/O in memory; put the store on a disk or an NFS mount")

    def write(self, addr: int, length: int, offset: int) -> None:
        r = lib.us_pwrite_full(self.fd, addr, length, offset)
        if r < 0:
            raise OSError(-r, f"pwrite {self.path} at {offset}: {os.strerror(-r)}")

    def read(self, addr: int, length: int, offset: int) -> None:
        r = lib.us_pread_full(self.fd, addr, length, offset)
        if r < 0:
            raise OSError(-r, f"pread {self.path} at {offset}: {os.strerror(-r)}")

    def native_io(self) -> NativeIo | None:
        """pread/pwrite of whole pages on the O_DIRECT fd, which is all that
        read and write do; None once closed, or for a subclass that replaced
        read or write (its I/O is no longer just that)."""
        if self.fd < 0 or not does_own_io(self, FileStore):
            return None
        return NativeIo.on_fd(self.fd)

    def close(self) -> None:
        """Close the file, then release the store lock. Idempotent."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.store_lock is not None:
            self.store_lock.release()
            self.store_lock = None


def _first_page(path: str) -> bytes:
    """Up to 4 KiB from the start of the file, read without O_DIRECT (a file
    shorter than a block cannot be read with it)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return os.pread(fd, 4096, 0)
    finally:
        os.close(fd)
