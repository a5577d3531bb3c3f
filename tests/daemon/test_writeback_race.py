"""Issue item (b): the seed's race (a write to a page during its writeback must
never be lost), under a tiny budget so reclaim runs all the time, with slow
store writes so each write stays in flight long enough to be raced.

The InjectingStore checks invariant 3 from the outside: it counts a second
write to a store offset that already has one in flight (overlapping_writes)
and a read of such an offset (reads_during_write).
"""
from __future__ import annotations

import time

from tests.harness import Workload, assert_audit, assert_no_io_overlap, finish_clean, status


def run_sampled(d, *args: str, timeout: float) -> tuple[list[dict], list[dict]]:
    """tests.workload with ARGS against daemon `d`, to its end (bounded by
    `timeout`), with status sampled all along: it must exit 0 with no errors,
    and every sample's audit be exact. Its output lines and the samples."""
    w = Workload(d.socket, *args)
    samples = []
    try:
        deadline = time.monotonic() + timeout
        while w.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"workload still running after {timeout}s; status {status(d)}")
            samples.append(status(d))
            time.sleep(0.05)  # sampling period, not synchronisation
        lines = w.finish_ok(timeout=30)
    finally:
        w.kill()
    for st in samples:
        assert_audit(st)
    return lines, samples


def test_shared_pages_race_with_slow_writeback(backing, start_daemon):
    """4 threads write stamps into the same 2048 pages while a 1 MiB budget
    keeps evicting them and every store write takes 20 ms: writes land on
    pages under writeback all the time. Every last write must survive."""
    d = start_daemon(backing, store_size="64M", max_resident="1M", inject={"write_delay": 0.02})
    lines, samples = run_sampled(d, "--size", "8M", "--shared", "--threads", "4", "--seconds", "8", timeout=60)
    summary = [x for x in lines if "writes" in x]
    assert summary and summary[0]["errors"] == 0, lines
    assert summary[0]["writes"] > 1000, lines  # the threads really hammered the pages

    st = status(d)
    assert st["swapouts_total"] > 0, st
    assert st["swapins_total"] > 0, st
    assert st["pages_written_total"] > 0, st
    assert st["write_errors_total"] == 0 and st["read_errors_total"] == 0, st
    inj = assert_no_io_overlap(st)
    assert inj["max_inflight_writes"] > 1, inj  # writes really overlapped in time
    # Writes really were raced: some sample saw writeback in flight.
    assert max(s["writeback_inflight"] for s in samples) > 0
    # The region is gone: every slot is back once its writes returned.
    text = finish_clean(d)
    assert "invariant 3 broken" not in text


def test_partitioned_random_passes_over_8x_budget(engine_backing, start_daemon):
    """4 threads, each its own pages, in random order, 3 passes over a region
    8x the budget, with slightly slow writes: each pass verifies the previous
    one's stamps. (Delayed by the injector, whose store I/O is the same
    Python path on both stores: the file store in CI, both with USWAP_SOAK.)"""
    d = start_daemon(engine_backing, store_size="64M", max_resident="1M", inject={"write_delay": 0.002})
    lines, samples = run_sampled(d, "--size", "8M", "--threads", "4", "--order", "random", "--passes", "3",
                                 timeout=90)
    assert [x["errors"] for x in lines if "pass" in x] == [0, 0, 0], lines

    st = status(d)
    assert st["swapouts_total"] >= 3 * 2048, st    # 8 MiB through a 1 MiB budget, 3 times
    assert st["swapins_total"] > 0, st
    assert st["pages_written_total"] > 0, st
    assert st["write_errors_total"] == 0 and st["read_errors_total"] == 0, st
    inj = assert_no_io_overlap(st)
    assert inj["max_inflight_writes"] > 1, inj
    # Budget: a healthy store never needs to overcommit.
    assert max(s["resident_bytes"] for s in samples) <= 1 << 20, max(s["resident_bytes"] for s in samples)
    assert st["overcommit_pages_total"] == 0, st
    assert max(s["swapped_bytes"] for s in samples) >= 6 << 20
    text = finish_clean(d)
    assert "invariant 3 broken" not in text


def test_shared_pages_race_without_injection(backing, start_daemon):
    """The same race on the store's own I/O path (for the file store, the C
    I/O pool, which the injecting wrapper bypasses): every last write survives."""
    d = start_daemon(backing, store_size="64M", max_resident="1M")
    run_sampled(d, "--size", "8M", "--shared", "--threads", "4", "--seconds", "6", timeout=60)
    st = status(d)
    assert st["swapouts_total"] > 0 and st["swapins_total"] > 0 and st["pages_written_total"] > 0, st
    assert st["write_errors_total"] == 0 and st["read_errors_total"] == 0, st
    finish_clean(d)
