"""What the kernel says about a client's mappings of its region, from
/proc/PID/smaps: which parts are still mapped and registered with a
userfaultfd, and which are mlocked; from /proc/PID/maps: where the
client maps the memfd, and which pages a fork snapshots (fork.py); and
from /proc/PID/pagemap: which pages the client has in its page tables
(`in_page_tables`: which LOADING pages a load has mapped, fork.py and
resolve.py).

Why smaps: it is the one place that shows a VMA's flags (VmFlags: `um` =
registered for MISSING faults, `lo` = mlocked). It is read rarely -- when an
ioctl on the region fails, and when the victim queue refills or, for a
client with locked memory, the key of its locks changed (VmLck in
/proc/PID/status and the memfd's VMA boundaries in /proc/PID/maps, cheap
reads) -- never per page. Reading it takes the client's mm lock for reading, which no client
holds while waiting for the daemon (see native/fastpath.c on the calls made
under the page lock), so it cannot hang the daemon; its cost grows with the
client's number of mappings.
"""
from __future__ import annotations

import os
import re
import select

import numpy as np

PAGE = 4096
# Groups: start, end, perms, offset, device major, minor, inode.
_HEADER = re.compile(rb"^([0-9a-f]+)-([0-9a-f]+) (\S+) ([0-9a-f]+) ([0-9a-f]+):([0-9a-f]+) (\d+)")


class Vma:
    """One mapping of the client, with its VmFlags codes (bytes, e.g. b"um")."""
    __slots__ = ("start", "end", "offset", "shared", "dev", "inode", "flags")

    def __init__(self, start: int, end: int, offset: int, shared: bool = True,
                 dev: tuple[int, int] = (0, 0), inode: int = 0) -> None:
        self.start, self.end, self.offset = start, end, offset
        self.shared, self.dev, self.inode = shared, dev, inode
        self.flags: set[bytes] = set()


def vmas(pid: int, keep=lambda vma: True) -> list[Vma] | None:
    """The client's mappings that `keep` accepts, in address order, each
    with its VmFlags; None when the process is gone (no /proc entry, a
    zombie, or an empty smaps: its mm has exited). Other read errors
    (EMFILE...) are raised. The one parser of /proc/PID/smaps."""
    try:
        with open(f"/proc/{pid}/smaps", "rb") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    if not text:
        return None
    out: list[Vma] = []
    current: Vma | None = None
    for line in text.split(b"\n"):
        m = _HEADER.match(line)
        if m:
            vma = Vma(int(m.group(1), 16), int(m.group(2), 16), int(m.group(4), 16),
                      shared=m.group(3)[3:4] == b"s", dev=(int(m.group(5), 16), int(m.group(6), 16)),
                      inode=int(m.group(7)))
            current = vma if keep(vma) else None
            if current is not None:
                out.append(current)
        elif current is not None and line.startswith(b"VmFlags:"):
            current.flags = set(line[8:].split())
    return out


def memfd_vmas(pid: int, inode: int) -> list[Vma] | None:
    """The client's mappings of the file with this inode (see vmas)."""
    return vmas(pid, lambda vma: vma.inode == inode)


def _in_place(vma: Vma, region_addr: int) -> bool:
    """The VMA maps the memfd where the region put it (file offset = distance
    from the region's start), not a second mapping elsewhere."""
    return vma.start - region_addr == vma.offset


def registered(vmas: list[Vma], region_addr: int, start: int, end: int) -> bool:
    """Every byte of [start, end) is mapped in place and registered for
    MISSING faults with a userfaultfd."""
    at = start
    for vma in vmas:
        if vma.end <= at or not _in_place(vma, region_addr):
            continue
        if vma.start > at or b"um" not in vma.flags:
            return False
        at = vma.end
        if at >= end:
            return True
    return at >= end


def any_registered(vmas: list[Vma], region_addr: int, start: int, end: int) -> bool:
    """Some byte of [start, end) is mapped in place and registered for
    MISSING faults: the region is still (partly) the client's."""
    return any(vma.start < end and vma.end > start and _in_place(vma, region_addr)
               and b"um" in vma.flags for vma in vmas)


