"""A sequential stream over pages whose slots are scattered (performance
issue 14, item 2, "streams stay streams"): after random writes each
eviction took the next free slots, so neighbouring pages sit in slots far
apart. A stream's window still covers its range as ONE load: its I/O
reads each run of adjacent slots into its place in the buffer, then
verifies and maps the window's own pages (readahead.py _window).

  - the pass takes far fewer loads than pages, and more store reads than
    loads (on the old code a window ended at the first slot out of order:
    about one load per page); dirty resident pages inside the windows keep
    their newer bytes;
  - damaged slots inside such windows cost their own pages only: the
    retries read each page from its own slot (a retry that read slot +
    index would read another page's slot: wrong checksum, the page lost);
  - read errors and corrupt reads on the Python pool (the fault injector)
    inside such windows: stalls, never a wrong or lost page.

Counted with the daemon's status counters, never by time; every page's
content checked by the client; against a real O_DIRECT file and a real
nfs:// server."""
from __future__ import annotations

import random
import time

import pytest

from tests.daemon.test_fastpath import status_if
from tests.daemon.test_readahead import CLIENT
from tests.daemon.test_swapin_store_corruption import (Damage, PageReader, apply_damage, read_everything,
                                                       region_of, scan_store, store_file)
from tests.harness import Workload, assert_audit, inject, status, wait_clean, wait_for
from tests.page_probe import build as build_probe
from tests.stream_client import assert_daemon_sound, cmd, running, settled

NPAGES = 6144          # 24 MiB region
BUDGET = "8M"          # 2048 pages
PASS = 4096            # the sequential pass: pages 0..4095, all swapped out
EVERY = 16             # the random pass leaves every 16th page of it resident
# Reclaim keeps half the budget free: room for a stream's windows
# (test_readahead.py says why).
CONFIG = {"high_watermark": 0.5, "low_watermark": 0.45}


def _loads(st: dict) -> int:
    # The old code had no loads counter: each load was one store read.
    return st.get("swapin_loads_total", st["swapin_reads_total"])


def _scatter(c: Workload, d) -> None:
    """Fill, then write every page again in a random order: the pages of
    the pass end up swapped out in scattered slots."""
    cmd(c, "fill", "filled")
    order = random.Random(14).sample(range(NPAGES), NPAGES)
    cmd(c, "dirty " + " ".join(map(str, order)), "dirtied", timeout=120)
    # The last pages written are resident; push the pass's pages out by
    # touching the rest of the region once more.
    cmd(c, "read " + " ".join(map(str, range(PASS, NPAGES))), "read", timeout=120)
    wait_for("the pass's pages swapped out",
             lambda: status_if(d, lambda s: s["writeback_inflight"] == 0
                               and s["swapped_bytes"] >= PASS * 4096), timeout=60)


def test_stream_over_scattered_slots_loads_windows_and_keeps_dirty_pages(backing, start_daemon):
    d = start_daemon(backing, store_size="96M", max_resident=BUDGET, config=CONFIG)
    with running(d, CLIENT, NPAGES) as c:
        _scatter(c, d)
        # A random pass leaves every EVERY-th page of the stream's range
        # resident, clean; half of those are then written (newer than
        # their slots): the windows pass over them and must keep them.
        scattered = list(range(0, PASS, EVERY))
        cmd(c, "read " + " ".join(map(str, random.Random(5).sample(scattered, len(scattered)))), "read")
        cmd(c, "dirty " + " ".join(map(str, scattered[::2])), "dirtied")
        st0 = settled(d)

        cmd(c, f"seq 0 {PASS}", "seq", timeout=120)
        st1 = settled(d)
        loads = _loads(st1) - _loads(st0)
        reads = st1["swapin_reads_total"] - st0["swapin_reads_total"]
        swapins = st1["swapins_total"] - st0["swapins_total"]
        counts = dict(loads=loads, reads=reads, swapins=swapins,
                      faults=st1["faults_total"] - st0["faults_total"])
        # The pass brought the pages of its range back (most of them: the
        # resident ones aside, and reclaim may take some of the windows'
        # pages before the stream reaches them, which come back again).
        assert swapins >= PASS - len(scattered) - 256, counts
        # Windows of up to readahead_max (128 pages): ideally about PASS /
        # 128 of them; the fast path's random one-page loads at the start
        # and the budget's cuts add some. On the old code a window ended at
        # the first slot out of order: a load per page or two (2000+).
        assert loads <= swapins // 16, counts
        # The slots were scattered: the loads read several runs each.
        assert reads >= 4 * loads, counts
        assert st1["illegal_transitions_total"] == 0, st1
        # The dirty pages the windows passed over kept their newer bytes
        # (the pass checked word 1 of every page), and still hold them.
        cmd(c, "read " + " ".join(map(str, scattered)), "read")
    assert_daemon_sound(d)


