"""Issue 9, items 3 (poison lines), 6, 7 and 8: what the checksums and the
slot quarantine protect, proved against the real daemon and real stores.

  6. A page is dropped as "all zeros" by an exact test, not because its
     checksum equals the zero page's: pages built to collide with the zero
     page (under the old multiply-xorshift hash, and under CRC32C) are
     written, evicted and read back exactly.
  7. A damaged slot costs its own page only: slots corrupted in the store
     file under a running daemon, read back sequentially (read-ahead windows)
     with read_failure: sigbus, lose exactly the damaged pages.
  8. Quarantine: slots of a failed write that may still land are held until
     slot_quarantine after the first successful write after the failure,
     for every error that is not an outright refusal, and on a file store
     whose file is on a network filesystem.
  3. Poison lines name store offsets and are rate-limited.

The machine has no kernel NFS client (CONFIG_NFS_FS is off), so the statfs
rule of item 8 is tested on the function that maps f_type to the flag.
"""
from __future__ import annotations

import errno
import os
import re
import sys
import textwrap
import time

import numpy as np
import pytest

from tests.harness import (Workload, assert_audit, assert_no_io_overlap, finish_clean, inject, status, wait_clean,
                           wait_for)
from uswap import native
from uswap.store import file as file_store
from uswap.store.file import FileStore

PAGE = 4096
M64 = (1 << 64) - 1
ID_MAGIC = 0x1D1D_5A5A_0000_0000
ID_MAGIC2 = 0x7E7E_A5A5_0000_0000
BODY_MAGIC = 0x0B0D_1234_5678_9ABC

# A client driven by commands on stdin, one JSON line out per command.
# Page p's pattern: word 0 = ID_MAGIC ^ p, word 1 = ID_MAGIC2 ^ p (so the
# test can find the page in the store file), word k = BODY_MAGIC ^ p<<16 ^ k.
CLIENT = textwrap.dedent("""
    import ctypes, errno, json, os, sys
    import numpy as np
    import uswap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)

    ID_MAGIC, ID_MAGIC2, BODY_MAGIC = %d, %d, %d
    sock, npages = sys.argv[1], int(sys.argv[2])
    client = uswap.connect(sock)
    region = client.alloc(npages * 4096)
    a = np.frombuffer(region.buf, dtype=np.uint64).reshape(-1, 512)
    k = np.arange(512, dtype=np.uint64)

    def pattern(p):
        w = np.uint64(BODY_MAGIC) ^ np.uint64(p << 16) ^ k
        w[0] = ID_MAGIC ^ p
        w[1] = ID_MAGIC2 ^ p
        return w

    def out(**kw):
        sys.stdout.write(json.dumps(kw) + "\\n")
        sys.stdout.flush()

    def read_kernel():
        # Every page read by the kernel (write(2) from the region into a
        # pipe), in order: a poisoned page fails with EFAULT instead of
        # killing this process with SIGBUS, so one pass counts every loss.
        r, w = os.pipe()
        lost, wrong = [], []
        for p in range(npages):
            try:
                os.write(w, region.buf[p * 4096:(p + 1) * 4096])
            except OSError as e:
                if e.errno != errno.EFAULT:
                    raise
                lost.append(p)
                continue
            got = np.frombuffer(os.read(r, 4096), dtype=np.uint64)
            if not np.array_equal(got, pattern(p)):
                wrong.append(p)
        out(lost=lost, wrong=wrong)

    out(region=region.id, pages=npages, pid=os.getpid())
    for line in sys.stdin:
        cmd = line.split()
        if not cmd:
            continue
        if cmd[0] == "fill":            # fill LO HI: pages [LO, HI) get their pattern, in order
            for p in range(int(cmd[1]), int(cmd[2])):
                a[p] = pattern(p)
            out(filled=int(cmd[2]) - int(cmd[1]))
        elif cmd[0] == "put":           # put P I V [I V...]: page P = zeros but word I = V (hex)
            p = int(cmd[1])
            a[p] = 0
            for i, v in zip(cmd[2::2], cmd[3::2]):
                a[p, int(i)] = np.uint64(int(v, 16))
            out(put=p)
        elif cmd[0] == "get":           # get P: the non-zero words of page P
            p = int(cmd[1])
            out(page=p, words={str(int(i)): hex(int(a[p, i])) for i in np.flatnonzero(a[p])})
        elif cmd[0] == "resident":      # resident P [P...]: which of them the memfd holds (mincore)
            vec = ctypes.create_string_buffer(1)
            held = []
            for p in map(int, cmd[1:]):
                assert libc.mincore(region.addr + p * 4096, 4096, vec) == 0, ctypes.get_errno()
                held.append(bool(vec.raw[0] & 1))
            out(resident=held)
        elif cmd[0] == "read_kernel":
            read_kernel()
        elif cmd[0] == "exit":
            break
    del a
    region.close()
    client.close()
    out(done=True)
""" % (ID_MAGIC, ID_MAGIC2, BODY_MAGIC))


