"""Access sampling (sampling.py, victims.py): a resident page used only by
reads, which never fault, must count as used.

A client keeps a hot set of pages that it reads over and over, while a
stream of fresh pages passes through the rest of its region, three budgets'
worth. The hot pages take no fault after they are filled: judged by fault
stamps alone they are the oldest pages once the stream has gone a budget
past them, and are evicted (and swapped in again at their next read).
Sampled, each read after the sampler took them out of the page tables is a
minor fault that marks them used, and the stream's pages go instead. The
stream is written once and never read again, so every swap-in during it is
a hot page coming back.
"""
from __future__ import annotations

import os
import textwrap

from tests.client_program import REGION
from tests.harness import assert_audit, finish_clean, finishing, status
from uswap.daemon.sampling import AccessSampler

BUDGET_PAGES = 2048
HOT_PAGES = 64

# The end of both clients: {"bad": pages read wrong}, the region freed,
# {"done": true}, exit 3 if any page was read wrong.
BAD_AND_DONE = """
out(bad=bad)
del a
from tests.client_program import finish
finish(c, r, bad)
"""

CLIENT = REGION + textwrap.dedent("""
    warm, hot_n = int(sys.argv[3]), int(sys.argv[4])
    hot = np.arange(hot_n)
    a[hot, 0] = hot                        # written once
    for p in range(hot_n, hot_n + warm):   # reclaim runs, and sends the hot set to the store
        a[p, 0] = p
    bad = int(np.count_nonzero(a[hot, 0] != hot))   # read back: clean, its last fault
    out(ready=bad == 0)
    sys.stdin.readline()
    for p in range(warm + hot_n, npages):
        a[p, 0] = p                        # the stream: each page written once
        if p % 8 == 0:
            bad += int(np.count_nonzero(a[hot, 0] != hot))   # the hot set: reads only
""") + BAD_AND_DONE


def test_a_hot_set_touched_only_by_reads_stays_resident(file_backing, start_daemon):
    """The hot set is written, pushed out to the store by the warm-up, then
    read back, so it is clean when the stream starts: the state in which a
    MINOR fault is served on the fault threads."""
    warm = BUDGET_PAGES + BUDGET_PAGES // 2
    npages = warm + HOT_PAGES + 3 * BUDGET_PAGES
    d = start_daemon(file_backing, store_size="64M", max_resident=f"{BUDGET_PAGES * 4 // 1024}M")
    with finishing(d, CLIENT, npages, warm, HOT_PAGES, timeout=30) as c:
        assert c.next(60) == {"ready": True}
        before = status(d)
        c.send()
        assert c.next(120) == {"bad": 0}
        after = status(d)
    assert after["swapouts_total"] - before["swapouts_total"] > 2 * BUDGET_PAGES, after  # the stream went through
    # The hot set stays: judged by fault stamps alone it is evicted about
    # once per budget of stream (248 swap-ins before sampling). Sampled, none leaves on a
    # quiet machine; on a loaded one (another test suite running: 1 run in
    # 15, 82 swap-ins) the engine can sample a hot page and judge it at its
    # next scan while the client, preempted, has not read it in between:
    # that costs a swap-in, never data. Two hot sets' worth is far from 248.
    assert after["swapins_total"] - before["swapins_total"] <= 2 * HOT_PAGES, (before, after)
    assert after["sampled_pages_total"] > before["sampled_pages_total"], after
    assert after["minor_faults_total"] > before["minor_faults_total"], after   # the reads were seen
    # The hot pages are clean by then (written ahead, cleaner.py): their
    # minor faults are served on the C fault threads (fp_take_minor), not
    # handed to the engine, and counted in both totals.
    fast_minor = after["fast_path_minor_faults_total"] - before["fast_path_minor_faults_total"]
    assert fast_minor > 0, (before, after)
    assert fast_minor <= after["minor_faults_total"] - before["minor_faults_total"], (before, after)
    assert_audit(after)
    finish_clean(d)


def test_a_dropped_hold_pipe_leaks_no_fd():
    """A hold pipe that cannot be emptied is dropped (its page references
    with it) and a new one made at the next sample: that must cost no fd
    (each new pipe once opened /dev/null again, leaking the last one: over
    a long run the daemon would run out of fds)."""
    sampler = AccessSampler()
    sampler._hold_pipe()
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        r, w = sampler._pipe
        for fd in (r, w):  # what _sample_chunk does with a pipe it cannot empty
            os.close(fd)
        sampler._pipe = None
        sampler._hold_pipe()
    assert len(os.listdir("/proc/self/fd")) == before



STREAM = REGION + textwrap.dedent("""
    sys.stdin.readline()
    a[:, 0] = np.arange(npages)            # first touch, front to back
    out(touched=True)
    sys.stdin.readline()
    bad = 0
    for _ in range(2):                     # sequential swap-in, front to back
        bad += int(np.count_nonzero(a[:, 0] != np.arange(npages)))
""") + BAD_AND_DONE


def test_a_stream_samples_each_page_about_once(file_backing, start_daemon):
    """A page is sampled once before it goes: sampled, on probation, judged
    untouched at the next scan, evicted (victims.py VictimQueue._refill).
    On a stream nothing is touched twice, so pages sampled and pages
    evicted match. When a scan that replaced the queue (background
    writeback's peek, cleaner.py, scans whenever fewer victims than it wants
    are left) sampled the still-queued victims again, this stream sampled
    1.58-1.83 pages per page evicted on its first touch and 1.47-1.50 on
    its swap-in (1.9 on 512 MiB under a 128 MiB budget,
    scripts/profile_daemon.py seq and touch); keeping them judged, 0.97-1.12."""
    npages = 8 * BUDGET_PAGES
    d = start_daemon(file_backing, store_size="128M", max_resident=f"{BUDGET_PAGES * 4 // 1024}M")
    with finishing(d, STREAM, npages, timeout=30) as c:
        st0 = status(d)
        c.send()
        assert c.next(120) == {"touched": True}
        st1 = status(d)
        c.send()
        assert c.next(120) == {"bad": 0}
        st2 = status(d)
    for phase, (a, b) in {"first touch": (st0, st1), "sequential swap-in": (st1, st2)}.items():
        evicted = b["swapouts_total"] - a["swapouts_total"]
        sampled = b["sampled_pages_total"] - a["sampled_pages_total"]
        assert evicted > 4 * BUDGET_PAGES, (phase, a, b)   # the stream went through
        assert sampled <= 1.2 * evicted, (phase, sampled, evicted)
    assert_audit(st2)
    finish_clean(d)
