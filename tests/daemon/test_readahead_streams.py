"""Several sequential streams through one region at once (performance issue
14, item 6, the scale row: 4 threads, each with its own 64-page runs). A
region keeps several read-ahead streams, the latest used first
(native/policy.h us_ra_find, us_ra_use; readahead.py): a fault belongs to
the first stream with locality to it, and a random one starts a new stream
in place of the least recently used. With one stream per region, each
stream's next fault came after another's and was taken for random: every
page a one-page load on a fault thread (the scale row: 58k faults, 52k of
them one-page loads, for 71k pages swapped in; kernel swap took 20k faults).

Counted with the daemon's status counters, never by time; every page's
content checked by the client; against a real O_DIRECT file."""
from __future__ import annotations

from tests.daemon.test_readahead import CLIENT
from tests.stream_client import assert_daemon_sound, cmd, fill_swapped, running, settled

NPAGES = 6144          # 24 MiB region
BUDGET = "8M"          # 2048 pages: the fill leaves pages 0..4095 swapped
STREAMS = 4            # streams read at once, page by page in turn
RUN = 256              # pages each reads, in order
STARTS = [0, 1024, 2048, 3072]
# Reclaim keeps half the budget free: room for the streams' windows
# (test_readahead.py says why).
CONFIG = {"high_watermark": 0.5, "low_watermark": 0.45}


def test_interleaved_streams_are_each_read_ahead(engine_backing, start_daemon):
    d = start_daemon(engine_backing, store_size="96M", max_resident=BUDGET, config=CONFIG)
    with running(d, CLIENT, NPAGES) as c:
        fill_swapped(d, c, 4096)  # the streams' pages on the store
        st0 = settled(d)
        # One thread, the streams' pages in turn: stream 0's page, stream
        # 1's, ..., stream 0's next page -- every fault comes after another
        # stream's, as when threads stream through a region together.
        order = [start + i for i in range(RUN) for start in STARTS]
        cmd(c, "read " + " ".join(map(str, order)), "read", timeout=120)
        st1 = settled(d)
        delta = {k: st1[k] - st0[k] for k in ("fast_path_swapins_total", "swapin_loads_total", "swapins_total",
                                               "faults_total", "minor_faults_total")}
        faults = delta["faults_total"] - delta["minor_faults_total"]
        # Each stream's first fault is random (a one-page load on a fault
        # thread); after it each is a stream with windows read ahead:
        # windows doubling to readahead_max (128 pages), a few faults per
        # stream, not one per page. With one stream per region: about
        # STREAMS * RUN (1024) faults, nearly all one-page loads.
        assert delta["swapins_total"] >= STREAMS * RUN, delta
        assert delta["fast_path_swapins_total"] <= 2 * STREAMS, delta
        assert faults <= STREAMS * RUN // 16, delta
        assert st1["illegal_transitions_total"] == 0, st1
    assert_daemon_sound(d)
