"""`writeback.py` `start_writeback`, invariant 1 (first half: the pages are
write-protected BEFORE their copy is read) and invariant 4 (a write during
writeback is never lost), through a real daemon, with no help from access
sampling: the client writes a page of a store write whose copy is on the
store already, while that page is still in the client's page tables
(checked in its pagemap: a sampled page would fault anyway, with or without
the write-protect), and the value must survive the page's eviction and
swap-in.

The daemon runs through tests/writeback_hooks.py (USWAP_TEST_HOOK_HOLD_WRITE:
the first store write is done, then its I/O thread waits on a FIFO before
the engine learns it returned; a write fault parked on a WRITEBACK page is
recorded) -- no timing involved: the test lets the write return once the
client's write has either parked (write-protected: DIR/parked.jsonl) or
gone through (not write-protected: the client says so). Passed with the
protect in start_writeback skipped? No: the client's write lands in the
memfd unseen, the page is dropped when the write returns, and reads back
as the store's older copy (checked by removing the call).
"""
from __future__ import annotations

import json
import os
import textwrap

import pytest

from tests.client_program import FILLED_REGION
from tests.harness import Workload, assert_audit, ctl, finish_clean, status, wait_for

NPAGES = 512  # 2 MiB, all dirty, under the 4 MiB budget: nothing is written until the budget is cut
NEW = 1 << 40  # the value the client writes during the writeback

# argv: SOCKET NPAGES. Fills its region; then, for "write P1 P2 ..." on
# stdin, writes NEW into the first of those pages that is present in its
# page tables (pagemap), on a thread of its own (the write may park), and
# says which page and, when the store returns, that it did; for "check",
# reads its other pages until that page has left memory (mincore), reads
# it back (a swap-in) and reports what every page holds.
CLIENT = FILLED_REGION + textwrap.dedent("""
    import struct, threading
    from tests.client_program import finish
    from uswap import uffd

    def present(p):
        with open("/proc/self/pagemap", "rb") as f:
            f.seek((r.addr // 4096 + p) * 8)
            return bool(struct.unpack("Q", f.read(8))[0] >> 63)

    def write(p):
        a[p, 0] = NEW
        out(wrote=p)

    NEW = int(sys.argv[3])
    writer = None
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "write":
            pages = [int(x) for x in args]
            mapped = [p for p in pages if present(p)]
            out(writing=mapped[0] if mapped else None, present=len(mapped))
            if mapped:
                page = mapped[0]
                writer = threading.Thread(target=write, args=(page,))
                writer.start()
        elif cmd == "check":
            writer.join()
            passes = 0
            while uffd.resident(r.addr + page * 4096, 4096)[0] & 1 and passes < 50:
                passes += 1
                for p in range(npages):
                    if p != page:
                        int(a[p, 0])
            evicted = not uffd.resident(r.addr + page * 4096, 4096)[0] & 1
            expected = np.arange(npages, dtype=np.uint64) + 1
            expected[page] = NEW
            bad = int(np.count_nonzero(a[:, 0] != expected))
            out(evicted=evicted, value=int(a[page, 0]), bad=bad)
            del a
            finish(c, r, bad)
""")


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return None
    return json.loads(text) if text.endswith("\n") else None


def _parked(hooks: str, page: int) -> bool:
    try:
        with open(os.path.join(hooks, "parked.jsonl")) as f:
            return any(json.loads(line)["page"] == page for line in f if line.endswith("\n"))
    except FileNotFoundError:
        return False


def _wrote(c: Workload) -> bool:
    """The client said its write returned (or had said so already)."""
    try:
        c.next(0.02)
    except AssertionError:
        pass  # no line yet
    return any("wrote" in x for x in c.lines)


@pytest.mark.parametrize("fault_threads", [4, 0], ids=["fast-path", "engine-only"])
def test_a_write_during_its_pages_writeback_survives_eviction(engine_backing, start_daemon, tmp_path,
                                                              fault_threads):
    hooks = str(tmp_path / "hooks")
    os.makedirs(hooks)
    os.mkfifo(os.path.join(hooks, "release"))
    d = start_daemon(engine_backing, store_size="64M", max_resident="4M", inject={},
                     config={"fault_threads": fault_threads}, module="tests.writeback_hooks",
                     extra_env={"USWAP_TEST_HOOKS": hooks, "USWAP_TEST_HOOK_HOLD_WRITE": "1"})
    c = Workload.script(CLIENT, d.socket, NPAGES, NEW)
    try:
        assert c.next(60)["filled"] == NPAGES
        ctl(d, {"op": "budget", "max_resident": "256K"})  # reclaim writes the dirty pages
        held = wait_for("a store write held", lambda: _read_json(os.path.join(hooks, "held.json")), 60)
        c.send("write " + " ".join(map(str, held["mapped"])) + "\n")
        line = c.next(30)
        page = line["writing"]
        # Not sampled out: a write to it faults only if the writeback protected it.
        assert page is not None, (line, held)
        # Parked (write-protected) or through (not): either way the store copy is older.
        wait_for("the client's write parked or through", lambda: _parked(hooks, page) or _wrote(c), 30)
        with open(os.path.join(hooks, "release"), "wb"):
            pass  # the held write's completion goes to the engine
        c.send("check\n")
        result = c.wait_line(lambda x: "bad" in x, 120)
        assert result["evicted"], result  # the page left memory: its value came back from the store
        assert (result["value"], result["bad"]) == (NEW, 0), result
        c.finish_done(timeout=60, daemon=d)
    finally:
        c.kill()
    assert_audit(status(d))
    finish_clean(d)
