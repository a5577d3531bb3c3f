"""Per-uid resident shares (shares.py, Reclaim.evict_from), reviewed from
outside: a share is kept while the engine has nothing else to do, and
under clients of two uids faulting, writing back and reclaiming at once it
evicts only what reclaim may (never a page under I/O, mlocked or closing),
keeps the accounting exact (audit clean, no illegal transition) and every
page's contents."""
from __future__ import annotations

import ctypes
import json
import mmap
import os
import random

import uswap
from tests.daemon.test_connections_socket_access import UID_A, UidClient, open_dir  # noqa: F401 (a fixture)
from tests.daemon_proc import DaemonProc
from tests.harness import assert_audit, finish_clean, wait_for

MIB = 1 << 20
PAGE = 4096

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
_libc.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


def resident_bytes(buf: mmap.mmap) -> int:
    """Bytes of `buf` in memory now (mincore(2)): asked of the kernel, not
    of the daemon, so asking does not wake the daemon's engine."""
    n = len(buf) // PAGE
    vec = (ctypes.c_ubyte * n)()
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    if _libc.mincore(addr, len(buf), vec) != 0:
        raise OSError(ctypes.get_errno(), "mincore")
    return sum(v & 1 for v in vec) * PAGE


def test_a_share_is_kept_while_the_engine_is_idle(file_backing, start_daemon):
    """Swap-ins served by the fast path alone take a uid past its share: a
    read that brings a page back under the high watermark leaves no record
    for the engine and wakes nobody. The share must still be restored with
    no further client event. It was restored only when something else woke
    the engine (a status query, another client's fault), so a uid that read
    its pages back held three times its share for as long as it was quiet."""
    d = start_daemon(file_backing, max_resident="64M", config={"max_resident_per_uid": "8M"})
    with uswap.connect(d.socket) as c:
        region = c.alloc(24 * MIB)
        for off in range(0, region.size, PAGE):
            region.buf[off:off + 8] = (off + 3).to_bytes(8, "little")
        # No request to the daemon from here on: mincore asks the kernel.
        wait_for("the uid under its share after writing", lambda: resident_bytes(region.buf) <= 8 * MIB, 20, 0.1)
        # Random swap-ins: the fast path's own (a sequential stream is the engine's).
        offs = list(range(0, region.size, PAGE))
        random.Random(13).shuffle(offs)
        bad = sum(bytes(region.buf[off:off + 8]) != (off + 3).to_bytes(8, "little") for off in offs)
        assert bad == 0
        wait_for("the uid under its share after reading back, with no client event",
                 lambda: resident_bytes(region.buf) <= 8 * MIB, 20, 0.1)
        region.close()
    assert d.stop() == 0


def test_shares_under_reclaim_two_uids_mlock_and_fork(engine_backing, open_dir):
    """Two uids past their shares and the budget at once: uid A (another
    user, two connections) allocating, verifying and freeing regions while
    root rewrites random pages of a region with an mlocked range and a
    forked child reading a snapshot of it (pages AT_PARENT). The shares'
    evictions share reclaim's: the mlocked range never leaves memory, every
    page of every region reads back what was written, the engine's audit of
    charged pages and slots is exact and no transition is illegal."""
    path, daemons = open_dir
    d = DaemonProc(path, engine_backing, store_size="256M", max_resident="24M",
                   config={"socket_mode": "0666", "max_resident_per_uid": "8M"})
    daemons.append(d)
    a = UidClient(d.socket, UID_A)
    assert a.ask(connect="a1")["ok"] and a.ask(connect="a2")["ok"]
    rng = random.Random(7)
    with uswap.connect(d.socket) as c:
        region = c.alloc(16 * MIB)
        npages = region.size // PAGE
        stamp = [0] * npages
        for p in range(npages):
            region.buf[p * PAGE:p * PAGE + 8] = (p << 20).to_bytes(8, "little")
        addr = ctypes.addressof(ctypes.c_char.from_buffer(region.buf))
        assert _libc.mlock(ctypes.c_void_p(addr), 1 * MIB) == 0, ctypes.get_errno()
        child_r, child_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: reads its snapshot slowly while the parent rewrites
            try:
                bad = sum(bytes(region.buf[p * PAGE:p * PAGE + 8]) != (p << 20).to_bytes(8, "little")
                          for p in range(npages))
                os.write(child_w, str(bad).encode())
            finally:
                os._exit(0)
        os.close(child_w)
        for round_ in range(4):
            for conn in ("a1", "a2"):  # A's allocs run while root writes
                a.send(json.dumps({"alloc": conn, "size": 6 * MIB}) + "\n")
            for _ in range(6000):
                p = rng.randrange(npages)
                stamp[p] += 1
                region.buf[p * PAGE:p * PAGE + 8] = ((p << 20) | stamp[p]).to_bytes(8, "little")
            for _ in ("a1", "a2"):
                assert a.next(120) == {"ok": True, "bad_pages": 0}
            lv = (ctypes.c_ubyte * 256)()
            assert _libc.mincore(ctypes.c_void_p(addr), 1 * MIB, lv) == 0
            assert all(v & 1 for v in lv), f"round {round_}: an mlocked page was evicted"
            for conn in ("a1", "a2"):
                assert a.ask(free=conn, region=0)["ok"]
        with os.fdopen(child_r) as f:
            assert f.read() == "0", "the child read a wrong page of its snapshot"
        os.waitpid(pid, 0)
        st = d.status()
        assert st["swapouts_total"] > 0 and st["illegal_transitions_total"] == 0, st
        assert_audit(st)
        bad = [p for p in range(npages)
               if bytes(region.buf[p * PAGE:p * PAGE + 8]) != ((p << 20) | stamp[p]).to_bytes(8, "little")]
        assert not bad, f"{len(bad)} pages read back wrong, first {bad[:5]}"
        region.close()
    a.close()
    finish_clean(d)
    assert not d.illegal_transitions()