def test_read_errors_and_corrupt_reads_in_scattered_windows(file_backing, start_daemon):
    """The Python pool (the fault injector's store has no native I/O): a
    window's runs read one by one with Store.read. Every read fails for a
    while, then every read comes back with its first page corrupt: the
    stream stalls and goes on, and every page reads right."""
    d = start_daemon(file_backing, store_size="96M", max_resident=BUDGET, inject={"write_delay": 0.02},
                     config=dict(CONFIG, read_retry_min="5ms", read_retry_max="50ms"))
    with running(d, CLIENT, NPAGES) as c:
        _scatter(c, d)
        # Resident pages in the stream's range, half of them dirty: their
        # slots freed and taken again by the writes the stream's reclaim
        # starts (each held in flight 20 ms), while runs may read through
        # them (invariant 3: never a slot being written; the injector counts).
        scattered = list(range(0, PASS, EVERY))
        cmd(c, "read " + " ".join(map(str, scattered)), "read")
        cmd(c, "dirty " + " ".join(map(str, scattered[::2])), "dirtied")
        st0 = settled(d)
        for spec in ({"fail_reads": ["EIO"]}, {"corrupt_reads": True}):
            half = PASS // 2
            lo, hi = (0, half) if "fail_reads" in spec else (half, PASS)
            # The stream's first fault (a random one-page load, the fast
            # path's when there is one) before the failures start.
            cmd(c, f"seq {lo} {lo + 1}", "seq")
            inject(d, spec)
            c.send(f"seq {lo + 1} {hi}\n")
            time.sleep(0.5)
            inject(d, {"fail_reads": [], "corrupt_reads": False})
            line = c.wait_line(lambda x: "seq" in x or "wrong" in x, 120)
            assert "wrong" not in line, line
        st1 = settled(d)
        loads = _loads(st1) - _loads(st0)
        reads = st1["swapin_reads_total"] - st0["swapin_reads_total"]
        counts = dict(loads=loads, reads=reads, errors=st1["read_errors_total"] - st0["read_errors_total"])
        assert counts["errors"] > 0, counts
        assert reads > loads, counts
        assert st1["poisoned_pages_total"] == 0, st1
        assert st1["illegal_transitions_total"] == 0, st1
        # Every page once more, in order, with no injection.
        cmd(c, f"seq 0 {NPAGES}", "seq", timeout=120)
    assert_daemon_sound(d, io_overlap=True)


def test_read_errors_past_a_retry_read_each_page_from_its_own_slot(file_backing, start_daemon):
    """A window over scattered slots whose reads fail is read again as
    loads of its own pages, each from ITS OWN slot. Read from the window's
    slot + index instead (right only for adjacent slots), a page would fail
    its check on the retry after the store recovered; past read_deadline
    (read_failure: sigbus) that poisons it: a page lost on a healthy store.
    Timing: every read fails for 2.2 s; a failed load is retried after
    1.5 s (still failing, inside the 2 s deadline) and again after 3 s
    (the store has recovered, the deadline has passed): that retry must
    read right."""
    d = start_daemon(file_backing, store_size="96M", max_resident=BUDGET, inject={},
                     config=dict(CONFIG, read_failure="sigbus", read_deadline="2s", read_retry_min="1500ms",
                                 read_retry_max="1500ms"))
    with running(d, CLIENT, NPAGES) as c:
        _scatter(c, d)
        st0 = settled(d)
        cmd(c, "seq 0 1", "seq")
        inject(d, {"fail_reads": ["EIO"]})
        c.send(f"seq 1 {PASS}\n")
        time.sleep(2.2)
        inject(d, {"fail_reads": []})
        line = c.wait_line(lambda x: "seq" in x or "wrong" in x, 120)
        assert "wrong" not in line, line
        st1 = settled(d)
        loads = _loads(st1) - _loads(st0)
        reads = st1["swapin_reads_total"] - st0["swapin_reads_total"]
        counts = dict(loads=loads, reads=reads, errors=st1["read_errors_total"] - st0["read_errors_total"],
                      poisoned=st1["poisoned_pages_total"] - st0["poisoned_pages_total"])
        assert counts["errors"] > 0 and counts["poisoned"] == 0, counts
        assert reads > loads, counts
    assert_daemon_sound(d, io_overlap=True)


