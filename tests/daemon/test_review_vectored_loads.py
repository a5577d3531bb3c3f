"""Review of the vectored stream windows (readahead.py _window: one load of
every SWAPPED page of a range, read as runs of adjacent slots; AIO on the
file store, one run after another on nfs:// and the Python pool).

The client keeps a version per page (word 1), bumped by every write, so a
page served from an older slot copy (stale) or from bytes of another page
is seen at once: word 0 names the page, word 1 its latest version.

  - a stream that WRITES its way over scattered slots (windows mapped
    writable, the write fault's page among them) with resident pages,
    clean and dirty, inside its windows, then a read pass of everything;
  - two regions streaming at once over scattered slots on a store barely
    larger than the data (slots freed by writes are taken again at once,
    while windows read through them), every page checked;
  - the same on the Python pool with the store's writes and reads held in
    flight: the injector counts any read of a slot with a write in flight
    (invariant 3)."""
from __future__ import annotations

import functools
import random
import textwrap

from tests.harness import Workload, finish_clean, status, wait_for
from tests.stream_client import OPENING, assert_daemon_sound, cmd, running, settled

CLIENT = OPENING + textwrap.dedent("""
    ver = np.zeros(npages, np.uint64)

    def check(p):
        got0, got1, got511 = int(a[p, 0]), int(a[p, 1]), int(a[p, 511])
        if got0 != MAGIC ^ p or got1 != int(ver[p]) or got511 != (int(ver[p]) ^ p):
            out(wrong={"page": p, "word0": got0, "word1": got1, "want1": int(ver[p]), "w511": got511})
            os._exit(3)

    def write(p):
        check(p)
        ver[p] += 1
        a[p, 1] = ver[p]
        a[p, 511] = ver[p] ^ np.uint64(p)

    for cmd in commands():
        if cmd[0] == "fill":
            fill()
            a[:, 511] = np.arange(npages, dtype=np.uint64)
            out(filled=npages)
        elif cmd[0] == "read":
            for p in map(int, cmd[1:]):
                check(p)
            out(read=len(cmd) - 1)
        elif cmd[0] == "write":
            for p in map(int, cmd[1:]):
                write(p)
            out(written=len(cmd) - 1)
        elif cmd[0] == "wseq":
            for p in range(int(cmd[1]), int(cmd[2])):
                write(p)
            out(wseq=cmd[1:])
        elif cmd[0] == "seq":
            for p in range(int(cmd[1]), int(cmd[2])):
                check(p)
            out(seq=cmd[1:])
    del a
    finish(c, r, 0)
""")

NPAGES = 6144
PASS = 4096
EVERY = 16
CONFIG = {"high_watermark": 0.5, "low_watermark": 0.45}


# This file's passes are longer than the other stream tests': two minutes each.
_cmd = functools.partial(cmd, timeout=120)


def _scatter(c: Workload, seed: int, npages: int = NPAGES, pass_: int = PASS) -> None:
    """Fill, write every page in a random order (scattered slots), push the
    pass's pages out, then leave every EVERY-th page of the pass resident,
    half of those dirty (newer than any slot)."""
    _cmd(c, "fill", "filled")
    rng = random.Random(seed)
    _cmd(c, "write " + " ".join(map(str, rng.sample(range(npages), npages))), "written")
    _cmd(c, "read " + " ".join(map(str, range(pass_, npages))), "read")
    scattered = list(range(0, pass_, EVERY))
    _cmd(c, "read " + " ".join(map(str, rng.sample(scattered, len(scattered)))), "read")
    _cmd(c, "write " + " ".join(map(str, scattered[::2])), "written")


def test_write_stream_over_scattered_slots_loses_nothing(backing, start_daemon):
    """A stream of write faults over scattered slots: its windows are
    mapped writable (their slots freed), the fault's own page among them;
    resident pages inside are skip pages. Every page keeps its latest
    version, through a second random write pass and a read pass."""
    d = start_daemon(backing, store_size="96M", max_resident="8M", config=CONFIG)
    with running(d, CLIENT, NPAGES) as c:
        _scatter(c, 1)
        st0 = settled(d)
        _cmd(c, f"wseq 0 {PASS}", "wseq")
        _cmd(c, f"seq {PASS} {NPAGES}", "seq")
        _cmd(c, "write " + " ".join(map(str, random.Random(2).sample(range(NPAGES), NPAGES))), "written")
        _cmd(c, f"read {' '.join(map(str, range(PASS, NPAGES)))}", "read")
        _cmd(c, f"seq 0 {NPAGES}", "seq")
        st1 = settled(d)
        loads = st1["swapin_loads_total"] - st0["swapin_loads_total"]
        reads = st1["swapin_reads_total"] - st0["swapin_reads_total"]
        assert reads > loads, dict(loads=loads, reads=reads)  # scattered windows were used
        assert st1["illegal_transitions_total"] == 0, st1
    assert_daemon_sound(d)


