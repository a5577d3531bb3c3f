"""Victim choice (a pure function of page tables) and run splitting."""
from __future__ import annotations

import types

import numpy as np

from uswap.daemon import pagetable as pt
from uswap.daemon.victims import ACTIVE_SHARE, VictimQueue, choose_victims


def region(npages: int, rid: int = 1) -> types.SimpleNamespace:
    return types.SimpleNamespace(id=rid, table=pt.PageTable(npages), closing=False)


def test_oldest_inactive_pages_go_first():
    r = region(100)
    r.table.state[:] = pt.RESIDENT
    r.table.stamp[:] = np.arange(100)          # page 0 faulted longest ago
    r.table.flags[:10] = pt.F_ACTIVE            # ... but the first ten are active
    (got_region, pages), = choose_victims([r], 5, tick=1000)
    assert got_region is r
    assert list(pages) == [10, 11, 12, 13, 14]


def test_active_pages_are_taken_when_inactive_run_out():
    r = region(20)
    r.table.state[:] = pt.RESIDENT
    r.table.stamp[:] = np.arange(20)
    r.table.flags[:] = pt.F_ACTIVE
    r.table.flags[15:] = 0
    (_, pages), = choose_victims([r], 8, tick=1000)
    assert set(pages) >= {15, 16, 17, 18, 19} and len(pages) == 8


def test_active_share_is_capped_by_demoting_the_oldest():
    r = region(100)
    r.table.state[:] = pt.RESIDENT
    r.table.stamp[:] = np.arange(100)
    r.table.flags[:] = pt.F_ACTIVE
    choose_victims([r], 1, tick=1000)
    active = np.flatnonzero(r.table.flags & pt.F_ACTIVE)
    assert len(active) <= int(100 * ACTIVE_SHARE)
    assert active.min() >= 100 - int(100 * ACTIVE_SHARE)  # the youngest stayed active


def test_clean_only_and_state_filters():
    r = region(10)
    r.table.state[:] = pt.RESIDENT
    r.table.state[0] = pt.WRITEBACK
    r.table.state[1] = pt.SWAPPED
    r.table.flags[2:6] = pt.F_DIRTY
    (_, pages), = choose_victims([r], 10, tick=5, clean_only=True)
    assert list(pages) == [6, 7, 8, 9]


def test_stamp_wraparound_counts_as_old():
    r = region(2)
    r.table.state[:] = pt.RESIDENT
    r.table.stamp[0] = 0xFFFFFFF0   # stamped just before the 32-bit wrap: older
    r.table.stamp[1] = 5
    (_, pages), = choose_victims([r], 1, tick=10)
    assert list(pages) == [0]


def test_runs_split_on_gaps_and_length():
    assert pt.runs(np.array([1, 2, 3, 7, 8, 20]), 2) == [(1, 2), (3, 1), (7, 2), (20, 1)]
    assert pt.runs(np.array([], dtype=np.int64), 4) == []


def test_peek_shows_the_next_victims_without_taking_them():
    """Background writeback (cleaner.py) looks at what reclaim takes next:
    peek hands out what take then hands out, in the same order, and a page
    being written ahead (WRITEBACK without F_EVICT) stays a victim, while one
    written to be evicted, or used since it was queued, does not."""
    r = region(64)
    r.table.state[:] = pt.RESIDENT
    r.table.stamp[:] = np.arange(64)
    q = VictimQueue(batch=16)
    (_, first), = q.peek([r], 8, tick=100)
    assert list(first) == list(range(8))
    assert [list(p) for _, p in q.peek([r], 8, tick=100)] == [list(first)]  # nothing taken
    r.table.state[2] = pt.WRITEBACK               # written ahead: still reclaim's to take
    r.table.state[3] = pt.WRITEBACK
    r.table.flags[3] = pt.F_EVICT                  # already on its way out
    r.table.stamp[4] = 101                         # used since the scan
    (_, pages), = q.peek([r], 8, tick=101)
    assert list(pages) == [0, 1, 2, 5, 6, 7, 8, 9]
    taken = q.take([r], 8, tick=101)
    assert [int(p) for _, run in taken for p in run] == list(pages)


class CountingSampler:
    """Stands in for AccessSampler in this unit test of the queue's policy
    (the real one, process_madvise on a client, is tests/daemon/test_sampling*):
    every page counts as sampled and reachable."""

    def __init__(self) -> None:
        self.sampled = 0

    def sample(self, region, pages: np.ndarray) -> bool:
        self.sampled += len(pages)
        return True


def test_peek_scans_when_the_queued_pages_were_used():
    """What counts is the pages still usable: a queue as long as the peek
    wants but used since (the old rule counted its length) is no victim."""
    r = region(1024)
    r.table.state[:] = pt.RESIDENT
    r.table.stamp[:] = np.arange(1024)
    sampler = CountingSampler()
    q = VictimQueue(batch=16, sampler=sampler)
    q.peek([r], 32, tick=2000)
    sampled = sampler.sampled
    r.table.stamp[:] = 2001                       # every page used since
    q.peek([r], 32, tick=2001)
    assert sampler.sampled > sampled


