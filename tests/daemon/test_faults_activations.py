"""Status `activations_total`: pages swapped in active by their refault
distance (`policy.refault_active` / `native/policy.h` `us_refault_active`),
counted by the engine (`faults.py` `fault_missing`) and by the fast path's
fault threads (`native/fastpath.c`), through a real daemon.

A client writes 4 MiB under a 2 MiB budget (first touches: no swap-in, no
activation), then reads its evicted pages back, latest evicted first, a
stride apart (random faults, not a stream's windows): each comes back
within a budget's worth of faults of its eviction, so it returns active.
Failed before: the key was gone from status (a revert took it out while both
counters went on counting).
"""
from __future__ import annotations

import textwrap

import pytest

from tests.harness import Workload, status

PAGES = 1024   # 4 MiB, twice the budget
STRIDE = 16    # pages apart: past the read-ahead's locality (readahead 32K), each read a fault of its own

CLIENT = textwrap.dedent(f"""
    import sys
    import numpy as np
    import uswap
    from tests.client_program import out

    c = uswap.connect(sys.argv[1])
    r = c.alloc({PAGES} * 4096)
    a = np.frombuffer(r.buf, dtype=np.uint64).reshape(-1, 512)
    a[:, 0] = np.arange(len(a)) + 1
    out(filled=True)
    sys.stdin.readline()
    # The first half went to the store, its end last: read back from there.
    pages = np.arange(len(a) // 2 - 1, -1, -{STRIDE})
    assert all(int(a[p, 0]) == p + 1 for p in pages)
    out(read=len(pages))
    sys.stdin.readline()
    out(done=True)
""")


@pytest.mark.parametrize("fault_threads", [0, 2], ids=["engine", "fast-path"])
def test_a_refault_within_the_distance_is_counted_in_activations_total(engine_backing, start_daemon,
                                                                        fault_threads):
    d = start_daemon(engine_backing, store_size="64M", max_resident="2M",
                     config={"fault_threads": fault_threads})
    c = Workload.script(CLIENT, d.socket)
    try:
        assert c.next(60) == {"filled": True}
        before = status(d)
        assert before["activations_total"] == 0, before  # first touches only
        assert before["swapped_bytes"] > 0, before
        c.send("\n")
        read = c.next(60)["read"]
        after = status(d)
        swapins = after["swapins_total"] - before["swapins_total"]
        assert swapins > 0, after
        assert after["activations_total"] > 0, (read, swapins, after)
        if fault_threads:
            # More than the engine took faults: the fault threads' count is in it.
            engine_faults = ((after["faults_total"] - after["fast_path_faults_total"])
                             - (before["faults_total"] - before["fast_path_faults_total"]))
            assert after["activations_total"] > engine_faults, (engine_faults, after)
        c.send("\n")
        assert c.next(60) == {"done": True}
        c.finish(30)
    finally:
        c.kill()