class Client(Workload):
    def __init__(self, socket: str, npages: int) -> None:
        self._spawn([sys.executable, "-c", CLIENT, socket, str(npages)])
        self.next(30)  # its region line

    def cmd(self, text: str, key: str, timeout: float = 60) -> dict:
        self.send(text + "\n")
        return self.wait_line(lambda x: key in x, timeout)

    def exit_ok(self) -> None:
        self.send("exit\n")
        lines = self.finish(30)
        assert self.proc.returncode == 0, (lines, self.proc.stderr.read()[-3000:])


def settled(d, min_swapped: int) -> dict:
    """Wait until nothing is in flight and at least min_swapped bytes are out."""
    return wait_for("writeback to settle", lambda: (lambda st: st if (
        st["writeback_inflight"] == 0 and st["reads_inflight"] == 0
        and st["swapped_bytes"] >= min_swapped) else None)(status(d)), timeout=30)


# ------------------------------------------------------------------ checksums


def test_crc32c_matches_the_standard_in_hardware_and_software():
    """The page checksum is standard CRC32C, and the SSE4.2 path and the
    portable fallback agree on every input."""
    assert native.crc32c(b"123456789") == 0xE3069283       # the CRC32C check value
    assert native.crc32c(b"123456789", hardware=False) == 0xE3069283
    assert native.crc32c(bytes(32)) == 0x8A9136AA           # RFC 3720 B.4: 32 bytes of zeros
    assert native.crc32c(bytes(range(32))) == 0x46DD794E    # RFC 3720 B.4: 0..31
    rng = np.random.default_rng(9)
    for n in (0, 1, 7, 8, 9, 63, 4096, 4099):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert native.crc32c(data) == native.crc32c(data, hardware=False), n
    if "sse4_2" in open("/proc/cpuinfo").read():
        assert native.crc32c_hardware(), "the CPU has sse4_2 but the checksum does not use it"


def test_page_sums_zero_flag_is_exact():
    """The all-zero flag comes from the bytes: one non-zero byte anywhere
    clears it. page_sums' checksum (three interleaved streams on SSE4.2) is
    the page's CRC32C, as computed in one stream by either path."""
    npages = 12
    buf = native.AlignedBuffer(npages * PAGE)
    try:
        view = buf.view()
        view[PAGE + 4095] = 1          # page 1: last byte
        view[2 * PAGE] = 0x80          # page 2: first byte
        view[3 * PAGE + 2048] = 0x01   # page 3: middle
        view[4 * PAGE + 1360] = 0x01   # page 4: first byte of the second stream
        view[5 * PAGE + 4080] = 0x01   # page 5: first byte of the tail
        view[6 * PAGE:] = os.urandom((npages - 6) * PAGE)
        sums, zero = native.page_sums(buf.addr, npages)
        assert zero == [True] + [False] * (npages - 1)
        for p in range(npages):
            page = bytes(view[p * PAGE:(p + 1) * PAGE])
            assert sums[p] == native.crc32c(page) == native.crc32c(page, hardware=False), p
    finally:
        buf.free()


def old_page_sum(words: list[int]) -> int:
    """The page checksum before CRC32C (cf2b06a native/pagesum.h): two lanes
    of multiply-xorshift over alternate 64-bit words, folded to 32 bits, |1."""
    h1, h2 = 0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F
    for i in range(0, 512, 2):
        h1 = ((h1 ^ words[i]) * 0xFF51AFD7ED558CCD) & M64
        h2 = ((h2 ^ words[i + 1]) * 0xC4CEB9FE1A85EC53) & M64
        h1 ^= h1 >> 29
        h2 ^= h2 >> 31
    h = h1 ^ ((h2 * 0x9E3779B97F4A7C15) & M64)
    h ^= h >> 32
    return (h & 0xFFFFFFFF) | 1