def test_peek_never_hands_out_pages_sampled_in_the_same_turn():
    """Untouched since sampled means something only once the client had a
    chance to touch the page: reclaim's scan and the cleaner's peek run in
    one settle (engine.py), page lock held throughout, so a page sampled by
    that scan cannot have faulted yet. Written ahead at once, such a page is
    a write spent on an unjudged page (a hot one is touched next, dirty
    again, and is no victim), while reclaim's real next victims wait:
    tests/daemon/test_background_writeback.py's dirty-victim test measures it."""
    r = region(4096)
    r.table.state[:] = pt.RESIDENT
    r.table.stamp[:] = np.arange(4096)
    q = VictimQueue(batch=64, sampler=CountingSampler())
    taken = q.take([r], 64, tick=5000)            # reclaim's step: a scan, the next oldest sampled
    assert sum(len(p) for _, p in taken) == 64
    fresh = set(np.concatenate([p for p, _ in q.probation.values()]).tolist())
    assert fresh
    peeked = q.peek([r], 64, tick=5000)           # the cleaner, same turn
    handed = set(np.concatenate([p for _, p in peeked]).tolist()) if peeked else set()
    assert not handed & fresh, sorted(handed & fresh)[:8]


class RecordingSampler(CountingSampler):
    """CountingSampler that also keeps every page it was asked to sample."""

    def __init__(self) -> None:
        super().__init__()
        self.pages: list[int] = []

    def sample(self, region, pages: np.ndarray) -> bool:
        self.pages += pages.tolist()
        return super().sample(region, pages)


def test_a_rescan_samples_no_judged_page_again():
    """A scan that replaces the queue (peek's, when fewer than it wants are
    left) keeps the still-queued victims as judged: they were sampled and
    found untouched already. Sampling them again made a stream sample about
    two pages per page evicted (test_sampling.py's stream test). A queued
    page used since is no longer judged, nor a victim."""
    r = region(4096)
    r.table.state[:] = pt.RESIDENT
    r.table.stamp[:] = np.arange(4096)
    sampler = RecordingSampler()
    q = VictimQueue(batch=64, sampler=sampler)
    for want, tick in ((64, 5000), (16, 5001)):
        # First scan: the 64 oldest go unjudged, the next 64 are sampled;
        # second: those 64 are judged, queued, and 16 of them taken.
        for _, pages in q.take([r], want, tick=tick):
            r.table.state[pages] = pt.SWAPPED
    queued = [int(p) for _, pages, _ in q.pending for p in pages]
    assert queued == list(range(80, 128))
    r.table.stamp[queued[-1]] = 5002              # one queued victim used since
    before = len(sampler.pages)
    q.peek([r], 128, tick=5002)                   # fewer than wanted left: a new scan
    again = set(sampler.pages[before:])
    assert again, "the rescan sampled nothing new"
    assert not again & set(queued), sorted(again & set(queued))[:8]
    handed = [int(p) for _, pages in q.peek([r], 128, tick=5002) for p in pages]
    assert handed[:len(queued) - 1] == queued[:-1]  # still the next victims, in order
    assert queued[-1] not in handed


def test_a_rescan_does_not_judge_pages_it_never_sampled():
    """What stays judged across a rescan is what a scan judged: pages
    sampled and found untouched. The oldest pages queued when nothing could
    be judged (the first scan) were never sampled -- their client may read
    them all the time without a fault -- so when a later scan replaces the
    queue, one that can judge, they are sampled like any page, not handed
    out as victims nor kept on probation unsampled (sampling.py: a page read
    often without faulting is kept)."""
    r = region(4096)
    r.table.state[:] = pt.RESIDENT
    r.table.stamp[:] = np.arange(4096)
    sampler = RecordingSampler()
    q = VictimQueue(batch=64, sampler=sampler)
    q.peek([r], 64, tick=5000)                    # the cleaner first: nothing judged yet
    unjudged = [int(p) for _, pages, _ in q.pending for p in pages]
    assert unjudged and not set(unjudged) & set(sampler.pages)  # queued unsampled (nothing could be judged)
    for _, pages in q.take([r], 100, tick=5000):  # reclaim takes some of them
        r.table.state[pages] = pt.SWAPPED
    left = [int(p) for _, pages, _ in q.pending for p in pages]
    assert left
    handed = [int(p) for _, pages in q.peek([r], 64, tick=5001) for p in pages]  # a rescan: it can judge now
    assert handed, "the rescan judged nothing"
    never = set(left) - set(sampler.pages)
    assert not set(handed) & never, sorted(set(handed) & never)[:8]
    on_probation = set(np.concatenate([p for p, _ in q.probation.values()]).tolist()) if q.probation else set()
    assert not on_probation & never, sorted(on_probation & never)[:8]
