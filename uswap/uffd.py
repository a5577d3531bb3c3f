"""Python face of the userfaultfd shim: constants, feature check, ioctls raising OSError."""
from __future__ import annotations

import ctypes
import errno
import os
import platform

import numpy as np

from uswap._uffd_cffi import ffi, lib

PAGE = 4096

# Events (linux/userfaultfd.h).
EVENT_PAGEFAULT = 0x12
EVENT_FORK = 0x13
EVENT_REMAP = 0x14
EVENT_REMOVE = 0x15
EVENT_UNMAP = 0x16

# Page fault flags.
PF_WRITE = 1 << 0
PF_WP = 1 << 1
PF_MINOR = 1 << 2

# Features we need, with the kernel that introduced each (for the error message).
FEATURE_EVENT_UNMAP = 1 << 6
FEATURE_MISSING_SHMEM = 1 << 5
FEATURE_THREAD_ID = 1 << 8
FEATURE_MINOR_SHMEM = 1 << 10
FEATURE_WP_HUGETLBFS_SHMEM = 1 << 12
REQUIRED_FEATURES = {
    "UFFD_FEATURE_MISSING_SHMEM": (FEATURE_MISSING_SHMEM, "4.11"),
    "UFFD_FEATURE_EVENT_UNMAP": (FEATURE_EVENT_UNMAP, "4.11"),
    "UFFD_FEATURE_MINOR_SHMEM": (FEATURE_MINOR_SHMEM, "5.14"),
    "UFFD_FEATURE_WP_HUGETLBFS_SHMEM": (FEATURE_WP_HUGETLBFS_SHMEM, "6.0"),
}

REGISTER_MISSING = 1 << 0
REGISTER_WP = 1 << 1
REGISTER_MINOR = 1 << 2

COPY_MODE_DONTWAKE = 1 << 0
COPY_MODE_WP = 1 << 1
CONTINUE_MODE_WP = 1 << 1
WP_MODE_WP = 1 << 0
WP_MODE_DONTWAKE = 1 << 1

# ioctl bit numbers reported by REGISTER (_UFFDIO_*).
_IOCTL_BITS = {"COPY": 3, "ZEROPAGE": 4, "WRITEPROTECT": 6, "CONTINUE": 7}


class UffdUnsupported(RuntimeError):
    """The running kernel lacks a userfaultfd feature uswap needs."""


def _check(ret: int, what: str) -> int:
    if ret < 0:
        raise OSError(-ret, f"{what}: {os.strerror(-ret)}")
    return ret


def open_uffd() -> int:
    """Create a non-blocking userfaultfd with the API handshake done.

    Raises UffdUnsupported naming the missing feature and the kernel needed.
    """
    fd = lib.us_uffd_open(0)
    if fd < 0:
        err = -fd
        hint = ""
        if err in (1, 13):  # EPERM, EACCES
            hint = (" (needs root, CAP_SYS_PTRACE, or read/write access to /dev/userfaultfd;"
                    " vm.unprivileged_userfaultfd=0 allows only user-mode faults, which"
                    " cannot serve a read() into an evicted page)")
        elif err == 38:  # ENOSYS
            hint = " (kernel built without CONFIG_USERFAULTFD)"
        raise OSError(err, f"userfaultfd: {os.strerror(err)}{hint}")
    want = FEATURE_THREAD_ID
    for bit, _ in REQUIRED_FEATURES.values():
        want |= bit
    feats = ffi.new("uint64_t *")
    ioctls = ffi.new("uint64_t *")
    ret = lib.us_uffd_api(fd, want, feats, ioctls)
    if ret < 0:
        # The kernel refuses the whole handshake when any feature is unknown:
        # probe each on a fresh fd to name the missing one.
        os.close(fd)
        for name, (bit, kver) in REQUIRED_FEATURES.items():
            probe = lib.us_uffd_open(0)
            if probe < 0:
                break
            r = lib.us_uffd_api(probe, bit, feats, ioctls)
            os.close(probe)
            if r < 0:
                raise UffdUnsupported(
                    f"userfaultfd feature {name} is missing: uswap needs Linux {kver} or newer"
                    f" (running {platform.release()})")
        raise OSError(-ret, f"UFFDIO_API: {os.strerror(-ret)}")
    return fd


def register(fd: int, start: int, length: int, mode: int) -> None:
    ioctls = ffi.new("uint64_t *")
    _check(lib.us_uffd_register(fd, start, length, mode, ioctls), "UFFDIO_REGISTER")
    for name in ("COPY", "ZEROPAGE", "CONTINUE", "WRITEPROTECT"):
        if not ioctls[0] & (1 << _IOCTL_BITS[name]):
            raise UffdUnsupported(f"UFFDIO_{name} is not offered for this memory"
                                  f" (shmem needs Linux 6.0 or newer; running {platform.release()})")


def unregister(fd: int, start: int, length: int) -> None:
    _check(lib.us_uffd_unregister(fd, start, length), "UFFDIO_UNREGISTER")


def copy(fd: int, dst: int, src: int, length: int, mode: int = 0) -> int:
    """Bytes copied from the front (fewer than `length` when it stopped part
    way: copy the rest to learn why), or -errno when no page was mapped
    (-EEXIST: already present). A range across a VMA boundary (the client's
    mprotect/mlock/madvise split the region) is copied page by page."""
    return lib.us_uffd_copy(fd, dst, src, length, mode)