def _two_streams(d, rounds: int) -> dict:
    n = 3072
    cs = [Workload.script(CLIENT, d.socket, n) for _ in range(2)]
    try:
        for c in cs:
            c.next(30)
        for i, c in enumerate(cs):
            _scatter(c, 10 + i, n, 2048)
        st0 = settled(d)
        for r in range(rounds):
            # Both streams at once; then random writes free slots that the
            # next round's windows read through and the store takes again.
            for c in cs:
                c.send(f"seq 0 {n}\n")
            for c in cs:
                line = c.wait_line(lambda x: "seq" in x or "wrong" in x, 180)
                assert "wrong" not in line, line
            for i, c in enumerate(cs):
                rng = random.Random(100 * r + i)
                c.send("write " + " ".join(map(str, rng.sample(range(n), n // 2))) + "\n")
            for c in cs:
                line = c.wait_line(lambda x: "written" in x or "wrong" in x, 180)
                assert "wrong" not in line, line
        st1 = settled(d)
        for c in cs:
            c.send("exit\n")
            c.finish_done(60, d)
    finally:
        for c in cs:
            c.kill()
    assert st1["swapin_reads_total"] - st0["swapin_reads_total"] > st1["swapin_loads_total"] - st0["swapin_loads_total"]
    return st1


def test_two_streams_on_a_tight_store_serve_every_page(backing, start_daemon):
    """Two regions of 12 MiB on a 28 MiB store with a 4 MiB budget: the
    store is nearly full, so the slots writes free are handed out again
    while the other region's windows read through them."""
    d = start_daemon(backing, store_size="28M", max_resident="4M", config=CONFIG)
    st = _two_streams(d, 3)
    assert st["illegal_transitions_total"] == 0, st
    assert st["poisoned_pages_total"] == 0, st
    assert_daemon_sound(d)


def test_two_streams_on_the_python_pool_never_read_a_slot_being_written(file_backing, start_daemon):
    """The same on the Python pool, the store's writes and reads held in
    flight (the injector): no read of a slot with a write in flight."""
    d = start_daemon(file_backing, store_size="28M", max_resident="4M",
                     inject={"write_delay": 0.01, "read_delay": 0.005}, config=CONFIG)
    st = _two_streams(d, 2)
    assert st["illegal_transitions_total"] == 0, st
    assert_daemon_sound(d, io_overlap=True)


def test_windows_of_more_runs_than_one_aio_batch(backing, start_daemon):
    """readahead_max 4M: a window of up to 1024 pages over scattered slots
    is hundreds of runs, several AIO batches of 64 on the file store."""
    d = start_daemon(backing, store_size="96M", max_resident="8M", config=dict(CONFIG, readahead_max="4M"))
    with running(d, CLIENT, NPAGES) as c:
        _scatter(c, 3)
        st0 = settled(d)
        _cmd(c, f"seq 0 {PASS}", "seq")
        st1 = settled(d)
        loads = st1["swapin_loads_total"] - st0["swapin_loads_total"]
        reads = st1["swapin_reads_total"] - st0["swapin_reads_total"]
        assert reads > 64 * 2 and reads > 8 * loads, dict(loads=loads, reads=reads)
        _cmd(c, f"wseq 0 {NPAGES}", "wseq")
        _cmd(c, f"seq 0 {NPAGES}", "seq")
    assert_daemon_sound(d)


# ------------------------------------------------------------ fork, discard, kill with scattered windows in flight

def _scattered_stream_daemon(backing: str, start_daemon):
    """test_review_writeahead_streams' client, its region's pages rewritten
    in a shuffled order (scattered slots), the first half of it swapped
    out; native I/O (no injector): AIO on the file store."""
    from tests.daemon import test_review_writeahead_streams as ws
    d = start_daemon(backing, store_size="64M", max_resident="8M",
                     config={"high_watermark": 0.6, "low_watermark": 0.55})
    c = Workload.script(ws.CLIENT, d.socket, ws.NPAGES_ST)
    c.next(30)
    ws._cmd(c, "fill", "filled")
    ws._cmd(c, "dirtyall 1", "dirtied")
    ws._cmd(c, f"check {ws.NPAGES_ST // 2} {ws.NPAGES_ST}", "checked")
    wait_for("the first half swapped out",
             lambda: (lambda s: s["writeback_inflight"] == 0 and s["swapped_bytes"] >= ws.NPAGES_ST // 2 * 4096)(
                 status(d)), timeout=90)
    return d, c, ws


def test_fork_and_discard_with_scattered_windows_in_flight(backing, start_daemon):
    d, c, ws = _scattered_stream_daemon(backing, start_daemon)
    half = ws.NPAGES_ST // 2
    try:
        ws._scatter_dirty(c, 2, 0, half)
        st0 = ws._quiet(d)
        ws._cmd(c, f"seqbg 0 {half}", "started")
        line = ws._cmd(c, "fork 3", "child", timeout=120)
        assert line["child"] == 0, (line, c.proc.stderr)
        ws._cmd(c, "join", "joined", timeout=120)
        ws._cmd(c, "check", "checked", timeout=120)
        ws._quiet(d)
        ws._cut_and_restore(d, 2 << 20, "8M")
        ws._cmd(c, "dirtyall 4", "dirtied")
        ws._cut_and_restore(d, 2 << 20, "8M")
        ws._scatter_dirty(c, 5, 0, half)
        ws._cmd(c, f"seqbg 0 {half // 2}", "started")
        ws._cmd(c, f"discard {half // 2} {half}", "discarded")
        ws._cmd(c, "join", "joined", timeout=120)
        ws._cmd(c, "check", "checked", timeout=120)
        st1 = ws._quiet(d)
        assert st1["swapin_reads_total"] - st0["swapin_reads_total"] > \
            st1["swapin_loads_total"] - st0["swapin_loads_total"], st1
        ws._exit(c, d)
    finally:
        c.kill()
    finish_clean(d)


def test_client_killed_with_scattered_windows_in_flight(backing, start_daemon):
    import os
    import signal
    d, c, ws = _scattered_stream_daemon(backing, start_daemon)
    try:
        ws._scatter_dirty(c, 2, 0, ws.NPAGES_ST // 2)
        ws._cmd(c, f"seqbg 0 {ws.NPAGES_ST // 2}", "started")
        wait_for("a load in flight", lambda: status(d)["reads_inflight"] > 0, timeout=30, interval=0.001)
        os.kill(c.pid, signal.SIGKILL)
        c.proc.wait(timeout=10)
    finally:
        c.kill()
    finish_clean(d)


def test_nfs_server_frozen_mid_stream_over_scattered_slots(start_daemon, tmp_path):
    """nfs://: ganesha frozen (SIGSTOP) while a stream's scattered windows
    are read run after run on their borrowed contexts: runs time out part
    way through a load; the load is read again page by page from each
    page's own slot once the server answers. Nothing lost, stale or
    poisoned."""
    import os
    import signal
    import uuid
    from tests.nfs_fixture import instance, nfs_server_status, start_nfs_server
    server = start_nfs_server(instance("uswap-test"))
    url = f"{server['url']}/swap-{uuid.uuid4().hex[:12]}"
    d = start_daemon(url, store_size="96M", max_resident="8M",
                     config=dict(CONFIG, nfs_timeout="1s", read_retry_min="50ms", read_retry_max="200ms"))
    c = Workload.script(CLIENT, d.socket, NPAGES)
    pid = nfs_server_status(instance("uswap-test"))["ganesha_pid"]
    stopped = False
    try:
        c.next(30)
        _scatter(c, 7)
        st0 = settled(d)
        c.send(f"seq 0 {PASS}\n")
        wait_for("loads in flight", lambda: status(d)["reads_inflight"] > 0, timeout=30, interval=0.001)
        os.kill(pid, signal.SIGSTOP)
        stopped = True
        wait_for("reads failing", lambda: status(d)["read_errors_total"] > st0["read_errors_total"], timeout=30)
        os.kill(pid, signal.SIGCONT)
        stopped = False
        line = c.wait_line(lambda x: "seq" in x or "wrong" in x, 180)
        assert "wrong" not in line, line
        _cmd(c, f"seq 0 {NPAGES}", "seq")
        st1 = settled(d)
        assert st1["poisoned_pages_total"] == 0, st1
        assert st1["swapin_reads_total"] - st0["swapin_reads_total"] > \
            st1["swapin_loads_total"] - st0["swapin_loads_total"], st1
        c.send("exit\n")
        c.finish_done(60, d)
    finally:
        if stopped:
            os.kill(pid, signal.SIGCONT)
        c.kill()
    finish_clean(d, stop_timeout=60)


def test_drain_with_scattered_windows_in_flight_brings_every_page_home(backing, start_daemon):
    """SIGTERM while a stream's scattered windows are in flight (drain
    reads every page home writable): the client, handed its region back as
    plain memory, finds every page's latest version."""
    d = start_daemon(backing, store_size="96M", max_resident="8M", config=CONFIG)
    c = Workload.script(CLIENT, d.socket, NPAGES)
    try:
        c.next(30)
        _scatter(c, 9)
        settled(d)
        c.send(f"seq 0 {PASS}\n")
        wait_for("loads in flight", lambda: status(d)["reads_inflight"] > 0, timeout=30, interval=0.001)
        assert d.stop(timeout=120) == 0, d.log_text()[-5000:]
        line = c.wait_line(lambda x: "seq" in x or "wrong" in x, 120)
        assert "wrong" not in line, line
        _cmd(c, f"seq 0 {NPAGES}", "seq")
        _cmd(c, f"wseq 0 {NPAGES}", "wseq")
        c.send("exit\n")
        c.wait_line(lambda x: "done" in x, 60)
    finally:
        c.kill()
    assert "Traceback" not in d.log_text()
