"""Discarding pages the client keeps mapped (the `discard` op: what
MADV_DONTNEED, MADV_FREE and MADV_REMOVE mean for a uswap region): the pages
become EMPTY, their slots are freed, resident ones are punched from the
memfd, so the next touch reads zeros.

The work is forget.py's (pages the client unmapped), with one difference:
the range stays mapped, so the op is answered only once every page of it has
really left memory. A page whose read, write or punch is in flight (LOADING,
WRITEBACK, PUNCHING) is marked F_DISCARD and forgotten by the stage whose
completion returns (invariants 2, 3 and 7); until then its old contents may
still be visible to the client, and the answer waits.

Thread and lock: engine thread, page lock held.
"""
from __future__ import annotations

import logging
from typing import Callable

from uswap.daemon import pagetable as pt
from uswap.daemon.forget import Forget
from uswap.daemon.region import Region
from uswap.daemon.regionset import RegionSet

# Called once the range is gone from memory (True) or its region closed first (False).
Settled = Callable[[bool], None]


class Discard:
    def __init__(self, regions: RegionSet, forget: Forget) -> None:
        self.regions = regions
        self.forget = forget
        # Discards whose pages are not all gone yet: (region, first, n, settled).
        self.pending: list[tuple[Region, int, int, Settled]] = []

    def discard(self, region: Region, first: int, n: int, settled: Settled) -> bool:
        """Discard pages first..first+n-1 of a live region. True when they
        are gone at once (`settled` is not called); else `settled` is called
        from check() once they are."""
        self.forget.forget_range(region, first, n, cause="discarded by the client", level=logging.DEBUG)
        self.regions.stats["discarded_pages"] += n
        if self._gone(region, first, n):
            return True
        self.pending.append((region, first, n, settled))
        return False

    @staticmethod
    def _gone(region: Region, first: int, n: int) -> bool:
        """Invariant (a discard's answer): every page forget_range could not
        make EMPTY at once holds F_DISCARD until its I/O or punch returned and
        it left the memfd (punch.py's _punch_done clears it with the page
        EMPTY). A fast-path load that finished meanwhile cleared the flag but
        left an FP_FORGET record, which on_completions turns back into
        F_DISCARD before check() runs, in the same stretch under the page
        lock: no fault thread can finish a page between the two."""
        return not (region.table.flags[first:first + n] & pt.F_DISCARD).any()

    def check(self) -> None:
        """After the completions of a loop turn: answer the discards now settled.
        The pending list is replaced before any answer is given: an answer
        lets the connection's next message be served, which may discard again."""
        if not self.pending:
            return
        waiting, answers = [], []
        for region, first, n, settled in self.pending:
            if region.closing:
                answers.append((settled, False))
            elif self._gone(region, first, n):
                answers.append((settled, True))
            else:
                waiting.append((region, first, n, settled))
        self.pending = waiting
        for settled, gone in answers:
            settled(gone)