def locked_pages(vmas: list[Vma], region_addr: int, npages: int) -> np.ndarray | None:
    """Boolean mask of the region's pages in mlocked VMAs (VmFlags `lo`), or
    None when there are none."""
    mask = None
    for vma in vmas:
        if b"lo" not in vma.flags or not _in_place(vma, region_addr):
            continue
        if mask is None:
            mask = np.zeros(npages, bool)
        first = max(0, (vma.start - region_addr) // PAGE)
        last = min(npages, (vma.end - region_addr) // PAGE)
        mask[first:last] = True
    return mask


def _vmlck_kb(text: bytes) -> int:
    """VmLck (KiB) from the text of /proc/PID/status; 0 when absent (a
    process with no mm: a zombie)."""
    at = text.find(b"\nVmLck:")
    if at < 0:
        return 0
    try:
        return int(text[at + 7:text.index(b"\n", at + 1)].split()[0])
    except (ValueError, IndexError):
        return 0


def locked_kb(pid: int) -> int:
    """The process's locked memory (VmLck in /proc/PID/status, KiB), 0 when
    it cannot be read. One open, read and close: a client's own session
    keeps the file open instead (StatusFile)."""
    status = StatusFile(pid)
    try:
        return status.locked_kb()
    finally:
        status.close()


def _exited(pidfd: int) -> bool:
    """The process of `pidfd` has exited (a pidfd polls readable from then on)."""
    p = select.poll()
    p.register(pidfd, select.POLLIN)
    return bool(p.poll(0))


class StatusFile:
    """A client's /proc/PID/status kept open, for its VmLck: reclaim reads it
    for every region it looks at (Reclaim._lock_key), to learn whether the
    client may have mlocked ranges at all, and a pread at 0 of an open fd
    costs about 8 us where an open, a read and a close cost about 36 us
    (14% of the engine thread on a first-touch stream). The kernel generates
    the text afresh at each read from offset 0. The fd belongs to the
    process it was opened for: once that process is gone its reads fail
    (ESRCH) and the answer is 0, as for a pid that cannot be read.

    It is opened by pid at the first read, which may come after the client
    died and its pid went to another process: with `pidfd` (the session's,
    taken as it connected: connections.peer_pidfd) the file is kept only if
    that process has not exited once it is open -- a pid is not reused
    before its process is reaped, so the file then names the client -- and
    a client gone reads 0. Without one (-1) the pid is trusted. Engine thread only;
    one fd per client session (fdlimits.nofile_needed), closed with it."""

    def __init__(self, pid: int, pidfd: int = -1) -> None:
        self.pid = pid
        self.pidfd = pidfd    # not ours: the session closes it after this
        self.fd = -1          # opened at the first read

    def locked_kb(self) -> int:
        """VmLck (KiB) now; 0 when it cannot be read or the client is gone."""
        if self.fd < 0:
            try:
                fd = os.open(f"/proc/{self.pid}/status", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return 0
            if self.pidfd >= 0 and _exited(self.pidfd):
                os.close(fd)  # maybe another process's; opened again at each read, all read 0
                return 0
            self.fd = fd
        try:
            # VmLck is in the first 1.5 KiB of the text whatever follows it.
            return _vmlck_kb(os.pread(self.fd, 4096, 0))
        except OSError:
            return 0

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _memfd_maps(pid: int, inodes: set[int]) -> dict[int, list[tuple[int, int, int]]] | None:
    """The client's mappings of the files with these inodes, each as
    (start, end, file offset), from /proc/PID/maps (no walk of the pages,
    unlike smaps; one read whatever the number of inodes); None when it
    cannot be read."""
    try:
        with open(f"/proc/{pid}/maps", "rb") as f:
            text = f.read()
    except OSError:
        return None
    out: dict[int, list[tuple[int, int, int]]] = {inode: [] for inode in inodes}
    for line in text.split(b"\n"):
        m = _HEADER.match(line)
        if m and int(m.group(7)) in out:
            out[int(m.group(7))].append((int(m.group(1), 16), int(m.group(2), 16), int(m.group(4), 16)))
    return out


def memfd_layout(pid: int, inode: int) -> tuple[tuple[int, int], ...]:
    """Where the client maps the file with this inode: its VMAs' (start,
    end); () when it cannot be read. An mlock or munlock of part of a VMA
    splits or merges it, so this changes where VmLck alone may not."""
    maps = _memfd_maps(pid, {inode})
    return tuple((start, end) for start, end, _ in maps[inode]) if maps is not None else ()


def mapped_in_place(pid: int, regions: list[tuple[int, int, int]]) -> list[np.ndarray] | None:
    """For each region given as (memfd inode, address, pages), the boolean
    mask of its pages the client maps in place (the memfd at the offset of
    their distance from the region's start, any protection); None when
    /proc/PID/maps cannot be read. A page the client unmapped, or that a
    foreign MAP_FIXED mapping took, is False."""
    maps = _memfd_maps(pid, {inode for inode, _, _ in regions})
    if maps is None:
        return None
    masks = []
    for inode, region_addr, npages in regions:
        mask = np.zeros(npages, bool)
        for start, end, offset in maps[inode]:
            if start - region_addr != offset:
                continue  # a second mapping of the memfd elsewhere
            first = max(0, (start - region_addr) // PAGE)
            last = min(npages, (end - region_addr) // PAGE)
            mask[first:last] = True
        masks.append(mask)
    return masks


PM_PRESENT = 1 << 63  # /proc/PID/pagemap: the page is in the process's page tables
PM_SWAP = 1 << 62  # a swap-type entry: a migration entry, or a uffd-wp marker (6.18: both set it)
PM_FILE = 1 << 61  # ... with a file page behind it: a migration entry (a marker has no page)


def in_page_tables(pid: int, addr: int, pages: np.ndarray) -> np.ndarray | None:
    """Which of `pages` (page indices from addr) process pid has in its page
    tables (pagemap's present bit: never set for a hole, nor for the uffd-wp
    marker a punch leaves); None when /proc/PID/pagemap cannot be read (no
    pid, another user's process without CAP_SYS_PTRACE). A region page is
    in the client's page tables only once a UFFDIO_COPY or CONTINUE put it
    there -- for a LOADING page, once its load mapped it -- never because it
    is in the memfd. A page being migrated by the kernel counts as held (a
    migration entry: PM_SWAP and PM_FILE). Not held, yet the client's: a
    page it took out of its own page tables (MADV_DONTNEED, MADV_PAGEOUT on
    its shared mapping) after a load mapped it -- callers must not take
    "not held" alone for "planted" (resolve.py _not_loaded). One pread per
    run of pages."""
    out = np.zeros(len(pages), bool)
    if not pid or not len(pages):
        return out if pid else None
    try:
        fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        order = np.argsort(pages, kind="stable")
        sorted_pages = np.asarray(pages, np.int64)[order]
        breaks = np.flatnonzero(np.diff(sorted_pages) != 1) + 1
        at = 0
        for run in np.split(sorted_pages, breaks):
            first = (addr // PAGE) + int(run[0])
            raw = os.pread(fd, 8 * len(run), 8 * first)
            if len(raw) != 8 * len(run):
                return None
            entries = np.frombuffer(raw, np.uint64)
            # A page the kernel is migrating (compaction) has a migration entry
            # for microseconds: not present, but PM_SWAP with PM_FILE. Still
            # mapped (a written page must not be taken for a planted one);
            # the uffd-wp marker a punch leaves has PM_SWAP without PM_FILE
            # (read on 6.18: 0x42..., the memfd page gone).
            migrating = (entries & np.uint64(PM_SWAP | PM_FILE)) == np.uint64(PM_SWAP | PM_FILE)
            out[order[at:at + len(run)]] = ((entries & np.uint64(PM_PRESENT)) != 0) | migrating
            at += len(run)
    except OSError:
        return None
    finally:
        os.close(fd)
    return out


def inode_of(fd: int) -> int:
    return os.fstat(fd).st_ino
