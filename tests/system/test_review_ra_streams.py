"""A region's several read-ahead streams (native/policy.h us_ra_find,
us_ra_use; the 8-row table Region.ra_streams that the engine and the fast
path's threads share, fp_region.ra; native/window.h us_ra_window for the
windows), adversarially (a reviewer's): with a tight budget, six client
threads stream through one region at once -- three forward, three
backward, each from its own start, wrapping round -- and two more fault at
random, reads checked and writes recorded outside the region, while one
more thread of the same client changes the address space under them: runs
dropped from the page tables (MADV_DONTNEED: MINOR faults, and pages the
streams' windows read through), the region's tail unmapped a page at a time
by munmap and by mremap (UNMAP events: rows of the stream table left
pointing past the end), and forks whose children stream through their
snapshot (a child region's table of its own, AT_PARENT pages). The streams'
windows, written by the engine and the rows read by the fault threads,
must never map a wrong page. The client, its churn and the checks are
tests/daemon/test_review_inread_stress.py's (run_churned; its CLIENT's
`streams`): every value read is checked as it is read and the whole
region at the end; the audit is exact; no illegal transition; no thread
stalls; fast-path jobs back to 0 -- and here the streams were read ahead
(readahead pages counted); against a real O_DIRECT file and a real NFS
server."""
from __future__ import annotations

import pytest

from tests.daemon.test_review_inread_stress import run_churned


@pytest.mark.deadline(360)
@pytest.mark.parametrize("fault_threads", [1, 2])
def test_streams_through_one_region_under_churn(engine_backing, start_daemon, fault_threads):
    """Six streams (three forward, three backward) and two random faulters
    through one region 4x the budget for 15 s, under MADV_DONTNEED, tail
    munmap/mremap and forks whose children stream; every value checked,
    audit exact, no illegal transition, fast-path jobs back to 0, windows
    read ahead."""
    d = start_daemon(engine_backing, store_size="64M", max_resident="3M",
                     config={"fault_threads": fault_threads, "nfs_timeout": "30s"})
    st0, st = run_churned(d, 8, 15, 31 + fault_threads, streams=6, tail=256)
    assert st["readahead_pages_total"] - st0["readahead_pages_total"] > 1000, st
