"""The last two steps of every region a client brings, whichever op brings
it (an alloc, ops.py; a fork's child attaching its copy, forkops.py; a
region sent again after a daemon died, adoptop.py): its registration read
from /proc/PID/smaps with the page lock let go, then the region made live,
served by the engine from then on.

Engine thread, page lock held, except inside
`check_registration_unlocked`."""
from __future__ import annotations

import os
from typing import Callable

from uswap.daemon.connections import Session
from uswap.daemon.engine import Engine
from uswap.daemon.region import Region, check_registration


class GoLive:
    """Checks a client's registration off the page lock and makes regions
    live on its session."""

    def __init__(self, engine: Engine, watch_uffd: Callable[[Region], None]) -> None:
        self.engine = engine
        # The server's: a region the fast path's threads do not serve has its
        # uffd read by the event loop.
        self.watch_uffd = watch_uffd

    def check_registration_unlocked(self, pid: int, addr: int, size: int, memfd_stat: os.stat_result,
                                    region_addr: int | None = None, op: str = "alloc") -> None:
        """check_registration without the page lock: reading /proc/PID/smaps
        walks the page tables of every mapping of the client (~150 ms for 2 GiB
        resident), and the fast path's threads must not wait for that. Safe:
        the check reads only /proc and touches no engine state, and the engine
        is between two events here, as consistent as when it sleeps in epoll."""
        self.engine.unlock()
        try:
            check_registration(pid, addr, size, memfd_stat, region_addr, op)
        finally:
            self.engine.lock()

    def serve(self, session: Session, region: Region) -> None:
        """A validated region goes live: the engine serves it from now on."""
        fast = self.engine.add_region(region)
        session.regions.add(region.id)
        session.allocated.add(region.id)
        if not fast:  # the fast path's threads read the uffds of the others
            self.watch_uffd(region)
