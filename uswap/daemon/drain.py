"""Drain (swapoff, on SIGTERM/SIGINT): every page comes home and every
write and punch returns before the store is released (invariant 7); then
each region is un-protected, unregistered and handed back to its client as
plain shared memory.

Thread and lock: engine thread, page lock held; the fast path is turned off
(`enabled` 0) so every fault reaches the engine.
"""
from __future__ import annotations

import logging

import numpy as np

from uswap import uffd
from uswap.daemon import pagetable as pt
from uswap.daemon.cow import CopyOnWrite
from uswap.daemon.punch import Puncher
from uswap.daemon.region import Region
from uswap.daemon.regionset import RegionSet
from uswap.daemon.swapin import SwapIn

log = logging.getLogger("uswap.engine")


class Drain:
    def __init__(self, regions: RegionSet, cow: CopyOnWrite, puncher: Puncher, swapin: SwapIn) -> None:
        self.regions = regions
        self.cow = cow  # children's pages come home too
        self.puncher = puncher  # punches in flight are waited for
        self.swapin = swapin  # pages come home as loads

    def start_drain(self) -> None:
        """Swapoff: bring every page home, wait for every write, then release."""
        if self.regions.draining:
            return
        self.regions.draining = True
        self.regions.shared.enabled = 0  # every fault now goes through the engine
        self.cow.resolve_all()  # children's pages come home like the rest
        log.info("draining: bringing every page home")
        for region in list(self.regions.by_id.values()):
            self._drain_region(region)

    def _drain_region(self, region: Region) -> None:
        if region.closing:
            return
        table = region.table
        for first, n in pt.runs(np.flatnonzero(table.state == pt.SWAPPED), self.swapin.ra_max_pages):
            # Split further where slots are not adjacent.
            slots = table.slot[first:first + n]
            breaks = np.flatnonzero(np.diff(slots) != 1) + 1
            starts = [0] + [int(b) for b in breaks] + [n]
            for a, b in zip(starts, starts[1:]):
                self.regions.charged += b - a
                self.swapin.queue_load(region, first + a, b - a, int(slots[a]))
        self.swapin.pump_loads()

    def drain_done(self) -> bool:
        if not self.regions.draining:
            return False
        regions = self.regions
        if (regions.writes_inflight or regions.loads_inflight or regions.load_queue or regions.shared.inflight
                or self.puncher.jobs):
            return False  # a punched page comes home once SWAPPED (_punch_done)
        for region in list(self.regions.by_id.values()):
            if region.closing:
                if region.inflight:
                    return False
                continue
            if np.count_nonzero(region.table.state == pt.SWAPPED):
                self._drain_region(region)
                return False
            if np.count_nonzero(region.table.state == pt.LOADING):
                # A failed read waits for its retry (_reload_later): counted
                # in no in-flight figure above, but its page is not home yet.
                return False
        return True

    def hand_back_all(self) -> None:
        """After drain: every page is resident. Unprotect and unregister each
        region so the client keeps plain shared memory once we exit."""
        for region in list(self.regions.by_id.values()):
            if region.closing:
                continue
            uffd.writeprotect(region.uffd, region.addr, region.size, protect=False, wake=True)
            try:
                uffd.unregister(region.uffd, region.addr, region.size)
            except OSError as e:
                log.warning("region %d: unregister failed: %s", region.id, e)
            self.regions.close_region(region, "drained")
