"""A sequential stream's read-ahead (uswap/daemon/swapin.py): its windows
read through pages that are resident (a random pass left them there), so
they are not cut short at each one, and never overwrite them -- a dirty one
keeps its newer bytes; and several of its windows are read at once.

Counted with the daemon's status counters (faults, swap-in store reads and
their pages, pages read through, the most reads in flight at once), never
by time; against a real O_DIRECT file and a real nfs:// server."""
from __future__ import annotations

import random
import textwrap

from tests.daemon.test_fastpath import status_if
from tests.harness import status, wait_for
from tests.stream_client import OPENING, cmd, running, settled

# The client: one region; fill writes every page's id word (a first-touch
# stream, whose oldest pages are written back and dropped); read P... reads
# pages in the order given and checks them; dirty P... writes a new value in
# word 1 of each (newer than its slot copy); seq LO HI reads LO..HI-1 in
# order and checks them. Any page holding what was not written: exit 3.
CLIENT = OPENING + textwrap.dedent("""
    word1 = np.zeros(npages, np.uint64)

    def check(pages):
        for p in pages:
            got0, got1 = int(a[p, 0]), int(a[p, 1])
            if got0 != MAGIC ^ p or got1 != int(word1[p]):
                out(wrong={"page": p, "word0": got0, "word1": got1, "want1": int(word1[p])})
                os._exit(3)

    for cmd in commands():
        if cmd[0] == "fill":
            fill()
            out(filled=npages)
        elif cmd[0] == "read":
            check(map(int, cmd[1:]))
            out(read=len(cmd) - 1)
        elif cmd[0] == "dirty":
            for p in map(int, cmd[1:]):
                word1[p] = 0xD1D1_0000 + p
                a[p, 1] = word1[p]
            out(dirtied=len(cmd) - 1)
        elif cmd[0] == "seq":
            check(range(int(cmd[1]), int(cmd[2])))
            out(seq=cmd[1:])
        elif cmd[0] == "mix":
            # r:P reads page P (checked); w:P writes its word 1 first (a
            # write fault: a write stream continues), then checks it.
            for op in cmd[1:]:
                p = int(op[2:])
                if op[0] == "w":
                    word1[p] = 0xD1D1_0000 + p
                    a[p, 1] = word1[p]
                check([p])
            out(mixed=len(cmd) - 1)
    del a
    finish(c, r, 0)
""")

NPAGES = 4096        # 16 MiB region
BUDGET = "8M"        # 2048 pages: the fill leaves its first half swapped
PASS = 1024          # the sequential pass: pages 0..1023
EVERY = 8            # a random pass leaves every 8th page of it resident
RA_MAX = 128         # readahead_max 512K, in pages (the default)


def test_stream_reads_through_resident_pages_and_keeps_windows_in_flight(backing, start_daemon):
    # Reclaim keeps half the budget free (the default keeps 1-4%): room for
    # the stream's windows (STREAM_DEPTH of RA_MAX pages: 512) twice over,
    # so that the budget does not cut them even when reclaim lags on a
    # loaded machine (with a quarter free, it did), and what is counted is
    # how resident pages cut them.
    d = start_daemon(backing, store_size="64M", max_resident=BUDGET,
                     config={"high_watermark": 0.5, "low_watermark": 0.45})
    with running(d, CLIENT, NPAGES) as c:
        cmd(c, "fill", "filled")
        wait_for("the first half swapped out",
                 lambda: status_if(d, lambda s: s["writeback_inflight"] == 0
                                   and s["swapped_bytes"] >= NPAGES // 2 * 4096),
                 timeout=60)
        # A random pass over the stream's range: every EVERY-th page comes
        # back alone (random faults), clean; half of them are then written.
        scattered = list(range(0, PASS, EVERY))
        order = random.Random(5).sample(scattered, len(scattered))
        cmd(c, "read " + " ".join(map(str, order)), "read")
        cmd(c, "dirty " + " ".join(map(str, scattered[::2])), "dirtied")
        st0 = settled(d, timeout=30)

        cmd(c, f"seq 0 {PASS}", "seq")
        st1 = settled(d, timeout=30)
        # Minor faults are not the windows': on a loaded machine reclaim runs
        # during the pass, and the sampler takes pages out of the page tables
        # -- the random pass's, and windows' pages read ahead but not yet
        # reached -- whose next touch is a minor fault (403 of 413 faults in
        # one run beside another test suite; a CI run failed on 281).
        faults = ((st1["faults_total"] - st0["faults_total"])
                  - (st1["minor_faults_total"] - st0["minor_faults_total"]))
        runs = PASS // EVERY  # runs of non-resident pages between the resident ones
        # Windows doubling up to RA_MAX pages: about PASS / RA_MAX of them,
        # each taking at most its own fault and one where the client caught
        # up with it. Windows cut at each resident page took one fault and
        # one store read per run of the pages between them (128 here).
        # Ideally 2 * (PASS // RA_MAX + 8) = 32; a window also ends where
        # the fill's evictions left the next page's slot not adjacent, which
        # depends on how reclaim's batches fell on a loaded machine (33-49
        # seen): the bound is half the runs, which the cut windows exceed.
        bound = runs * 3 // 4  # 67 seen in a clean-clone CI run over nfs
        assert faults <= bound < runs, (faults, bound, st0, st1)
        reads = st1["swapin_reads_total"] - st0["swapin_reads_total"]
        through = st1["readthrough_pages_total"] - st0["readthrough_pages_total"]
        read_pages = st1["swapin_read_pages_total"] - st0["swapin_read_pages_total"]
        counts = dict(faults=faults, reads=reads, through=through, read_pages=read_pages)
        assert reads <= bound, counts
        # The windows read through resident pages and covered the pass. Those
        # passed over are the random pass's, and more where a window cut
        # short by a non-adjacent slot leaves pages of its own that a later
        # aligned window passes over again: how many depends on how reclaim's
        # batches fell during the fill (137 seen under load; 209 and 240 in
        # runs beside other test suites, on main as on a change). The upper
        # bound catches windows that re-read what they read (every page of
        # the pass read over again: ~PASS), not that scatter.
        assert 0 < through <= 2 * len(scattered) + RA_MAX, counts
        assert read_pages >= PASS - len(scattered) - RA_MAX // 8, counts
        # Several windows of the stream in flight at once (it was two).
        assert st1["swapin_reads_peak"] > 2, st1
        assert st1["illegal_transitions_total"] == 0, st1
        # The dirty pages read through kept their newer bytes (the pass
        # checked word 1 of every page), and still hold them.
        cmd(c, "read " + " ".join(map(str, scattered)), "read")
    assert status(d)["audit"]["charged_ok"], status(d)["audit"]
