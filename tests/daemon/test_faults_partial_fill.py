"""A zero-fill COPY that maps part of its window and then fails.

The client runs in a cgroup v1 memory group whose limit leaves room for
fewer pages than a zero-fill window, with the OOM killer off, so the COPY
the daemon makes into the client's memfd (charged to the client's group)
maps some pages and then fails with ENOMEM. The daemon used to leave the
pages it had mapped EMPTY and uncharged; mapped write-protected for a read,
each later write to one of them looped for ever through fault_wp. The pages
mapped must become RESIDENT (clean zeros here), the rest go back to EMPTY and
their threads fault again; once the limit is lifted the client finishes and
every page holds what it wrote.
"""
from __future__ import annotations

import os
import textwrap
import uuid

import pytest

from tests.harness import Workload, assert_audit, finish_clean, status, wait_cgroup_removed, wait_for

MEMCG_ROOT = "/sys/fs/cgroup/memory"
PAGES = 4096

CLIENT = textwrap.dedent("""
    import os, sys
    with open(os.path.join(sys.argv[2], "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))        # before anything else is allocated
    import numpy as np
    import uswap
    from tests.client_program import finish, out

    npages = int(sys.argv[3])
    c = uswap.connect(sys.argv[1])
    r = c.alloc(npages * 4096)
    a = np.frombuffer(r.buf, dtype=np.uint64).reshape(-1, 512)
    ids = np.arange(npages, dtype=np.uint64)
    out(ready=True)
    sys.stdin.readline()
    zeros = int(np.count_nonzero(a[:, 0] == 0))   # first touch by reads: write-protected zeros
    a[:, 1] = ids + 5                              # then the first write to every page
    bad = int(np.count_nonzero(a[:, 1] != ids + 5)) + npages - zeros
    out(bad=bad)
    del a
    finish(c, r, bad)
""")


@pytest.fixture
def memcg():
    """A fresh cgroup v1 memory group with the OOM killer off and no swap."""
    path = os.path.join(MEMCG_ROOT, f"uswap-partial-{uuid.uuid4().hex[:8]}")
    os.mkdir(path)
    try:
        for name, value in (("memory.oom_control", "1"), ("memory.swappiness", "0")):
            with open(os.path.join(path, name), "w") as f:
                f.write(value)
        yield path
    finally:
        set_limit(path, -1)
        wait_cgroup_removed(path)


def set_limit(path: str, limit: int) -> None:
    with open(os.path.join(path, "memory.limit_in_bytes"), "w") as f:
        f.write(str(limit))


def read_int(path: str, name: str) -> int:
    with open(os.path.join(path, name)) as f:
        return int(f.read())


@pytest.mark.parametrize("fault_threads", [0, 4], ids=["engine-only", "fast-path"])
def test_zero_fill_cut_short_by_the_clients_memory_limit(engine_backing, start_daemon, memcg, fault_threads):
    d = start_daemon(engine_backing, store_size="64M", max_resident="64M", config={"fault_threads": fault_threads})
    c = Workload.script(CLIENT, d.socket, memcg, PAGES)
    try:
        assert c.next(30) == {"ready": True}
        # Room for about 300 pages: the 128-page zero-fill windows of the
        # read stream run into the limit part way through one.
        set_limit(memcg, read_int(memcg, "memory.usage_in_bytes") + 300 * 4096)
        failcnt = read_int(memcg, "memory.failcnt")
        c.send()
        wait_for("a COPY refused by the client's memory limit",
                 lambda: "failed: Cannot allocate memory" in d.log_text(), timeout=30)
        assert read_int(memcg, "memory.failcnt") > failcnt
        set_limit(memcg, -1)
        lines = c.finish_done(timeout=90, daemon=d)
    finally:
        c.kill()
    assert lines == [{"ready": True}, {"bad": 0}, {"done": True}], lines
    assert_audit(status(d))
    finish_clean(d)
