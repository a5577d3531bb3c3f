"""A client that clears O_NONBLOCK on its userfaultfd cannot stall the daemon.

O_NONBLOCK is a flag of the open file, which the client shares with the
daemon (it passed its uffd over the socket). The daemon used to read the
uffd with a plain read() while holding the page lock -- on a fast-path
thread, or on the engine thread for the regions it reads itself -- so once a
client cleared the flag, the read after the last queued event slept until
that client's next fault and every client hung. Here a rogue client clears
the flag and then faults now and then, while a well-behaved client works:
both must finish with their data intact.
"""
from __future__ import annotations

import textwrap

import pytest

from tests.harness import Workload, finish_clean, status

ROGUE = textwrap.dedent("""
    import fcntl, os, sys, time
    import numpy as np
    import uswap
    from tests.client_program import finish, out

    c = uswap.connect(sys.argv[1])
    r = c.alloc(2 << 20)
    fd = r._uffd
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    cleared = not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK
    out(cleared=cleared)
    a = np.frombuffer(r.buf, dtype=np.uint64).reshape(-1, 512)
    ids = np.arange(a.shape[0], dtype=np.uint64)
    # A fault now and then, with pauses in between: each pause leaves the
    # daemon's reader facing an empty queue on a blocking file.
    for p in range(0, a.shape[0], 16):
        a[p:p + 16, 0] = ids[p:p + 16] + 1
        time.sleep(0.002)
    bad = int(np.count_nonzero(a[:, 0] != ids + 1))
    out(bad=bad)
    del a
    finish(c, r, bad)
""")


@pytest.mark.parametrize("fault_threads", [4, 0], ids=["fast-path", "engine-only"])
def test_client_clearing_o_nonblock_stalls_nobody(engine_backing, start_daemon, fault_threads):
    d = start_daemon(engine_backing, store_size="64M", max_resident="2M", config={"fault_threads": fault_threads})
    rogue = Workload.script(ROGUE, d.socket)
    good = None
    try:
        assert rogue.next(30) == {"cleared": True}
        good = Workload(d.socket, "--size", "4M", "--passes", "3", "--threads", "2")
        good.finish_ok(timeout=90)
        lines = rogue.finish_done(timeout=60)
        assert {"bad": 0} in lines, lines
        status(d)  # the daemon still answers
    finally:
        rogue.kill()
        if good is not None:
            good.kill()
    finish_clean(d, stop_timeout=60)
