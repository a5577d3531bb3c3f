"""Issue item (c): a failing store.

Writes failing (EIO, then ENOSPC, cycled) leave pages resident and dirty: the
daemon overcommits its budget rather than lose or stall anything, logs the
failing store offsets rate-limited, and swaps normally once the store heals.
Reads failing (EIO) or returning corrupt data stall the faulting client but
never hand it wrong data; once the store heals everything verifies.
"""
from __future__ import annotations

import re
import time

from tests.harness import (Workload, assert_audit, assert_no_io_overlap, finish_clean, inject, status, wait_clean,
                           wait_for)

BUDGET = 1 << 20
ERR_INTERVAL = 1.0
ERR_BURST = 3


def error_lines(log: str, what: str) -> list[str]:
    return [ln for ln in log.splitlines() if what in ln]


def test_failing_writes_keep_pages_resident_then_recover(backing, start_daemon):
    d = start_daemon(backing, store_size="64M", max_resident="1M",
                     inject={"fail_writes": ["EIO", "ENOSPC"]},
                     config={"error_log_interval": ERR_INTERVAL, "error_log_burst": ERR_BURST,
                             "write_retry_min": "20ms", "write_retry_max": "300ms",
                             "slot_quarantine": "1s"})
    t0 = time.monotonic()
    proc = Workload(d.socket, "--size", "4M", "--passes", "2", "--hold")
    try:
        proc.wait_line(lambda x: x.get("holding"), timeout=40)
        assert [x["errors"] for x in proc.lines if "pass" in x] == [0, 0], proc.lines

        # Store failing: nothing could be written, so every dirty page is still
        # resident (over budget), nothing was swapped out, and no slot is held
        # except by a retry in flight or in quarantine after a failed write
        # (a store where a failed write may still land late, like NFS).
        st = status(d)
        assert_audit(st)
        assert st["write_errors_total"] > 0, st
        assert st["pages_written_total"] == 0, st
        assert st["swapouts_total"] == 0, st
        assert st["swapped_bytes"] == 0, st
        assert (st["store"]["used_bytes"] == st["store"].get("quarantined_bytes", 0)
                or st["writeback_inflight"] > 0), st
        assert st["resident_bytes"] > BUDGET, st          # overcommitted, not lost
        assert st["resident_bytes"] >= 3 << 20, st        # (4 MiB all dirty, some pages were clean zeros)
        assert st["overcommit_pages_total"] > 0, st

        # Keep failing for a while: retries go on (with backoff) and keep failing.
        first_errors = st["write_errors_total"]
        wait_for("more failed retries",
                 lambda: status(d)["write_errors_total"] >= first_errors + 8, timeout=20)
        wait_for("2.5 s of failures", lambda: time.monotonic() - t0 > 2.5, timeout=10)
        # Every injected failure is counted once the engine applied its
        # completion: a write failing as status is read is in the store's
        # count and not yet in the engine's, so the two agree only once no
        # failed write waits to be applied (between retries: backoff).
        wait_for("every injected write error counted",
                 lambda: (s := status(d))["store"]["inject"]["injected_write_errors"] == s["write_errors_total"],
                 timeout=20)
        st = status(d)
        elapsed = time.monotonic() - t0
        assert st["swapouts_total"] == 0 and st["pages_written_total"] == 0, st

        # The log names each failing offset, and is rate-limited.
        log = d.log_text()
        errs = error_lines(log, "write error on swap store")
        assert errs, log[-3000:]
        for ln in errs:
            assert re.search(r"offset \d+", ln), ln
        assert any("EIO" in ln for ln in errs) and any("ENOSPC" in ln for ln in errs), errs
        assert len(errs) <= ERR_BURST * (elapsed / ERR_INTERVAL + 1), (len(errs), elapsed, errs)
        assert len(errs) < st["write_errors_total"], (len(errs), st["write_errors_total"])
        assert "suppressed" in log, errs

        # The store heals: pages are written and swapped out, the budget holds again.
        inject(d, {"fail_writes": []})
        wait_for("swap-out after recovery",
                 lambda: (lambda s: s["swapouts_total"] > 0 and s["resident_bytes"] <= BUDGET
                          and s["pages_written_total"] > 0)(status(d)), timeout=30)
        st = status(d)
        assert_audit(st)
        assert st["swapped_bytes"] >= 2 << 20, st
        assert st["store"]["used_bytes"] >= st["swapped_bytes"], st
        assert proc.poll() is None

        # And the holding client still reads back every stamp.
        proc.send("verify\n")
        proc.finish_ok(timeout=30)
    finally:
        proc.kill()
    # The client closed its region: every slot comes back (quarantined ones
    # once the quarantine has passed after a successful write).
    st = wait_clean(d)
    assert st["swapins_total"] > 0, st
    assert_no_io_overlap(st)
    finish_clean(d)


def test_failing_and_corrupt_reads_stall_but_never_lie(backing, start_daemon):
    d = start_daemon(backing, store_size="64M", max_resident="1M", inject={},
                     config={"read_retry_min": "10ms", "read_retry_max": "200ms",
                             "error_log_interval": ERR_INTERVAL, "error_log_burst": ERR_BURST})
    proc = Workload(d.socket, "--size", "4M", "--passes", "2", "--hold")
    try:
        proc.wait_line(lambda x: x.get("holding"), timeout=40)
        st = status(d)
        assert st["swapped_bytes"] >= 2 << 20, st
        assert st["read_errors_total"] == 0, st

        # Reads fail: the client's verification pass stalls on its first swapped page.
        inject(d, {"fail_reads": ["EIO"]})
        proc.send("verify\n")
        wait_for("failed reads", lambda: status(d)["read_errors_total"] >= 5, timeout=20)
        assert proc.poll() is None, "the client finished while every read failed"
        swapins = status(d)["swapins_total"]

        # Reads "succeed" but return corrupt data: caught by the checksum, retried.
        before = status(d)["read_errors_total"]
        inject(d, {"fail_reads": [], "corrupt_reads": True})
        wait_for("corrupt reads detected",
                 lambda: status(d)["read_errors_total"] >= before + 5, timeout=20)
        assert proc.poll() is None, "the client finished while every read was corrupt"
        st = status(d)
        assert st["swapins_total"] == swapins, st  # nothing was mapped from a bad read
        assert st["poisoned_pages_total"] == 0, st
        log = d.log_text()
        errs = error_lines(log, "read error on swap store")
        assert errs and all(re.search(r"offset \d+", ln) for ln in errs), errs
        assert any("checksum" in ln for ln in errs) or "suppressed" in log, errs

        # The store heals: the client goes on and every stamp verifies.
        inject(d, {"corrupt_reads": False})
        proc.finish_ok(timeout=40)
    finally:
        proc.kill()
    st = wait_clean(d)
    assert st["swapins_total"] > swapins, st
    assert st["read_errors_total"] >= 10, st
    assert st["store"]["inject"]["injected_read_errors"] >= 5, st["store"]["inject"]
    assert_no_io_overlap(st)
    finish_clean(d)
