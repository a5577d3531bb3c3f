"""The `adopt` op (docs/protocol.md, design section 9) on the socket side:
a client whose daemon died sends its regions again, and each that a dead
daemon left (adoption.py's orphans) is checked, made live on the new
connection and served again under its id. An alloc repeated after a
daemon restart (ops.py) is answered with its orphan the same way.

Engine thread, page lock held (let go only for the /proc reads); lines are
logged as `uswap.server`, through the server's rate-limited client log."""
from __future__ import annotations

import os

import numpy as np

from uswap import protocol
from uswap.daemon.connections import Connections, Session
from uswap.daemon.engine import Engine
from uswap.daemon.golive import GoLive
from uswap.daemon.pagetable import runs
from uswap.daemon.ratelimit import RateLimitedLog
from uswap.daemon.region import PAGE, Region, RegionRefused, mapped_parts


class AdoptOp:
    """Serves `adopt` (Ops.handle) and adopts one orphan (`adopt_one`)."""

    def __init__(self, engine: Engine, conns: Connections, client_log: RateLimitedLog, go_live: GoLive) -> None:
        self.engine = engine
        self.conns = conns
        self.client_log = client_log
        self.go_live = go_live

    def handle(self, session: Session, msg: dict, fds: list[int], sender_pid: int) -> None:
        """`adopt`: a client whose daemon died sends its regions again, each
        {"id", "addr", "size"} with its uffd and memfd (in that order, two
        fds a region, so at most MAX_FDS / 2 regions a message). Each is
        checked (adoption.py: an orphan of this id, the same range, the same
        memfd, the same uid; then registered MISSING|WP|MINOR in this uffd,
        as an alloc), its transient pages resolved, and served again under
        its id. The reply says per region: {"id", "ok"} or {"id", "error"}.
        `fds` keeps the ones no region took; the caller closes them."""
        entries = msg.get("regions")
        if not isinstance(entries, list) or len(entries) * 2 != len(fds):
            raise protocol.ProtocolError(f"adopt: regions {entries!r} must be a list with two fds (uffd, memfd)"
                                         f" each, got {len(fds)} fds")
        results, taken = [], set()
        for i, entry in enumerate(entries):
            uffd_fd, memfd = fds[2 * i], fds[2 * i + 1]
            rid = entry.get("id") if isinstance(entry, dict) else None
            try:
                if session.control_only:
                    raise RegionRefused("adopt: this connection may ask for status only (daemon busy)")
                region = self.adopt_one(session, entry, uffd_fd, memfd, sender_pid)
            except (RegionRefused, OSError) as e:
                reason = str(e) if isinstance(e, RegionRefused) else f"adopt: region {rid!r}: {e}"
                self.client_log.warning("client pid %d: %s", session.pid, reason)
                results.append({"id": rid, "ok": False, "error": reason})
                continue
            taken.update((uffd_fd, memfd))
            results.append({"id": region.id, "ok": True})
        fds[:] = [fd for fd in fds if fd not in taken]
        self.conns.reply(session, {"ok": True, "regions": results})

    def adopt_one(self, session: Session, entry: object, uffd_fd: int, memfd: int, sender_pid: int) -> Region:
        """The orphan `entry` names, checked (adoption.py, then registered as
        for an alloc), made live on these fds and served by this session;
        RegionRefused or OSError naming why not."""
        adoption = self.engine.adoption
        orphan = adoption.check(entry, uffd_fd, memfd, session.uid)
        addr, npages, memfd_stat = orphan.meta["addr"], orphan.meta["npages"], os.fstat(memfd)
        # Each part the client maps is checked as an alloc's; a region mapped
        # in parts (design section 7) is adopted with the rest forgotten.
        self.engine.unlock()  # /proc reads: as GoLive.check_registration_unlocked
        try:
            parts = mapped_parts(sender_pid, memfd_stat, addr, npages, "adopt")
        finally:
            self.engine.lock()
        for first, n in parts:
            self.go_live.check_registration_unlocked(sender_pid, addr + first * PAGE, n * PAGE, memfd_stat,
                                                     addr, "adopt")
        # Looked up again: the page lock was let go for the smaps read.
        orphan = adoption.check(entry, uffd_fd, memfd, session.uid)
        region = adoption.reclaim(orphan, uffd_fd, memfd, session, parts)
        self.go_live.serve(session, region)
        mapped = np.zeros(npages, bool)
        for first, n in parts:
            mapped[first:first + n] = True
        adoption.after_live(region, runs(np.flatnonzero(~mapped), npages))  # the rest forgotten there
        return region
