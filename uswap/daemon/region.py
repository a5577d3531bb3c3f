"""A client region as the daemon sees it: the client's uffd and memfd, the
daemon's own mapping of the memfd, and the page table.

`validate_and_open` checks everything a client sends before the daemon
trusts it; any refusal raises RegionRefused with a message for the client.
"""
from __future__ import annotations

import errno
import fcntl
import os
import stat
from typing import Callable

import numpy as np

from uswap import native, uffd
from uswap.daemon import clientmaps, policy
from uswap.daemon.pagetable import PageTable, runs

PAGE = 4096


class RegionRefused(Exception):
    pass


class ReadAhead:
    """A region's zero-fill stream state (the fast path keeps the same
    fields in C). Its read-ahead streams are Region.ra_streams."""
    FIELDS = ("fill_expect", "fill_window")
    __slots__ = FIELDS

    def __init__(self) -> None:
        self.fill_expect = -1     # page where a first-touch stream's next fault would land
        self.fill_window = 1      # current zero-fill window, pages


def new_ra_streams() -> np.ndarray:
    """A region's read-ahead streams (native/policy.h us_ra_find): rows of
    (latest fault, where its windows end, window, flags), the latest used
    first; none yet (ra_expect -1)."""
    streams = np.zeros((policy.RA_STREAMS, policy.RA_COLS), np.int64)
    streams[:, policy.RA_LAST] = -1
    streams[:, policy.RA_EXPECT] = -1
    streams[:, policy.RA_WINDOW] = 1
    return streams


