"""The daemon's own mapping of each client region's memfd (`daddr`) is left
out of its core dumps (native.map_client_view, MADV_DONTDUMP): a dump
reads every page of the mappings it includes, and on a memfd a read of a
hole allocates a zero page there -- over a swapped page, which the
successor would then take as data (a LOADING page's read done, or a page
the client wrote through its memfd). Checked where the kernel says it:
the mapping's VmFlags in the daemon's /proc/PID/smaps carry "dd", for a
region allocated and for the same region adopted by a successor after a
SIGKILL."""
from __future__ import annotations

import textwrap

from tests.harness import Workload, status, wait_for

CLIENT = textwrap.dedent("""
    import sys
    import numpy as np
    import uswap
    from tests.client_program import out

    c = uswap.connect(sys.argv[1])
    r = c.alloc(256 * 4096)
    np.frombuffer(r.buf, dtype=np.uint64)[::512] = 7
    out(filled=True)
    sys.stdin.read()
""")


def _memfd_views(pid: int) -> list[tuple[str, str]]:
    """(range, VmFlags) of every memfd mapping of the process."""
    views, current = [], None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
                current = head[0] if "/memfd:" in line else None
            elif line.startswith("VmFlags:") and current is not None:
                views.append((current, line.split(":", 1)[1].strip()))
    return views


def test_client_views_are_left_out_of_core_dumps(engine_backing, start_daemon):
    d = start_daemon(engine_backing, store_size="64M", max_resident="4M", config={"adopt_timeout": "60s"})
    c = Workload.script(CLIENT, d.socket)
    try:
        c.next(30)
        views = _memfd_views(d.proc.pid)
        assert views, "the daemon maps no memfd"
        assert all("dd" in flags.split() for _, flags in views), views
        d.kill()
        d.restart()
        wait_for("the region adopted", lambda: status(d)["adopted_regions_total"] == 1, 60)
        views = _memfd_views(d.proc.pid)
        assert views and all("dd" in flags.split() for _, flags in views), views
    finally:
        c.kill()
