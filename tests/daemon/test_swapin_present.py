"""A swap-in whose page is found present in the memfd (the COPY's EEXIST):
the store copy wins (native/readmap.h us_verify_map; README "Known
limits"). Something that reads the daemon's own mapping of a region's
memfd at a swapped page -- /proc/PID/mem, a debugger, a sampling profiler
following stale pointers -- plants a page of zeros in the memfd. Before,
a swap-in in flight then kept that page "as newer" and the client read
zeros: lost data (seen once in 12 `py-spy --nonblocking` runs).

Here the planting is made during the swap-in by construction: the daemon
runs through tests/swapin_hooks.py, which holds the load of one page on
the engine thread once its pages are LOADING and before its store read is
submitted; the test reads that page through /proc/DAEMON/mem at the
daemon's mapping (found in /proc/DAEMON/maps as the region's memfd), which
puts a zero page in the memfd, then lets the read go. The client, which
faulted on the page, must read its data. Engine loads (fault_threads 0),
on the C I/O pool (the file store) and on the Python pool (the fault
injector); the fault threads' one-page loads call the same routine
(tests/daemon/test_readmap.py tests it in process).

The same planting, with the load's pages settled otherwise than by its
COPY: a load that fails its read and is retried while the client discards
one of its pages is settled by what the load mapped
(swapin.py _settle_discarded_load), never by what the memfd holds. The
client program (CLIENT) and the helpers here serve tests/daemon/
test_fork_present.py and test_resolve_present.py too."""
from __future__ import annotations

import errno
import json
import os
import textwrap

import pytest

from tests.client_program import FILLED_REGION
from tests.daemon.test_swapin_write_fault import _filled, wait_swapped
from tests.harness import Workload, inject, status, wait_for

PAGE = 4096
HOLD = 400  # swapped out: the oldest pages of a 6 MiB client under a 2 MiB budget


def _held(hooks: str) -> dict | None:
    try:
        with open(os.path.join(hooks, "held.json")) as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None


def _memfd_mapping(pid: int, addr: int) -> str | None:
    """The line of /proc/PID/maps whose range holds addr."""
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= addr < hi:
                return line.strip()
    return None


def _release(hooks: str) -> None:
    """Open the hook's FIFO for writing and close it: the held read goes."""
    path = os.path.join(hooks, "release")

    def opened():
        try:
            return os.open(path, os.O_WRONLY | os.O_NONBLOCK) + 1  # ENXIO until the hook reads it
        except OSError as e:
            if e.errno != errno.ENXIO:
                raise
            return None
    os.close(wait_for("the hook waiting on its FIFO", opened, 30) - 1)


def _plant(pid: int, view: int) -> None:
    """Read the daemon's mapping of a region's memfd at `view` (a swapped
    page's hole) through /proc/PID/mem, as a debugger or py-spy would: it
    reads zeros and leaves a page of zeros in the memfd."""
    mapping = _memfd_mapping(pid, view)
    assert mapping is not None and "/memfd:" in mapping, mapping  # the daemon's mapping of the memfd
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        mem.seek(view)
        assert mem.read(PAGE) == bytes(PAGE)


