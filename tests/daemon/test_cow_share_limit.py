"""`cow.py` `CopyOnWrite.link`: a source page's share count (children
AT_PARENT there, `Share.counts`, read by the fast path as `uint16_t`) never
passes `cow.MAX_CHILDREN`. A fork that would take a page past it is refused
(`fork.py` `ForkManager.begin`: ForkRefused, the parent and its other
children unchanged); before, the count wrapped to 0 and the page was taken
for unshared by `before_write`, `parent_clean` and the fast path's
`fp_take_minor` (the parent's next write would reach the children's
snapshots).

Not only max_clients bounds the children of a region: pending snapshots
(fork_begin answered, no child attached yet) are links too, and one client
may hold any number of them. 65535 real forks are too heavy for a test; the
children already there are stand-ins linked through `link` itself (it keys
its maps by them and reads nothing else of them), the refused fork is a real
`ForkManager.begin` on a real userfaultfd-registered memfd in this process
(tests/uffd_region.py), with the real RegionSet, Budget, SlotAllocator.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from tests.uffd_region import fill_zeros, registered_memfd
from uswap import config
from uswap.daemon import fastpath
from uswap.daemon import pagetable as pt
from uswap.daemon.budget import Budget
from uswap.daemon.cow import CopyOnWrite
from uswap.daemon.fork import ForkManager, ForkRefused
from uswap.daemon.region import Region
from uswap.daemon.regionset import RegionSet
from uswap.daemon.slots import SlotAllocator

PAGE = 4096
N = 8
SHARED = 3  # the page every stand-in child reads from the parent
MAX_CHILDREN = 65535  # the most a uint16_t count holds (native/fastpath.h fp_region.shares)


class _Child:
    """A stand-in child region: what `link` keys its maps by."""


@pytest.fixture
def parent(tmp_path):
    """(parent region, fork manager, cow): the parent's pages resident, all
    write-protected (zero fills); page SHARED dirty (a fork makes it AT_PARENT)."""
    with registered_memfd(N, "test-cow-share-limit") as (fd, memfd, addr):
        fill_zeros(fd, addr, N, write_protect=True)
        cfg = config.load(None, {"backing": str(tmp_path / "store"), "state_dir": str(tmp_path / "state")})
        slots = SlotAllocator(1024)
        regions = RegionSet(cfg, slots, None, fastpath.plain_shared())
        region = Region(fd, memfd, addr, N * PAGE, owner=None)
        region.table.move(np.arange(N), pt.RESIDENT)
        region.table.flags[SHARED] = pt.F_DIRTY
        budget = Budget(cfg, regions, None)
        cow = CopyOnWrite(regions, budget, slots)
        fork = ForkManager(regions, slots, cow)
        try:
            yield region, fork, cow
        finally:
            for snap in list(fork.pending.values()):
                fork._discard(snap)
            region.uffd = region.memfd = -1  # registered_memfd closes them


def _read_by_the_most_children(region: Region, cow: CopyOnWrite) -> tuple[np.ndarray, list[_Child]]:
    """Page SHARED of `region` read by MAX_CHILDREN stand-in children: (the
    mask of that page, the children)."""
    at = np.zeros(N, bool)
    at[SHARED] = True
    children = [_Child() for _ in range(MAX_CHILDREN)]
    for child in children:
        cow.link(child, region, at)
    assert int(cow.shares[region].counts[SHARED]) == MAX_CHILDREN
    return at, children


def test_a_link_past_the_most_a_share_count_holds_is_refused_changing_nothing(parent):
    region, _, cow = parent
    at, _ = _read_by_the_most_children(region, cow)
    share = cow.shares[region]

    try:
        cow.link(_Child(), region, at)
        refusal = None
    except OverflowError as e:
        refusal = str(e)

    assert int(share.counts[SHARED]) == MAX_CHILDREN, "the count wrapped"  # before: to 0
    assert refusal is not None and f"{MAX_CHILDREN} forked children" in refusal, refusal
    assert share.total == MAX_CHILDREN and len(share.children) == MAX_CHILDREN
    assert cow.children_at(region, SHARED) == MAX_CHILDREN


def test_a_fork_past_the_most_a_share_count_holds_is_refused_and_the_next_one_served(parent):
    region, fork, cow = parent
    _, children = _read_by_the_most_children(region, cow)
    share = cow.shares[region]
    charged = fork.regions.charged

    try:
        fork.begin([region])
        message = None
    except ForkRefused as e:
        message = str(e)

    assert int(share.counts[SHARED]) == MAX_CHILDREN, "the count wrapped"  # before: to 0
    assert message is not None and message.startswith("fork_begin:") and f"page {SHARED} of region" in message, message
    assert f"{MAX_CHILDREN} forked children" in message, message
    assert share.total == MAX_CHILDREN and len(share.children) == MAX_CHILDREN
    assert not fork.pending and fork.stats["forks_total"] == 0
    assert fork.regions.charged == charged
    assert cow.copied == 0

    # One child gone (its page copied in, or itself closed): the next fork is served.
    cow._unlink(children.pop(), region, np.array([SHARED]))
    token, keep_w, ids = fork.begin([region])
    os.close(keep_w)
    assert ids == [region.id] and token in fork.pending
    assert int(share.counts[SHARED]) == MAX_CHILDREN
