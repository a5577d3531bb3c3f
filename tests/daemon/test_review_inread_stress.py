"""`native/fastpath.c` `in_read` (invariant 4's count of fault threads inside
a store read), adversarially (a reviewer's): raised under the page lock in
fp_take_fault, lowered without it as soon as the store read returns, before
the COPY and before the thread takes the lock again to finish its job.

With one or two readers (`fault_threads` 1, 2) and a tight budget, a client's
threads swap in at random (checked reads and writes) while one more thread
of the same client keeps changing its address space under them: runs of the
checked pages dropped from the page tables (MADV_DONTNEED: MINOR faults), the
region's tail unmapped a page at a time by munmap and by mremap (UNMAP
events, for which the unmapping thread waits until a fault thread reads
them, and during which every COPY fails EAGAIN: `mmap_changing`), and forks
(the daemon's snapshot write-protects the dirty pages: WP faults). A thread
past its read doing that COPY, or waiting for the lock while the engine
holds it, is no longer counted, so every fault thread may be away from the
uffd at once; the test fails if any client thread stalls (no hang), if a
value read is wrong, if the audit is not exact, on an illegal transition,
and if `in_read` (status `fast_path_jobs`) is not back to 0 once idle."""
from __future__ import annotations

import contextlib
import os
import textwrap

import pytest

from tests.harness import Workload, assert_audit, finish_clean, status, wait_for

# Page p holds MAGIC ^ p in word ID_WORD and, in word 8*t, the last value
# reader thread t wrote there (kept in `last`, outside the region). The last
# TAIL pages are not read: the churn thread unmaps them one at a time.
CLIENT = textwrap.dedent("""
    import ctypes, json, os, random, resource, sys, threading, time
    import numpy as np
    import uswap

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    MAGIC = 0x5EED_1A2B_0000_0000
    ID_WORD = 500
    sock, npages, tail, nthreads, seconds, seed, churn = sys.argv[1:8]
    npages, tail, nthreads, seconds, seed, churn = (int(npages), int(tail), int(nthreads), float(seconds),
                                                   int(seed), churn == "1")
    # Of the threads, the first `streams` stream through the region (the
    # first half forward, the others backward, from starts spread over it,
    # now and then breaking off to start again elsewhere): the read-ahead
    # streams' test (tests/system/test_review_ra_streams.py). The rest, and
    # all by default, swap in at random.
    streams = int(sys.argv[8]) if len(sys.argv) > 8 else 0
    checked = npages - tail
    out_lock = threading.Lock()

    def out(**kw):
        with out_lock:
            sys.stdout.write(json.dumps(kw) + "\\n")
            sys.stdout.flush()

    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int]
    libc.mremap.restype = ctypes.c_void_p
    client = uswap.connect(sock)
    region = client.alloc(npages * 4096)
    base = region.addr
    a = np.frombuffer(region.buf, dtype=np.uint64).reshape(-1, 512)
    ids = np.arange(npages, dtype=np.uint64)
    a[:, ID_WORD] = ids ^ np.uint64(MAGIC)
    last = np.zeros((nthreads, npages), np.uint64)
    memmove = ctypes.memmove  # drops the GIL: the threads fault concurrently
    out(filled=npages, pid=os.getpid())
    sys.stdin.readline()

    def wrong(**kw):
        out(wrong=kw)
        os._exit(3)

    progress = [0] * nthreads
    deadline = time.monotonic() + seconds

    def reader(t):
        rng = random.Random(seed * 1000 + t)
        cell = ctypes.c_uint64()
        caddr = ctypes.addressof(cell)
        n = 0
        step = (1 if t < streams // 2 else -1) if t < streams else 0
        p = (t * checked) // max(1, streams)
        # Some streams read only, others write as they go.
        writes = 0.3 if t >= streams or t % 2 else 0.02
        while time.monotonic() < deadline:
            if step == 0 or rng.random() < 0.002:
                p = rng.randrange(checked)
            else:
                p = (p + step) % checked
            for word, want in ((ID_WORD, MAGIC ^ p), (8 * t, int(last[t, p]))):
                memmove(caddr, base + p * 4096 + word * 8, 8)
                if cell.value != want:
                    wrong(page=p, word=word, got=cell.value, want=want)
            if rng.random() < writes:
                n += 1
                cell.value = (t + 1) << 48 | n
                memmove(base + p * 4096 + 8 * t * 8, caddr, 8)
                last[t, p] = cell.value
            progress[t] += 1

    ops = {"dontneed": 0, "munmap": 0, "mremap": 0, "fork": 0}

    def churner():
        rng = random.Random(seed * 7 + 1)
        mapped = npages
        while time.monotonic() < deadline:
            op = rng.randrange(4)
            if op == 0:
                p = rng.randrange(checked)
                n = min(rng.randrange(1, 17), checked - p)
                if libc.madvise(base + p * 4096, n * 4096, 4) != 0:   # MADV_DONTNEED
                    wrong(op="madvise", errno=ctypes.get_errno())
                ops["dontneed"] += 1
            elif op in (1, 2) and mapped > checked and (npages - mapped) / tail < 1 - (deadline - time.monotonic()) / seconds:
                # The last page of the mapping goes (spread over the phase):
                # an UNMAP event the caller waits for until a fault thread reads it.
                if op == 1:
                    if libc.munmap(base + (mapped - 1) * 4096, 4096) != 0:
                        wrong(op="munmap", errno=ctypes.get_errno())
                    ops["munmap"] += 1
                else:
                    got = libc.mremap(base, mapped * 4096, (mapped - 1) * 4096, 0)
                    if got != base:
                        wrong(op="mremap", got=got, errno=ctypes.get_errno())
                    ops["mremap"] += 1
                mapped -= 1
            elif op == 3 and ops["fork"] < 12:
                pid = os.fork()   # uswap's at-fork hooks: the daemon snapshots the region
                if pid == 0:
                    try:
                        cell = ctypes.c_uint64()
                        s = rng.randrange(checked - 300)
                        # A child of the streams' test streams through its
                        # snapshot, forward then backward (its own region's streams).
                        pages = ([*range(s, s + 300), *range(s + 299, s - 1, -1)] if streams
                                 else [rng.randrange(checked) for _ in range(8)])
                        for p in pages:
                            memmove(ctypes.addressof(cell), base + p * 4096 + ID_WORD * 8, 8)
                            if cell.value != MAGIC ^ p:
                                os._exit(4)
                    finally:
                        os._exit(0)
                _, st = os.waitpid(pid, 0)
                if st != 0:
                    wrong(op="fork child", status=st)
                ops["fork"] += 1

    threads = [threading.Thread(target=reader, args=(t,)) for t in range(nthreads)]
    if churn:
        threads.append(threading.Thread(target=churner))
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    out(random_done=sum(progress), per_thread=progress, ops=ops)
    errors = int(np.count_nonzero(a[:checked, ID_WORD] != (ids[:checked] ^ np.uint64(MAGIC))))
    for t in range(nthreads):
        errors += int(np.count_nonzero(a[:checked, 8 * t] != last[t, :checked]))
    if errors:
        wrong(verify_errors=errors)
    out(verified=checked)
    del a
    region.close()
    client.close()
    out(done=True)
""")