# A region of NPAGES pages, page p's first word p + 1 (FILLED_REGION), and
# commands on stdin, one a line:
#   touch P...    read pages P on this thread, checked: {"touched": [...]}
#   readbg P      read page P on a thread of its own, not checked (it may be
#                 discarded or written): {"read": P, "value": V}
#   write P V     write V into page P's first word (on this thread): {"wrote": P}
#   discard P     the discard op on page P: {"discarded": P}
#   discard_unanswered P  the discard op on page P sent on the client's
#                 connection with no wait for its answer, and so never sent
#                 again to a next daemon (uswap/client.py repeats one it
#                 waits for): {"sent": P}
#   madvise P A   the client's own madvise(2) of page P with advice A (4:
#                 MADV_DONTNEED, 21: MADV_PAGEOUT), no op sent: {"madvised": P}
#   fork P...     fork (the client's at-fork hooks: the daemon's snapshot);
#                 the child reads pages P, reports {"child": {P: V, ...}}
#                 (not checked) and exits; the parent: {"forked": PID}
#   reap PID      the child's exit code: {"reaped": CODE}
#   exit          {"done": true}
# A page is read with ctypes.memmove, which releases the GIL: a thread
# waiting in a page fault holds back no other.
CLIENT = FILLED_REGION + textwrap.dedent("""
    import ctypes
    import json
    import os
    import threading

    def out(**fields):  # one write(2) a line: threads and a forked child never interleave
        os.write(1, (json.dumps(fields) + "\\n").encode())

    def word(p):
        cell = ctypes.c_uint64()
        ctypes.memmove(ctypes.addressof(cell), r.addr + p * 4096, 8)
        return cell.value

    def bad(pages):
        got = {p: word(p) for p in pages}
        return {str(p): v for p, v in got.items() if v != p + 1}

    for line in sys.stdin:
        cmd = line.split()
        pages = [int(x) for x in cmd[1:]]
        if cmd[0] == "touch":
            wrong = bad(pages)
            out(**({"wrong": wrong} if wrong else {"touched": pages}))
        elif cmd[0] == "readbg":
            threading.Thread(target=lambda p=pages[0]: out(read=p, value=word(p))).start()
        elif cmd[0] == "write":
            cell = ctypes.c_uint64(pages[1])
            ctypes.memmove(r.addr + pages[0] * 4096, ctypes.addressof(cell), 8)
            out(wrote=pages[0])
        elif cmd[0] == "discard":
            r.discard(pages[0] * 4096, 4096)
            out(discarded=pages[0])
        elif cmd[0] == "discard_unanswered":
            from uswap import protocol
            with c._lock:
                protocol.send(c._sock, {"op": "discard", "region": r.id, "offset": pages[0] * 4096,
                                        "length": 4096})
            out(sent=pages[0])
        elif cmd[0] == "madvise":
            libc = ctypes.CDLL(None, use_errno=True)
            libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
            assert libc.madvise(r.addr + pages[0] * 4096, 4096, pages[1]) == 0, ctypes.get_errno()
            out(madvised=pages[0])
        elif cmd[0] == "fork":
            pid = os.fork()
            if pid == 0:
                out(child={str(p): word(p) for p in pages})
                os._exit(0)
            out(forked=pid)
        elif cmd[0] == "reap":
            out(reaped=os.waitstatus_to_exitcode(os.waitpid(pages[0], 0)[1]))
        elif cmd[0] == "exit":
            break
    out(done=True)
""")


def swapped_client(d) -> Workload:
    """CLIENT over 1536 pages, filled; its oldest pages, 0 up to about
    1000, written back and dropped (under a 2 MiB budget)."""
    c = Workload.script(CLIENT, d.socket, 1536)
    try:
        c.next(30)
        wait_swapped(d)
    except BaseException:
        c.kill()
        raise
    return c


def answer(c: Workload, key: str, timeout: float = 60) -> dict:
    """CLIENT's next line with `key`; a "wrong" line fails."""
    line = c.wait_line(lambda x: key in x or "wrong" in x, timeout)
    assert "wrong" not in line, line
    return line


def neighbours_and_exit(c: Workload, page: int) -> None:
    """CLIENT reads page and its neighbours again, checked, then exits."""
    c.send(f"touch {page - 1} {page} {page + 1}\n")
    answer(c, "touched")
    c.send("exit\n")
    answer(c, "done")


def hooked_daemon(start_daemon, backing: str, tmp_path, hold: int, at: str = "engine", pool: str = "c",
                  **config) -> tuple:
    """A daemon run through swapin_hooks.py, holding the first load of page
    `hold` at `at` (USWAP_TEST_HOLD_AT), with engine loads only
    (fault_threads 0) on the C pool, or ("python") on the Python pool under
    the fault injector; `config`: more settings. (daemon, hooks directory)."""
    hooks = str(tmp_path / "hooks")
    os.makedirs(hooks)
    os.mkfifo(os.path.join(hooks, "release"))
    d = start_daemon(backing, store_size="64M", max_resident="2M", inject={} if pool == "python" else None,
                     module="tests.swapin_hooks", config={"fault_threads": 0, **config},
                     extra_env={"USWAP_TEST_HOOKS": hooks, "USWAP_TEST_HOLD_PAGE": str(hold),
                                "USWAP_TEST_HOLD_AT": at})
    return d, hooks