def old_hash_zero_collision() -> dict[int, int]:
    """Two non-zero words that leave the old hash exactly where a zero page
    leaves it. Each lane step is (h ^ w) * C then an xorshift: after word 0
    = w1 the lane differs from the zero page's by some d, and word 2 = d
    cancels it before the multiply, so the lanes agree from then on."""
    def step(h: int, w: int) -> int:
        h = ((h ^ w) * 0xFF51AFD7ED558CCD) & M64
        return h ^ (h >> 29)
    w1 = 0x0123_4567_89AB_CDEF
    s0 = 0x9E3779B97F4A7C15
    return {0: w1, 2: step(s0, w1) ^ step(s0, 0)}


def crc32c_zero_collision() -> dict[int, int]:
    """Non-zero words whose page has the zero page's CRC32C (a CRC is linear
    over GF(2), so some set of the 40 bits of bytes 800..804 must XOR to the
    zero page's checksum: Gaussian elimination finds one)."""
    zero = native.crc32c(bytes(PAGE))

    def delta(bit: int) -> int:
        page = bytearray(PAGE)
        page[800 + bit // 8] |= 1 << (bit % 8)
        return native.crc32c(bytes(page)) ^ zero
    basis: dict[int, tuple[int, int]] = {}  # leading bit -> (vector, set of page bits as a mask)
    for bit in range(40):
        vec, combo = delta(bit), 1 << bit
        while vec:
            lead = vec.bit_length() - 1
            if lead not in basis:
                basis[lead] = (vec, combo)
                break
            vec ^= basis[lead][0]
            combo ^= basis[lead][1]
        else:
            page = bytearray(PAGE)
            for b in range(40):
                if combo >> b & 1:
                    page[800 + b // 8] |= 1 << (b % 8)
            words = np.frombuffer(bytes(page), dtype=np.uint64)
            return {int(i): int(words[i]) for i in np.flatnonzero(words)}
    raise AssertionError("40 vectors in 32 dimensions are always dependent")


def page_words(nonzero: dict[int, int]) -> list[int]:
    words = [0] * 512
    for i, v in nonzero.items():
        words[i] = v
    return words


def test_pages_that_collide_with_the_zero_page_are_kept(backing, start_daemon):
    """Item 6: a page whose checksum equals the zero page's is data. Page 0
    collides under the old hash (it read back as zeros at cf2b06a: its slot
    was freed as a zero page), page 1 under CRC32C; both are written through
    a real client, evicted under a small budget, and must read back exactly."""
    old = old_hash_zero_collision()
    assert old_page_sum(page_words(old)) == old_page_sum([0] * 512)   # the collision is real
    crc = crc32c_zero_collision()
    crafted = {0: old, 1: crc}
    buf = native.AlignedBuffer(PAGE)
    try:
        words = np.frombuffer(buf.view(), dtype=np.uint64)
        for i, v in crc.items():
            words[i] = v
        sums, zero = native.page_sums(buf.addr, 1)
        assert sums[0] == native.crc32c(bytes(PAGE)) and zero == [False]   # collides, not zero
    finally:
        buf.free()

    d = start_daemon(backing, store_size="32M", max_resident="1M")
    c = Client(d.socket, 1024)
    try:
        for p, nonzero in crafted.items():
            c.cmd(f"put {p} " + " ".join(f"{i} {v:x}" for i, v in nonzero.items()), "put")
        # 4 MiB through a 1 MiB budget, pages 0 and 1 never touched again:
        # the pass is repeated until both are out of memory (which victims a
        # pass takes is the policy's choice: a page it judged in use stays).
        for _ in range(20):
            c.cmd("fill 2 1024", "filled")
            if not any(c.cmd("resident 0 1", "resident")["resident"]):
                break
        else:
            raise AssertionError("pages 0 and 1 stayed in memory through 20 passes over 4x the budget")
        st = settled(d, 2 << 20)
        before = st["swapins_total"]
        for p, nonzero in crafted.items():
            got = c.cmd(f"get {p}", "page")["words"]
            assert got == {str(i): hex(v) for i, v in nonzero.items()}, (p, got)
        st = status(d)
        assert st["swapins_total"] >= before + 2, st   # they came back from the store
        assert st["zero_drops_total"] == 0, st         # no page here is all zeros
        assert_audit(st)
        c.exit_ok()
    finally:
        c.kill()
    finish_clean(d)


# ------------------------------------------------------------------ damaged slots


def find_slots(path: str, npages: int) -> dict[int, int]:
    """page -> store offset of every page of the client's pattern found in
    the store file (read through the page cache; the daemon writes with
    O_DIRECT, which keeps it coherent)."""
    found: dict[int, int] = {}
    with open(path, "rb") as f:
        off = 0
        while True:
            chunk = f.read(4 << 20)
            if not chunk:
                return found
            w = np.frombuffer(chunk, dtype=np.uint64).reshape(-1, 512)
            ids = w[:, 0] ^ np.uint64(ID_MAGIC)
            hit = np.flatnonzero((ids == (w[:, 1] ^ np.uint64(ID_MAGIC2))) & (ids < npages))
            for i in hit:
                page = int(ids[i])
                assert page not in found, f"page {page} found twice in the store"
                found[page] = off + int(i) * PAGE
            off += len(chunk)


@pytest.mark.parametrize("data_path", ["c_pool", "python_pool"])
def test_damaged_slots_cost_only_their_own_pages(file_backing, start_daemon, data_path):
    """Item 7: slots corrupted in the store file under the daemon, read back
    sequentially (read-ahead windows up to readahead_max) with read_failure:
    sigbus. Exactly the damaged pages are lost (poisoned), every other page
    verifies, and nothing wrong is served. At cf2b06a each damaged page took
    its whole read-ahead window with it. Poison lines name the store offsets
    and are rate-limited (item 3). Both swap-in paths: the C I/O pool's
    READ_COPY job (a plain file store), and the Python pool's (the store
    wrapped in the pass-through fault injector, which has no C data path)."""
    npages = 2048
    d = start_daemon(file_backing, store_size="32M", max_resident="1M",
                     inject={} if data_path == "python_pool" else None,
                     config={"read_failure": "sigbus", "read_deadline": "300ms",
                             "read_retry_min": "10ms", "read_retry_max": "50ms",
                             "error_log_interval": "1s", "error_log_burst": 3})
    c = Client(d.socket, npages)
    try:
        c.cmd(f"fill 0 {npages}", "filled")
        settled(d, 6 << 20)
        slots = find_slots(file_backing, npages)
        out = sorted(slots)
        assert len(out) >= 1500, len(out)
        # Single pages, adjacent pairs and a run of four, spread over the region.
        picks = [3, 4, 70, 200, 201, 202, 203, 330, 331, 600, 900, 1100, 1101, 1400, len(out) - 2]
        damaged = sorted(out[i] for i in picks)
        fd = os.open(file_backing, os.O_WRONLY)
        try:
            for p in damaged:
                assert os.pwrite(fd, os.urandom(PAGE), slots[p]) == PAGE
            os.fsync(fd)
        finally:
            os.close(fd)
        t0 = time.monotonic()
        got = c.cmd("read_kernel", "lost", timeout=120)
        elapsed = time.monotonic() - t0
        assert got["wrong"] == [], got
        assert got["lost"] == damaged, (got["lost"], damaged)
        st = status(d)
        assert st["poisoned_pages_total"] == len(damaged), st
        assert st["read_errors_total"] >= len(damaged), st
        assert st["readahead_pages_total"] >= len(slots) // 2, st   # read in windows, not page by page
        if data_path == "python_pool":
            assert "inject" in st["store"] and st["fast_path_faults_total"] == 0, st
        assert_audit(st)
        c.exit_ok()
    finally:
        c.kill()
    wait_clean(d)
    log = d.log_text()
    poison_lines = [ln for ln in log.splitlines() if "poisoning (SIGBUS)" in ln]
    assert poison_lines, log[-3000:]
    offsets = {slots[p] for p in damaged}
    for ln in poison_lines:
        m = re.search(r"store offset (\d+), (\d+) pages", ln)
        assert m and int(m.group(1)) in offsets, (ln, sorted(offsets))
    # Store error lines go through two limiters (read errors; poisons), each
    # 3 lines per 1 s window.
    assert len(poison_lines) <= 3 * (elapsed + 2), (len(poison_lines), elapsed, poison_lines)
    errors = [ln for ln in log.splitlines() if " ERROR uswap.engine: " in ln]
    assert len(errors) <= 2 * 3 * (elapsed + 2), (len(errors), elapsed, errors)
    assert "suppressed" in log, errors
    assert "Traceback" not in log, log[-5000:]
    assert d.stop() == 0


# ------------------------------------------------------------------ quarantine


def test_network_filesystems_declare_late_writes():
    """Item 8: a file store on a kernel NFS mount (statfs f_type 0x6969) or
    another network filesystem may see a failed write land later; a local
    disk may not. (No kernel NFS client exists here: CONFIG_NFS_FS is off.)"""
    assert file_store.late_writes_possible_on(0x6969)          # NFS_SUPER_MAGIC
    assert file_store.late_writes_possible_on(0xFF534D42)      # CIFS
    assert file_store.late_writes_possible_on(0x00C36400)      # Ceph
    assert not file_store.late_writes_possible_on(0xEF53)      # ext2/3/4
    assert not file_store.late_writes_possible_on(0x58465342)  # XFS
    assert not file_store.late_writes_possible_on(0x9123683E)  # btrfs


def test_which_write_errors_may_land_late(tmp_path):
    """Item 8: every error a request can still be executed after is
    quarantined (not only ETIMEDOUT); outright refusals are not; a store on
    a local disk never quarantines."""
    store = FileStore.open(str(tmp_path / "swapfile"), 1 << 20)
    try:
        assert store.late_writes_possible is False          # this is ext4
        assert store.describe()["late_writes_possible"] is False
        late = [errno.ETIMEDOUT, errno.EIO, errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN,
                errno.ECONNABORTED, errno.EHOSTUNREACH, errno.EINTR, errno.EAGAIN]
        refused = [errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES,
                   errno.EPERM, errno.ESTALE, errno.EINVAL, errno.EBADF]
        for e in late + refused:
            assert not store.write_may_land_late(OSError(e, "x")), errno.errorcode[e]
        store.late_writes_possible = True   # what FileStore.open sets on an NFS mount
        for e in late:
            assert store.write_may_land_late(OSError(e, "x")), errno.errorcode[e]
        for e in refused:
            assert not store.write_may_land_late(OSError(e, "x")), errno.errorcode[e]
    finally:
        store.close()


QUARANTINE = 2.0


@pytest.mark.parametrize("error", ["ETIMEDOUT", "EIO"])
def test_quarantine_counts_from_the_first_success_after_the_failure(backing, start_daemon, error):
    """Item 8, with the fault injector over the real store: writes fail with
    `error` for longer than slot_quarantine, then the store heals. On nfs://
    (late writes possible) the failed writes' slots stay quarantined until
    slot_quarantine after the first successful write -- which comes after
    the heal -- and are freed after that. At cf2b06a the clock ran from each
    failure, so the runs that failed early were freed at the first success
    (ETIMEDOUT), and an EIO was never quarantined at all. On a local file
    nothing is quarantined: a write that returned has ended."""
    nfs = backing.startswith("nfs://")
    d = start_daemon(backing, store_size="64M", max_resident="1M",
                     inject={"fail_writes": [error]},
                     config={"slot_quarantine": f"{QUARANTINE}s", "write_retry_min": "20ms",
                             "write_retry_max": "200ms"})
    proc = Workload(d.socket, "--size", "4M", "--passes", "1", "--hold")
    try:
        proc.wait_line(lambda x: x.get("holding"), timeout=40)
        t_fail = time.monotonic()
        wait_for("failed writes", lambda: status(d)["write_errors_total"] >= 5, timeout=20)
        if nfs:
            wait_for("slots in quarantine", lambda: status(d)["store"]["quarantined_bytes"] > 0, timeout=20)
        # Failing for 2.5 quarantines: the oldest runs failed long before the heal.
        wait_for("failures to outlast the quarantine",
                 lambda: time.monotonic() - t_fail > 2.5 * QUARANTINE, timeout=30)
        held = status(d)["store"]["quarantined_bytes"]
        assert (held > 0) == nfs, (backing, status(d)["store"])
        t_heal = time.monotonic()
        inject(d, {"fail_writes": []})
        # No success can come before t_heal, so until t_heal + QUARANTINE no
        # quarantined slot may be freed (failures in flight may still add some).
        samples = 0
        while True:
            st = status(d)
            if time.monotonic() >= t_heal + QUARANTINE:
                break
            samples += 1
            assert st["store"]["quarantined_bytes"] >= held, (
                f"quarantine freed {time.monotonic() - t_heal:.2f}s after the heal", held, st["store"])
            time.sleep(0.05)  # sampling interval of a condition checked each time, not a synchronisation
        assert samples >= 5, samples
        # ...and it ends: slot_quarantine after the first success.
        wait_for("quarantine to end", lambda: status(d)["store"]["quarantined_bytes"] == 0, timeout=20)
        wait_for("swap-out after recovery", lambda: status(d)["pages_written_total"] > 0, timeout=20)
        proc.send("verify\n")
        proc.finish_ok(timeout=60)
    finally:
        proc.kill()
    assert_no_io_overlap(wait_clean(d))
    finish_clean(d)