# Store damage in scattered windows: tests/page_reader.py's pages, filled
# in a random order, read back in order with read_failure: sigbus.
R_NPAGES = 2048
R_BUDGET_PAGES = 256
R_CONFIG = {"read_failure": "sigbus", "read_deadline": "500ms", "read_retry_min": "10ms",
            "read_retry_max": "50ms", "high_watermark": 0.5, "low_watermark": 0.45}
DAMAGED = 16


@pytest.fixture(scope="module")
def probe_lib() -> str:
    return build_probe()


def _plan(rng: random.Random, slots_of: dict[int, list[int]]) -> list[Damage]:
    """DAMAGED pages with one copy in the store, among those evicted long
    ago (the lowest slots: the store's slots were taken in eviction order;
    the newest ones may belong to pages still resident, clean), half with a
    bit flipped, half zeroed."""
    single = sorted((slots[0], p) for p, slots in slots_of.items() if len(slots) == 1)
    old = [p for _, p in single[:len(single) - 2 * R_BUDGET_PAGES]]
    assert len(old) >= R_NPAGES // 2, f"only {len(old)} old pages in the store"
    plan = []
    for i, page in enumerate(rng.sample(old, DAMAGED)):
        if i % 2:
            where = rng.randrange(4096 * 8)
            plan.append(Damage("bit_flip", page, slots_of[page][0], -1, where, f"bit {where} flipped"))
        else:
            plan.append(Damage("zeroed_block", page, slots_of[page][0], -1, 0, "zeroed"))
    return plan


def test_damaged_slots_in_scattered_windows_cost_their_own_pages(backing, start_daemon, probe_lib):
    seed = random.SystemRandom().randrange(1 << 32)
    print(f"seed {seed}")
    d = start_daemon(backing, store_size="32M", max_resident=str(R_BUDGET_PAGES * 4096), config=R_CONFIG)
    reader = PageReader(d.socket, R_NPAGES, probe_lib)
    try:
        reader.wait_line(lambda x: "region" in x, timeout=30)
        reader.cmd(f"fill random {seed}", "filled", timeout=120)

        def fill_written():
            st = status(d)
            r = region_of(st, reader.pid)
            return st if (r and st["writeback_inflight"] == 0
                          and r["swapped_bytes"] >= (R_NPAGES - 2 * R_BUDGET_PAGES) * 4096) else None
        wait_for("the fill's writes done", fill_written, timeout=60)
        path = store_file(backing)
        slots_of = scan_store(path, R_NPAGES)
        plan = _plan(random.Random(seed), slots_of)
        apply_damage(path, plan, slots_of)
        damaged = {dmg.page: f"{dmg.kind} in slot {dmg.slot}" for dmg in plan}
        st0 = status(d)
        result = read_everything(reader, "seq", 0)
        st1 = status(d)
        assert result["read"] == R_NPAGES, result
        assert not result["wrong"], (seed, result["wrong"][:20], damaged)
        lost = set(result["lost"])
        assert lost == set(damaged), (f"seed {seed}: lost though undamaged {sorted(lost - damaged.keys())},"
                                      f" damaged but read {sorted(damaged.keys() - lost)}; damage {damaged}")
        # The pass's windows were scattered ones: several runs per load.
        loads = _loads(st1) - _loads(st0)
        reads = st1["swapin_reads_total"] - st0["swapin_reads_total"]
        assert reads >= 4 * loads, dict(loads=loads, reads=reads)
        reader.cmd("exit", "done")
        reader.finish(30)
    finally:
        reader.kill()
    assert d.proc.poll() is None, d.log_text()[-5000:]
    wait_clean(d)
    assert_audit(status(d))
    assert "Traceback" not in d.log_text()
