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
must never map a wrong page: every value read is checked as it is read and
the whole region at the end; the audit is exact; no illegal transition; no
thread stalls (each bounded by the test's deadline); and the streams were
read ahead (readahead pages counted) -- against a real O_DIRECT file and a
real NFS server."""
from __future__ import annotations

import textwrap

import pytest

from tests.daemon.test_review_inread_stress import _stacks
from tests.harness import Workload, assert_audit, finish_clean, status, wait_for

CLIENT = textwrap.dedent("""
    import ctypes, json, os, random, resource, sys, threading, time
    import numpy as np
    import uswap

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    MAGIC = 0x5EED_2B3C_0000_0000
    ID_WORD = 500
    sock, npages, tail, nstreams, nrandom, seconds, seed = sys.argv[1:8]
    npages, tail, nstreams, nrandom, seconds, seed = (int(npages), int(tail), int(nstreams), int(nrandom),
                                                     float(seconds), int(seed))
    nthreads = nstreams + nrandom
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

    def visit(t, p, rng, cell, caddr, n):
        for word, want in ((ID_WORD, MAGIC ^ p), (8 * t, int(last[t, p]))):
            memmove(caddr, base + p * 4096 + word * 8, 8)
            if cell.value != want:
                wrong(thread=t, page=p, word=word, got=cell.value, want=want)
        # Streams that write some of their pages (a write continuing a
        # stream maps its next windows writable) and others that only read.
        if rng.random() < (0.5 if t % 2 else 0.05):
            cell.value = (t + 1) << 48 | n
            memmove(base + p * 4096 + 8 * t * 8, caddr, 8)
            last[t, p] = cell.value

    def streamer(t):
        rng = random.Random(seed * 1000 + t)
        cell = ctypes.c_uint64()
        caddr = ctypes.addressof(cell)
        step = 1 if t < nstreams // 2 else -1   # half forward, half backward
        p = (t * checked) // nstreams
        n = 0
        while time.monotonic() < deadline:
            n += 1
            visit(t, p, rng, cell, caddr, n)
            p = (p + step) % checked
            if rng.random() < 0.002:
                p = rng.randrange(checked)   # a stream breaks off and starts again elsewhere
            progress[t] += 1

    def randomer(t):
        rng = random.Random(seed * 1000 + t)
        cell = ctypes.c_uint64()
        caddr = ctypes.addressof(cell)
        n = 0
        while time.monotonic() < deadline:
            n += 1
            visit(t, rng.randrange(checked), rng, cell, caddr, n)
            progress[t] += 1

    ops = {"dontneed": 0, "munmap": 0, "mremap": 0, "fork": 0}

    def churner():
        rng = random.Random(seed * 7 + 1)
        mapped = npages
        while time.monotonic() < deadline:
            op = rng.randrange(4)
            if op == 0:
                p = rng.randrange(checked)
                n = min(rng.randrange(1, 65), checked - p)
                if libc.madvise(base + p * 4096, n * 4096, 4) != 0:   # MADV_DONTNEED
                    wrong(op="madvise", errno=ctypes.get_errno())
                ops["dontneed"] += 1
            elif op in (1, 2) and mapped > checked and (npages - mapped) / tail < 1 - (deadline - time.monotonic()) / seconds:
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
            elif op == 3 and ops["fork"] < 10:
                pid = os.fork()   # uswap's at-fork hooks: the daemon snapshots the region
                if pid == 0:
                    try:
                        # The child streams through its snapshot: forward,
                        # then backward (its own region's streams).
                        cell = ctypes.c_uint64()
                        s = rng.randrange(checked - 300)
                        for p in list(range(s, s + 300)) + list(range(s + 299, s - 1, -1)):
                            memmove(ctypes.addressof(cell), base + p * 4096 + ID_WORD * 8, 8)
                            if cell.value != MAGIC ^ p:
                                os._exit(4)
                    finally:
                        os._exit(0)
                _, st = os.waitpid(pid, 0)
                if st != 0:
                    wrong(op="fork child", status=st)
                ops["fork"] += 1

    threads = [threading.Thread(target=streamer, args=(t,)) for t in range(nstreams)]
    threads += [threading.Thread(target=randomer, args=(t,)) for t in range(nstreams, nthreads)]
    threads.append(threading.Thread(target=churner))
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    out(done_streaming=sum(progress), per_thread=progress, ops=ops)
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


@pytest.mark.deadline(360)
@pytest.mark.parametrize("fault_threads", [1, 2])
def test_streams_through_one_region_under_churn(backing, start_daemon, fault_threads):
    """Six streams (three forward, three backward) and two random faulters
    through one region 4x the budget for 15 s, under MADV_DONTNEED, tail
    munmap/mremap and forks whose children stream; every value checked,
    audit exact, no illegal transition, fast-path jobs back to 0, windows
    read ahead."""
    d = start_daemon(backing, store_size="64M", max_resident="3M",
                     config={"fault_threads": fault_threads, "nfs_timeout": "30s"})
    npages, tail, seconds = 3072, 256, 15
    c = Workload.script(CLIENT, d.socket, npages, tail, 6, 2, seconds, 31 + fault_threads)
    try:
        c.wait_line(lambda x: "filled" in x, timeout=60)
        st0 = status(d)
        c.send("go\n")
        try:
            done = c.wait_line(lambda x: "done_streaming" in x or "wrong" in x, timeout=seconds + 90)
        except AssertionError:
            raise AssertionError(f"a client thread stalled: {_stacks(c.pid, 'client')}"
                                 f" {_stacks(d.proc.pid, 'daemon')} {d.log_text()[-3000:]}") from None
        assert "wrong" not in done, done
        assert min(done["per_thread"]) > 50, done
        assert done["ops"]["munmap"] + done["ops"]["mremap"] > 10 and done["ops"]["fork"] > 0, done
        line = c.wait_line(lambda x: "verified" in x or "wrong" in x, timeout=90)
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
        assert st["readahead_pages_total"] - st0["readahead_pages_total"] > 1000, st
    finally:
        c.kill()
    text = finish_clean(d, stop_timeout=30)
    assert "fatal error" not in text, text[-5000:]
    assert "Traceback" not in text, text[-5000:]