def _stacks(pid: int, kind: str) -> dict:
    """Each thread's kernel wait channel and stack (root reads them): which
    threads of a stalled process wait in a fault, and on what."""
    got = {}
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            info = {}
            for name in ("comm", "wchan", "stack"):
                with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/{name}") as f:
                    info[name] = f.read().strip()
            got[f"{kind} {tid}"] = info
    return got


def run_churned(d, nthreads: int, seconds: float, seed: int, streams: int = 0,
                npages: int = 3072, tail: int = 512) -> tuple[dict, dict]:
    """CLIENT on daemon `d`, churn on: `nthreads` threads (the first
    `streams` of them streaming) for `seconds`; each must finish within its
    deadline, every value read back, the audit exact, no illegal
    transition, no read or write error, `in_read` and the jobs taken back
    to 0 once idle, the daemon stopped clean. Returns the status before and
    after."""
    c = Workload.script(CLIENT, d.socket, npages, tail, nthreads, seconds, seed, 1, streams)
    try:
        c.wait_line(lambda x: "filled" in x, timeout=60)
        st0 = status(d)
        c.send("go\n")
        try:
            done = c.wait_line(lambda x: "random_done" in x or "wrong" in x, timeout=seconds + 60)
        except AssertionError:
            raise AssertionError(f"a client thread stalled: {_stacks(c.pid, 'client')}"
                                 f" {_stacks(d.proc.pid, 'daemon')} {d.log_text()[-3000:]}") from None
        assert "wrong" not in done, done
        assert min(done["per_thread"]) > 50, done
        assert done["ops"]["munmap"] + done["ops"]["mremap"] > 20 and done["ops"]["fork"] > 0, done
        line = c.wait_line(lambda x: "verified" in x or "wrong" in x, timeout=60)
        assert "wrong" not in line, line
        c.finish_done(60, d)

        def idle():
            st = status(d)
            if st["clients"] or st["audit"] is None or st["fast_path_jobs"] != {"taken": 0, "in_read": 0}:
                return None
            return st
        try:
            st = wait_for("the client gone and no fast-path job left", idle, timeout=30)
        except AssertionError:
            raise AssertionError(f"not idle: {status(d)['fast_path_jobs']}") from None
        assert_audit(st)
        assert st["illegal_transitions_total"] == 0, st["illegal_transitions_total"]
        assert st["read_errors_total"] == 0 and st["write_errors_total"] == 0, st
    finally:
        c.kill()
    text = finish_clean(d, stop_timeout=30)
    assert "fatal error" not in text, text[-5000:]
    assert "Traceback" not in text, text[-5000:]
    return st0, st


@pytest.mark.deadline(300)
@pytest.mark.parametrize("fault_threads", [1, 2])
def test_swap_ins_under_unmaps_forks_and_dontneed_never_hang(backing, start_daemon, fault_threads):
    """Four client threads swap in at random (6x the budget) for 12 s while a
    fifth unmaps the region's tail page by page (munmap, mremap), drops runs
    from the page tables and forks; each thread must finish within its
    deadline, every value read back, the audit exact, no illegal transition,
    `in_read` and the jobs taken back to 0 once idle."""
    d = start_daemon(backing, store_size="64M", max_resident="2M",
                     config={"fault_threads": fault_threads, "nfs_timeout": "30s"})
    st0, st = run_churned(d, 4, 12, 7 + fault_threads)
    assert st["fast_path_swapins_total"] - st0["fast_path_swapins_total"] > 200, st