def zero_fill(fd: int, dst: int, length: int, zeros: int, write_protect: bool) -> int:
    """Map `length` bytes of zeros at dst, writable or write-protected; as
    copy() for the result. `zeros`: the address of at least `length` bytes
    of zeros (copied from for a write-protected fill; a writable one is a
    ZEROPAGE, native/uffd_copy.h us_uffd_zero_fill)."""
    return lib.us_uffd_zero_fill(fd, dst, length, zeros, 1 if write_protect else 0)


def cont(fd: int, start: int, length: int, mode: int = 0) -> int:
    """CONTINUE: as copy(), bytes mapped from the front or -errno."""
    return lib.us_uffd_continue(fd, start, length, mode)


def _wp_mode(protect: bool, wake: bool) -> int:
    # The kernel refuses WP together with DONTWAKE (-EINVAL): protecting wakes nobody anyway.
    return WP_MODE_WP if protect else (0 if wake else WP_MODE_DONTWAKE)


def writeprotect(fd: int, start: int, length: int, protect: bool, wake: bool = True) -> int:
    """0 or -errno. A multi-page range that fails ENOENT is retried page by
    page (a range the client split into several VMAs), stopping at the
    first page that fails: that page's error is returned (the rule is
    native/uffd.c us_uffd_wp_range's)."""
    return lib.us_uffd_writeprotect(fd, start, length, _wp_mode(protect, wake))


def writeprotect_pages(fd: int, base: int, pages: np.ndarray, protect: bool, wake: bool = True) -> tuple[int, int]:
    """Write-protect (or un-protect) the pages of the region at `base` whose
    indices are `pages` (sorted, distinct): one ioctl per run of consecutive
    pages, in C (native/uffd.c us_uffd_writeprotect_pages), with
    writeprotect()'s ENOENT rule per run, and never a page between runs.
    Stops at the first page that fails. Returns (done, ret): how many of
    `pages` were done from the front, and 0, or the -errno of pages[done]."""
    pages = np.ascontiguousarray(pages, dtype=np.int64)
    err = ffi.new("int *")
    done = lib.us_uffd_writeprotect_pages(fd, base, ffi.cast("int64_t *", ffi.from_buffer(pages)), len(pages),
                                          _wp_mode(protect, wake), err)
    return done, -err[0]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)


def resident(addr: int, length: int) -> bytes:
    """mincore(2) of [addr, addr+length) in this process: one byte per page,
    bit 0 set where the page is in memory. On a MAP_SHARED mapping of a
    memfd it says whether the page is in the memfd (its page cache), without
    faulting anything in and without taking the file's lock."""
    vec = ctypes.create_string_buffer((length + PAGE - 1) // PAGE)
    if _libc.mincore(addr, length, vec) < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mincore: {os.strerror(err)}")
    return vec.raw


def wake(fd: int, start: int, length: int) -> int:
    return lib.us_uffd_wake(fd, start, length)


def poison(fd: int, start: int, length: int) -> int:
    return lib.us_uffd_poison(fd, start, length, 0)


def read_error_text(err: int) -> str:
    """Why reading a uffd failed with errno `err`, for the log."""
    if err == errno.EPROTO:
        return ("read(userfaultfd): the client cleared O_NONBLOCK on its userfaultfd and this"
                " kernel cannot read it without blocking (no RWF_NOWAIT): a protocol violation")
    return f"read(userfaultfd): {os.strerror(err)}"


class EventReader:
    """Reads fault events in batches into a preallocated C array."""

    def __init__(self, batch: int = 256) -> None:
        self.batch = batch
        self.buf = ffi.new("struct us_event[]", batch)

    def read(self, fd: int) -> list[tuple[int, int, int, int]]:
        """Pending events as (kind, flags, addr, end); [] when none. Never
        blocks, even if the client cleared O_NONBLOCK on the shared file."""
        n = lib.us_uffd_read_events(fd, self.buf, self.batch)
        if n < 0:
            raise OSError(-n, read_error_text(-n))
        b = self.buf
        return [(b[i].kind, b[i].flags, b[i].addr, b[i].end) for i in range(n)]


NO_WRITE_PAGE = lib.US_NO_WRITE_PAGE


def verify_map(fd: int, dst: int, view: int, buf: int, n: int, mode: int, write_page: int, expected, sums,
               skip, mapped, present) -> int:
    """The verify-and-map routine of every swap-in (native/readmap.h
    us_verify_map), on n pages a store read put at buf: each page's checksum
    into `sums`, and every run of pages matching `expected` (uint32 numpy
    arrays) mapped at dst with `mode`, the page at index `write_page`
    writable (NO_WRITE_PAGE: none); a page that fails its check, or is
    marked in `skip` (a uint8 array, or None: none; pages a read-ahead window
    reads through), is never mapped. A page found present in the memfd gets
    its verified copy written over it through `view` (the daemon's mapping
    of the pages at dst) and is mapped by CONTINUE: the store copy wins.
    Bytes mapped (the passing pages') or the -errno of a COPY; `mapped` (a
    uint8 array of n, or None) set to which pages were mapped; present[0]
    (an int32 array of one) counts the pages found present and replaced.
    Runs without the GIL."""
    return lib.us_verify_map(fd, dst, view, buf, n, mode, write_page,
                             ffi.cast("uint32_t *", expected.ctypes.data),
                             ffi.cast("uint32_t *", sums.ctypes.data),
                             ffi.NULL if skip is None else ffi.cast("uint8_t *", skip.ctypes.data),
                             ffi.NULL if mapped is None else ffi.cast("uint8_t *", mapped.ctypes.data),
                             ffi.cast("int32_t *", present.ctypes.data))