def write_held(c: Workload, hooks: str, page: int, value: int) -> None:
    """CLIENT writes `value` into `page` (swapped): a write fault, whose load
    maps the page writable and is then held (USWAP_TEST_HOLD_AT=io_after)."""
    c.send(f"write {page} {value}\n")
    wait_for("the swap-in held by the hook", lambda: _held(hooks), 30)
    answer(c, "wrote")


@pytest.mark.parametrize("pool", ["c", "python"])
def test_page_planted_during_swapin_is_replaced_by_the_store_copy(file_backing, start_daemon, tmp_path, pool):
    d, hooks = hooked_daemon(start_daemon, file_backing, tmp_path, HOLD, pool=pool)
    a = _filled(d)
    try:
        a.send(f"touch {HOLD}\n")  # faults; the load of page HOLD is held, LOADING
        held = wait_for("the swap-in held by the hook", lambda: _held(hooks), 30)
        mapping = _memfd_mapping(d.pid, held["view"])
        assert mapping is not None and "/memfd:" in mapping, mapping  # the daemon's mapping of the memfd
        # A reader of the daemon's memory at the swapped page: a hole, so it
        # reads zeros -- and leaves a zero page in the memfd.
        with open(f"/proc/{d.pid}/mem", "rb", buffering=0) as mem:
            mem.seek(held["view"])
            assert mem.read(PAGE) == bytes(PAGE)
        _release(hooks)
        line = a.wait_line(lambda x: "touched" in x or "wrong" in x, 60)
        assert "wrong" not in line, line  # before: the client read the zeros ("got": 0) and exited

        # Its neighbours and the page again, through the client's mapping.
        a.cmd(f"touch {HOLD - 1} {HOLD} {HOLD + 1}", "touched")
        log = d.log_text()
        assert "the store copy wins" in log, log[-3000:]
        assert status(d)["present_replaced_total"] == 1  # counted for the operator too
        a.exit_ok()
    finally:
        a.kill()


def test_planted_page_of_a_retried_load_is_not_taken_as_mapped_when_a_neighbour_is_discarded(
        file_backing, start_daemon, tmp_path):
    """A load of a window whose read fails is retried; the client discards
    one of its pages meanwhile, so the retry settles the window without
    reading (swapin.py _settle_discarded_load). Page HOLD of that window got
    a zero page planted while the load was held. Before, the settling took
    "in the memfd" for "mapped by the load": HOLD became a clean RESIDENT
    page of zeros and the client read 0. Now it is SWAPPED again, and the
    client's touch finds a stray page: the slot copy wins."""
    hold, near, fault = 390, 384, 389  # 384 alone (random), then 389 near it: the aligned window 384..391
    d, hooks = hooked_daemon(start_daemon, file_backing, tmp_path, hold, pool="python",
                             read_retry_min="10ms", read_retry_max="50ms")
    c = swapped_client(d)
    try:
        c.send(f"touch {near}\n")
        answer(c, "touched")
        inject(d, {"fail_reads": ["EIO"]})  # every read fails from here, until cleared
        c.send(f"readbg {fault}\n")  # its load (the window, HOLD in it) is held, LOADING
        held = wait_for("the swap-in held by the hook", lambda: _held(hooks), 30)
        assert held["first"] <= fault < held["first"] + held["n"], held
        _plant(d.pid, held["view"])
        _release(hooks)
        wait_for("the window's read failed", lambda: "read error on swap store" in d.log_text(), 30)
        # The window is being retried; discarding one of its pages settles
        # it at the next retry, and the answer waits for that.
        c.send(f"discard {fault}\n")
        answer(c, "discarded")
        inject(d, {"fail_reads": []})
        c.send(f"touch {hold}\n")
        answer(c, "touched")  # before: {"wrong": {"390": 0}}
        assert "appeared in memory while swapped; the slot copy wins" in d.log_text()
        c.send("exit\n")
        answer(c, "done")
    finally:
        c.kill()