class Region:
    def __init__(self, uffd_fd: int, memfd: int, addr: int, size: int, owner: object) -> None:
        self.table = PageTable(size // PAGE)
        self.id = 0
        self.uffd = uffd_fd
        self.memfd = memfd
        self.addr = addr          # the client's address of the region
        self.size = size
        self.npages = size // PAGE
        self.owner = owner        # the client session
        self.daddr = 0            # the daemon's own mapping: reads of resident pages; the store copy over a
                                  # page a swap-in finds present (native/readmap.h)
        self.closing = False
        self.inflight = 0         # I/O jobs of this region not yet completed
        self.read_failures = 0
        # Zero-fill stream state; held in the fast path's C memory while its
        # threads watch the region.
        self.ra = ReadAhead()
        # Read-ahead streams (several: threads streaming through the region
        # at once); the fast path's threads read and write this array too
        # (fp_region.ra), under the page lock.
        self.ra_streams = new_ra_streams()
        self.fp_slot = -1         # the fast path's slot for this region, or -1
        # Forked children AT_PARENT at each page while some child reads pages
        # from this region (cow.py's Share.counts), else None; the fast
        # path's threads read it too (fp_region.shares).
        self.share_counts: np.ndarray | None = None
        self.faults = 0           # page faults of this region the engine served (the fast path counts its own)
        # page -> when the engine took a fault now waiting for the page's
        # store read (faults.py); swapin.py times the fault when it maps the page.
        self.fault_started: dict[int, float] = {}

    @property
    def write_stream(self) -> bool:
        """The latest used stream was continued by a write: its windows are
        mapped writable (swapin.py)."""
        return bool(self.ra_streams[0, policy.RA_FLAGS] & policy.RA_F_WRITING)

    @property
    def id(self) -> int:
        """The engine's id of the region; kept in its page table, which names
        the region when it logs an illegal transition."""
        return self.table.region_id

    @id.setter
    def id(self, value: int) -> None:
        self.table.region_id = value

    def release(self) -> None:
        """Unmap and close; only once no I/O is in flight (engine checks)."""
        if self.daddr:
            native.munmap(self.daddr, self.size)
            self.daddr = 0
        for fd in (self.uffd, self.memfd):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.uffd = self.memfd = -1


def _fd_target(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


# userfaultfd modes a region's range must be registered for, with the VmFlags
# code /proc/PID/smaps shows for each: MISSING for first touch, WP for dirty
# tracking, MINOR for swap-ins of pages still in the page cache.
REQUIRED_UFFD_MODES = (("MISSING", "um"), ("WP", "uw"), ("MINOR", "ui"))


def check_registration(pid: int, addr: int, size: int, memfd_stat: os.stat_result,
                       region_addr: int | None = None, op: str = "alloc") -> None:
    """Refuse unless every page of [addr, addr+size) in process `pid` is a
    MAP_SHARED mapping of the region's memfd (memfd offset 0 at
    `region_addr`, by default addr: [addr, +size) may be one run of a
    region mapped in parts) and is
    registered MISSING|WP|MINOR. The WP ioctl alone cannot tell: a range
    registered WP without MISSING passes it, and its evicted pages would then
    read as zeros instead of faulting to the daemon. A refusal's text begins
    with `op`, the request checked (alloc, adopt, fork_attach)."""
    where = f"[{addr:#x}, +{size})"
    if pid <= 0:
        raise RegionRefused(f"{op}: the client's pid is unknown to the daemon (another pid namespace?);"
                            " cannot check how the range is registered")
    try:
        vmas = clientmaps.vmas(pid, lambda vma: vma.start < addr + size and addr < vma.end)
        if vmas is None:
            raise FileNotFoundError(errno.ENOENT, "the process is gone")
    except OSError as e:
        if e.errno in (errno.EMFILE, errno.ENFILE):
            raise
        raise RegionRefused(f"{op}: cannot read /proc/{pid}/smaps to check how {where} is registered:"
                            f" {e.strerror}") from None
    covering = _covering(vmas, addr, addr + size, pid, where, op)
    # Registration first: that is what a client most often gets wrong.
    for vma in covering:
        missing = [mode for mode, code in REQUIRED_UFFD_MODES if code.encode() not in vma.flags]
        if missing:
            raise RegionRefused(f"{op}: {where} is not registered for {'|'.join(missing)}"
                                f" (VmFlags of {vma.start:#x}-{vma.end:#x} in process {pid}:"
                                f" {b' '.join(sorted(vma.flags)).decode()}); register it MISSING|WP|MINOR")
    memfd_dev = (os.major(memfd_stat.st_dev), os.minor(memfd_stat.st_dev))
    for vma in covering:
        if not vma.shared or vma.dev != memfd_dev or vma.inode != memfd_stat.st_ino:
            raise RegionRefused(f"{op}: {where}: {vma.start:#x}-{vma.end:#x} in process {pid} is not a"
                                " MAP_SHARED mapping of the memfd sent")
        first = max(vma.start, addr)
        base = addr if region_addr is None else region_addr
        if vma.offset + (first - vma.start) != first - base:
            raise RegionRefused(f"{op}: {where}: {first:#x} maps memfd offset"
                                f" {vma.offset + first - vma.start:#x}, not {first - base:#x}")


def mapped_parts(pid: int, memfd_stat: os.stat_result, addr: int, npages: int, op: str) -> list[tuple[int, int]]:
    """The runs (first page, count) of the region at `addr` that process
    `pid` maps in place: the memfd at the offset of their distance from
    `addr` (clientmaps.mapped_in_place). A client may map a region in parts
    (a munmap of some of it, a foreign MAP_FIXED mapping over some:
    docs/design.md section 7). Refused when its maps cannot be read or
    nothing of the region is mapped."""
    masks = clientmaps.mapped_in_place(pid, [(memfd_stat.st_ino, addr, npages)])
    if masks is None:
        raise RegionRefused(f"{op}: cannot read /proc/{pid}/maps to find where the region is mapped")
    parts = runs(np.flatnonzero(masks[0]), npages)
    if not parts:
        raise RegionRefused(f"{op}: nothing of [{addr:#x}, +{npages * PAGE}) maps the memfd sent in"
                            f" process {pid}")
    return parts


def check_same_uffd(uffd_fd: int, addr: int, size: int) -> None:
    """Refuse unless [addr, addr+size) is registered in THIS userfaultfd
    (smaps shows that a range is registered, not with which uffd; a range
    registered in another one would send its faults where nobody reads
    them). Registering the range again with the modes it has is the probe:
    the kernel does nothing for the uffd that holds it, and answers EBUSY
    for any other."""
    try:
        uffd.register(uffd_fd, addr, size, uffd.REGISTER_MISSING | uffd.REGISTER_WP | uffd.REGISTER_MINOR)
    except uffd.UffdUnsupported as e:
        raise RegionRefused(f"alloc: {e}") from None
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise RegionRefused(f"alloc: [{addr:#x}, +{size}) is not registered in the userfaultfd sent"
                                " (another uffd holds it); send the uffd the range is registered in") from None
        raise RegionRefused(f"alloc: [{addr:#x}, +{size}) cannot be checked against the userfaultfd sent"
                            f" ({e.strerror or e})") from None


def _covering(vmas: list[clientmaps.Vma], lo: int, hi: int, pid: int, where: str,
              op: str) -> list[clientmaps.Vma]:
    """`vmas` if they cover [lo, hi) without a gap; else refuse."""
    cursor = lo
    for vma in vmas:
        if vma.start > cursor:
            break
        cursor = vma.end
    if cursor < hi:
        raise RegionRefused(f"{op}: {where} is not registered: nothing is mapped at {cursor:#x}"
                            f" in process {pid}")
    return vmas


def check_region_fds(uffd_fd: int, memfd: int, op: str) -> os.stat_result:
    """Refuse unless the fds are a userfaultfd and a memfd (the `op`'s, for
    the message); the memfd's stat. The uffd is made non-blocking: the
    daemon never waits on it."""
    if _fd_target(uffd_fd) != "anon_inode:[userfaultfd]":
        raise RegionRefused(f"{op}: the first fd is not a userfaultfd")
    if not _fd_target(memfd).startswith("/memfd:"):
        raise RegionRefused(f"{op}: the second fd is not a memfd")
    fl = fcntl.fcntl(uffd_fd, fcntl.F_GETFL)
    if not fl & os.O_NONBLOCK:
        fcntl.fcntl(uffd_fd, fcntl.F_SETFL, fl | os.O_NONBLOCK)
    return os.fstat(memfd)


def validate_and_open(msg: dict, fds: list[int], max_size: int, owner: object,
                      in_use: set[tuple[int, int]] = frozenset(), peer_pid: int = 0,
                      registration_check: Callable[[int, int, int, os.stat_result], None] = check_registration,
                      ) -> Region:
    """Check an alloc request and map the region. On success the Region owns the fds;
    on failure the caller still owns (and closes) them. `peer_pid` is the
    client's pid (SO_PEERCRED), whose /proc/PID/smaps `registration_check`
    reads to tell how the range is really registered."""
    if len(fds) != 2:
        raise RegionRefused(f"alloc needs exactly 2 file descriptors (uffd, memfd), got {len(fds)}")
    uffd_fd, memfd = fds
    size, addr = msg.get("size"), msg.get("addr")
    for name, value in (("size", size), ("addr", addr)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise RegionRefused(f"alloc: {name} {value!r} is not a positive integer")
    if size > max_size:
        raise RegionRefused(f"alloc: size {size} exceeds max_region_size {max_size}")
    if addr + size > 1 << 64:
        raise RegionRefused(f"alloc: [{addr:#x}, +{size}) is beyond the 64-bit address space")
    if size % PAGE or addr % PAGE:
        raise RegionRefused(f"alloc: size {size} and addr {addr:#x} must be multiples of {PAGE}")
    st = check_region_fds(uffd_fd, memfd, "alloc")
    if (st.st_dev, st.st_ino) in in_use:
        raise RegionRefused("alloc: this memfd is already a region")
    if not stat.S_ISREG(st.st_mode) or st.st_size != size:
        raise RegionRefused(f"alloc: memfd is {st.st_size} bytes, the request says {size}")
    seals = fcntl.fcntl(memfd, fcntl.F_GET_SEALS)
    need = fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL
    if seals & need != need:
        raise RegionRefused("alloc: memfd must be sealed with F_SEAL_GROW, F_SEAL_SHRINK and F_SEAL_SEAL")
    if seals & (fcntl.F_SEAL_WRITE | getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x10)):
        raise RegionRefused("alloc: memfd must not be write-sealed (the daemon punches holes in it)")
    try:
        os.lseek(memfd, 0, os.SEEK_DATA)
        raise RegionRefused("alloc: memfd already holds data; allocate and register before writing")
    except OSError as e:
        if e.errno != errno.ENXIO:
            raise RegionRefused(f"alloc: cannot inspect memfd: {e.strerror}") from None
    registration_check(peer_pid, addr, size, st)
    check_same_uffd(uffd_fd, addr, size)
    region = Region(uffd_fd, memfd, addr, size, owner)
    try:
        region.daddr = native.map_client_view(memfd, size)
    except OSError as e:
        raise RegionRefused(f"alloc: cannot map the memfd: {e.strerror}") from None
    return region
