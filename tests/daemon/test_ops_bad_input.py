"""Issue item (f): bad input never costs anyone else anything.

Protocol garbage on the socket: the offending client gets an error reply
naming the problem and/or is disconnected, while ANOTHER client with a live,
mostly swapped-out region keeps working (its stamps verify at the end) and the
daemon keeps answering status. Raw messages are built with uswap.protocol's
framing and socket.send_fds.

The command line's refusals are in tests/test_cli_run_refusals.py.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import struct
import subprocess
import sys
import time

import pytest

from tests.daemon_proc import REPO
from tests.harness import status
from tests.raw_client import GoodClient, Pieces, assert_alive, connect, expect_refusal, frame, outcome, send_raw
from uswap import protocol, uffd

PAGE = 4096
MAX_REGION = 4 << 20  # max_region_size of the daemons below (the good client uses all of it)


# ----------------------------------------------------------------- the daemon under test

@pytest.fixture
def served(engine_backing, start_daemon):
    """A daemon (max_region_size 4 MiB) with a good client holding a region."""
    d = start_daemon(engine_backing, store_size="64M", max_resident="1M",
                     config={"max_region_size": MAX_REGION})
    good = GoodClient(d)
    try:
        assert status(d)["swapped_bytes"] >= 2 << 20
        yield d, good
    finally:
        good.kill()


# ----------------------------------------------------------------- framing

def test_framing_garbage(served):
    d, good = served
    cases = [
        ("huge length prefix", struct.pack(">I", 0xFFFFFFFF) + b"{}", ("exceeds",)),
        ("length just over the limit", struct.pack(">I", protocol.MAX_MESSAGE + 1) + b"x" * 100, ("exceeds",)),
        ("random bytes", bytes([0xA7]) + bytes((i * 37 + 11) % 256 for i in range(2000)), ("exceeds",)),
        ("empty message", frame(b""), ("JSON",)),
        ("not JSON", frame(b"hello, daemon"), ("JSON",)),
        ("invalid UTF-8", frame(b"\xff\xfe\xfd{"), ("JSON",)),
        ("a megabyte of garbage", frame(b"\x01" * protocol.MAX_MESSAGE), ("JSON",)),
    ]
    for case, data, words in cases:
        s = connect(d, greet=False)
        send_raw(s, data)
        expect_refusal(d, s, case, *words, must_close=True)
        # Same garbage after a proper hello.
        s = connect(d)
        send_raw(s, data)
        expect_refusal(d, s, case + " after hello", *words, must_close=True)

    # A message cut short, then the client leaves: no reply, nothing breaks.
    s = connect(d)
    send_raw(s, struct.pack(">I", 500) + b'{"op": "sta')
    s.close()
    assert_alive(d, "truncated message")
    # A valid message dribbled one byte per send still works.
    s = connect(d, greet=False)
    for b in frame(json.dumps({"op": "hello", "version": protocol.VERSION}).encode()):
        s.send(bytes([b]))
    assert outcome(s)["ok"] is True
    s.close()
    good.verify()


# ----------------------------------------------------------------- JSON level

def test_json_garbage(served):
    d, good = served
    cases = [
        ("JSON array", b"[1, 2, 3]", ("object",)),
        ("JSON string", b'"hello"', ("object",)),
        ("JSON number", b"42", ("object",)),
        ("no op", b'{"version": 1}', ("op",)),
        ("op not a string", b'{"op": 5, "version": 1}', ("op",)),
        ("op null", b'{"op": null}', ("op",)),
        ("NaN version", b'{"op": "hello", "version": NaN}', ()),
    ]
    for case, body, words in cases:
        for greet in (False, True):
            s = connect(d, greet=greet)
            send_raw(s, frame(body))
            expect_refusal(d, s, f"{case} (greeted={greet})", *words, must_close=True)
    good.verify()


@pytest.mark.parametrize("case,body", [
    ("deeply nested JSON", b"[" * 200000),
    ("integer with 5000 digits", b'{"op": "hello", "version": ' + b"9" * 5000 + b"}"),
])
def test_json_parser_limits(served, case, body):
    """Input that makes Python's json parser raise something other than
    JSONDecodeError must be refused like any other garbage."""
    d, good = served
    for greet in (False, True):
        s = connect(d, greet=greet)
        send_raw(s, frame(body))
        expect_refusal(d, s, f"{case} (greeted={greet})", must_close=True)
    good.verify()


# ----------------------------------------------------------------- handshake and ops

def test_handshake_and_unknown_ops(served):
    d, good = served
    s = connect(d, greet=False)
    protocol.send(s, {"op": "status"})
    expect_refusal(d, s, "status before hello", "hello", must_close=True)

    for version in (2, 0, "1", None, 1.5, [1]):
        s = connect(d, greet=False)
        msg = {"op": "hello"} if version is None else {"op": "hello", "version": version}
        protocol.send(s, msg)
        expect_refusal(d, s, f"hello version {version!r}", "version", "not supported", must_close=True)

    s = connect(d)
    protocol.send(s, {"op": "hello", "version": protocol.VERSION})
    expect_refusal(d, s, "second hello", "unknown op", must_close=True)

    s = connect(d)
    protocol.send(s, {"op": "format_the_disk"})
    expect_refusal(d, s, "unknown op", "unknown op", "format_the_disk", must_close=True)

    s = connect(d)
    protocol.send(s, {"op": "inject", "spec": {"fail_writes": ["EIO"]}})
    expect_refusal(d, s, "inject without USWAP_INJECT", "not enabled")
    st = status(d)
    assert "inject" not in st["store"], st["store"]

    # A status request carrying a file descriptor.
    s = connect(d)
    r, w = os.pipe()
    try:
        protocol.send(s, {"op": "status"}, [r])
    finally:
        os.close(r)
        os.close(w)
    expect_refusal(d, s, "status with an fd", "file descriptor", must_close=True)
    good.verify()


def test_free_of_a_region_that_is_not_ours(served):
    d, good = served
    theirs = [r["id"] for c in status(d)["clients"] for r in c["regions"]]
    for region in (999, -1, "1", None, 1.0, True, 2 ** 70):
        s = connect(d)
        protocol.send(s, {"op": "free", "region": region})
        expect_refusal(d, s, f"free {region!r}", "no region")
    for rid in theirs:  # someone else's region
        s = connect(d)
        protocol.send(s, {"op": "free", "region": rid})
        expect_refusal(d, s, f"free of another client's region {rid}", "no region")
    good.verify()


@pytest.mark.parametrize("region", [[1], {"id": 1}])
def test_free_with_unhashable_region_id(served, region):
    d, good = served
    s = connect(d)
    protocol.send(s, {"op": "free", "region": region})
    expect_refusal(d, s, f"free {region!r}")
    good.verify()


def test_fd_flood(served):
    """More fds than a message may carry, and fds piling up across messages."""
    d, good = served
    opened = [os.open("/dev/null", os.O_RDONLY) for _ in range(8)]
    try:
        s = connect(d)
        send_raw(s, frame(json.dumps({"op": "alloc", "size": PAGE, "addr": PAGE}).encode()), opened)
        expect_refusal(d, s, "alloc with 8 fds", "file descriptors", must_close=True)
        # Partial messages, each with 4 fds: the 5th batch goes over the queue limit.
        s = connect(d)
        body = frame(json.dumps({"op": "status"}).encode() + b" " * 100)
        try:
            for i in range(5):
                socket.send_fds(s, [body[i:i + 1]], opened[:4])
        except (BrokenPipeError, ConnectionResetError):
            pass
        expect_refusal(d, s, "fds piling up", must_close=True)
    finally:
        for fd in opened:
            os.close(fd)
    good.verify()


def test_client_that_never_reads_replies(served):
    """A client pipelines status requests and never reads a reply. Its socket
    fills up; the daemon must not stall on it (its fault loop serves every
    other client): another client's status and swap-ins stay prompt."""
    d, good = served
    s = connect(d)
    s.setblocking(False)
    one = frame(json.dumps({"op": "status"}).encode())
    sent = 0
    try:
        for _ in range(20000):
            s.send(one)
            sent += 1
    except BlockingIOError:
        pass
    assert sent > 100
    try:
        t0 = time.monotonic()
        try:
            st = subprocess.run([sys.executable, "-m", "uswap.cli", "status", "--socket", d.socket, "--json"],
                                capture_output=True, text=True, timeout=10, cwd=REPO)
        except subprocess.TimeoutExpired:
            raise AssertionError("`uswap status` got no answer in 10 s while one client did not read"
                                 f" its replies:\n{d.log_text()[-1500:]}") from None
        took = time.monotonic() - t0
        assert st.returncode == 0, st.stderr
        assert took < 5, f"status took {took:.1f}s while one client did not read its replies"
        t0 = time.monotonic()
        good.verify(timeout=60)
        took = time.monotonic() - t0
        assert took < 15, f"the good client's swap-ins took {took:.1f}s"
    finally:
        s.close()
    assert d.proc.poll() is None


# ----------------------------------------------------------------- alloc

def try_alloc(d, case: str, msg: dict, fds: list[int], *words: str) -> None:
    s = connect(d)
    data = frame(json.dumps(msg).encode())
    send_raw(s, data, fds)
    expect_refusal(d, s, case, *words)


def test_alloc_with_wrong_fds(served, tmp_path):
    d, good = served
    p = Pieces()
    r, w = os.pipe()
    null = os.open("/dev/null", os.O_RDWR)
    plain = os.open(tmp_path / "plain", os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(plain, p.size)
    sealed_fake = os.memfd_create("uswap-test", os.MFD_CLOEXEC)
    try:
        try_alloc(d, "0 fds", p.msg(), [], "2 file descriptors", "got 0")
        try_alloc(d, "1 fd", p.msg(), [p.uffd], "2 file descriptors", "got 1")
        try_alloc(d, "3 fds", p.msg(), [p.uffd, p.memfd, p.memfd], "2 file descriptors", "got 3")
        try_alloc(d, "pipe and /dev/null", p.msg(), [r, null], "not a userfaultfd")
        try_alloc(d, "fds swapped", p.msg(), [p.memfd, p.uffd], "not a userfaultfd")
        try_alloc(d, "uffd and a pipe", p.msg(), [p.uffd, w], "not a memfd")
        try_alloc(d, "uffd and /dev/null", p.msg(), [p.uffd, null], "not a memfd")
        try_alloc(d, "uffd and a plain file", p.msg(), [p.uffd, plain], "not a memfd")
        try_alloc(d, "uffd twice", p.msg(), [p.uffd, p.uffd], "not a memfd")
        try_alloc(d, "memfd twice", p.msg(), [p.memfd, p.memfd], "not a userfaultfd")
        # A memfd that cannot be sealed at all (no MFD_ALLOW_SEALING: F_SEAL_SEAL preset).
        os.ftruncate(sealed_fake, p.size)
        try_alloc(d, "memfd without MFD_ALLOW_SEALING", p.msg(), [p.uffd, sealed_fake], "seal")
    finally:
        for fd in (r, w, null, plain, sealed_fake):
            os.close(fd)
        p.close()
    good.verify()


SEAL = fcntl.F_SEAL_SEAL
GROW = fcntl.F_SEAL_GROW
SHRINK = fcntl.F_SEAL_SHRINK


def test_alloc_with_a_bad_region(served):
    d, good = served
    cases = [
        ("unsealed memfd", {"seals": 0}, ("sealed",)),
        ("memfd without F_SEAL_SHRINK", {"seals": GROW | SEAL}, ("F_SEAL_SHRINK",)),
        ("memfd without F_SEAL_GROW", {"seals": SHRINK | SEAL}, ("F_SEAL_GROW",)),
        ("memfd without F_SEAL_SEAL", {"seals": GROW | SHRINK}, ("F_SEAL_SEAL",)),
        ("memfd already holding data", {"data": True}, ("already holds data",)),
        ("memfd larger than the request", {"memfd_size": 8 * PAGE}, ("32768 bytes", "16384")),
        ("memfd smaller than the request", {"memfd_size": 2 * PAGE}, ("8192 bytes", "16384")),
        ("range not registered", {"register": 0}, ("not registered",)),
        ("range registered MISSING only", {"register": uffd.REGISTER_MISSING}, ("not registered",)),
        ("range registered MISSING|MINOR", {"register": uffd.REGISTER_MISSING | uffd.REGISTER_MINOR},
         ("not registered",)),
    ]
    for case, kw, words in cases:
        p = Pieces(**kw)
        try:
            try_alloc(d, case, p.msg(), [p.uffd, p.memfd], *words)
            if kw.get("data"):
                assert os.pread(p.memfd, 8, 0) == b"precious"  # and the daemon did not touch it
        finally:
            p.close()
    good.verify()


def test_alloc_with_a_write_sealed_memfd(served):
    d, good = served
    p = Pieces()
    ws = os.memfd_create("uswap-test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(ws, p.size)
        fcntl.fcntl(ws, fcntl.F_ADD_SEALS, GROW | SHRINK | fcntl.F_SEAL_WRITE | SEAL)
        try_alloc(d, "write-sealed memfd", p.msg(), [p.uffd, ws], "write-sealed")
    finally:
        os.close(ws)
        p.close()
    good.verify()


def test_alloc_with_bad_numbers(served):
    d, good = served
    cases = [
        ("size", 0, ("size", "positive integer")),
        ("size", -PAGE, ("size", "positive integer")),
        ("size", 4.0 * PAGE, ("size", "positive integer")),
        ("size", "16384", ("size", "positive integer")),
        ("size", True, ("size", "positive integer")),
        ("size", None, ("size", "positive integer")),
        ("size", [PAGE], ("size", "positive integer")),
        ("size", 2 * MAX_REGION, ("max_region_size",)),
        ("size", 1 << 80, ("max_region_size",)),
        ("size", PAGE + 1, ("multiples of 4096",)),
        ("addr", 0, ("addr", "positive integer")),
        ("addr", -PAGE, ("addr", "positive integer")),
        ("addr", "0x1000", ("addr", "positive integer")),
        ("addr", 12345, ("multiples of 4096",)),
        ("addr", (1 << 64) - PAGE, ()),          # fits the ioctl's u64, not a user address
    ]
    p = Pieces(size=4 * PAGE)
    try:
        for field, value, words in cases:
            msg = p.msg()
            if value is None:
                del msg[field]
            else:
                msg[field] = value
            try_alloc(d, f"alloc {field}={value!r}", msg, [p.uffd, p.memfd], *words)
    finally:
        p.close()
    good.verify()


@pytest.mark.parametrize("addr", [1 << 64, 1 << 80])
def test_alloc_with_an_address_beyond_64_bits(served, addr):
    d, good = served
    p = Pieces(size=4 * PAGE)
    try:
        try_alloc(d, f"alloc addr={addr:#x}", p.msg(addr=addr), [p.uffd, p.memfd])
    finally:
        p.close()
    good.verify()


def test_alloc_of_a_range_registered_in_another_uffd(served):
    """The range is registered, but with a different userfaultfd than the one
    sent: the daemon would watch a uffd that never sees the range's faults."""
    d, good = served
    p = Pieces()
    other = uffd.open_uffd()
    try:
        try_alloc(d, "range registered in another uffd", p.msg(), [other, p.memfd], "not registered")
    finally:
        os.close(other)
        p.close()
    good.verify()


def test_alloc_of_a_range_partly_outside_the_registration(served):
    d, good = served
    p = Pieces()
    try:
        try_alloc(d, "range running past the mapping", p.msg(addr=p.addr + 2 * PAGE), [p.uffd, p.memfd],
                  "not registered")
    finally:
        p.close()
    good.verify()


# The end of the two programs below: rewrite every page of region r three
# times, checking each pass, and print how many pages read back wrong.
REWRITE_AND_COUNT = """
a = np.frombuffer(r.buf, dtype=np.uint64).reshape(-1, 512)
bad = 0
for v in range(1, 4):
    a[:, 0] = np.arange(a.shape[0]) * 10 + v
    bad += int(np.count_nonzero(a[:, 0] != np.arange(a.shape[0]) * 10 + v))
print("bad pages", bad, flush=True)
"""


# A client that sends the alloc of its (still empty) region a second time, with
# the same uffd, memfd and address: two page tables for one memory would each
# evict and refill pages behind the other's back. Then it writes and reads its
# region back; run in its own process, since its faults need the daemon.
TWICE = """
import sys
import numpy as np
import uswap
c = uswap.connect(sys.argv[1])
r = c.alloc(4 << 20)
try:
    reply = c._request({"op": "alloc", "size": r._mapped, "addr": r.addr}, [r._uffd, r._memfd])
    print("second alloc accepted", reply, flush=True)
except uswap.UswapError as e:
    print("second alloc refused:", e, flush=True)
    c = uswap.connect(sys.argv[1])  # the daemon may have dropped the first connection
""" + REWRITE_AND_COUNT


def test_same_region_sent_twice(engine_backing, start_daemon):
    d = start_daemon(engine_backing, store_size="64M", max_resident="1M")
    try:
        res = subprocess.run([sys.executable, "-c", TWICE, d.socket], capture_output=True, text=True,
                             cwd=REPO, timeout=60)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the client hung:\n{d.log_text()[-3000:]}") from None
    assert d.proc.poll() is None, d.log_text()[-5000:]
    assert "second alloc refused" in res.stdout, (res.stdout, res.stderr[-2000:])
    # Refused, the first region must still hold whatever the client writes
    # (if the refusal dropped the connection, the region went with it and the
    # client fails instead of reading wrong data).
    assert "bad pages 0" in res.stdout or res.returncode != 0, res.stdout


# The same, but the second alloc brings a fresh memfd of its own for (part
# of) the range of the first region: one address range, two regions.
TWICE_OTHER_MEMFD = """
import fcntl, os, sys
import numpy as np
import uswap
c = uswap.connect(sys.argv[1])
r = c.alloc(4 << 20)
offset, size = int(sys.argv[2]), int(sys.argv[3])
m2 = os.memfd_create("uswap-region", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
os.ftruncate(m2, size)
fcntl.fcntl(m2, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
try:
    reply = c._request({"op": "alloc", "size": size, "addr": r.addr + offset}, [r._uffd, m2])
    print("second alloc accepted", reply, flush=True)
except uswap.UswapError as e:
    print("second alloc refused:", e, flush=True)
""" + REWRITE_AND_COUNT


@pytest.mark.parametrize("offset,size", [(0, 4 << 20), (1 << 20, 1 << 20)], ids=["same-range", "sub-range"])
def test_region_range_sent_again_with_another_memfd(engine_backing, start_daemon, offset, size):
    d = start_daemon(engine_backing, store_size="64M", max_resident="1M")
    proc = subprocess.Popen([sys.executable, "-c", TWICE_OTHER_MEMFD, d.socket, str(offset), str(size)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        out, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        st = status(d)
        raise AssertionError(f"the client never finished ({st['faults_total']} faults so far): {out}") from None
    assert d.proc.poll() is None, d.log_text()[-5000:]
    assert "second alloc refused" in out, (out, err[-2000:])
    assert proc.returncode == 0 and "bad pages 0" in out, (out, err[-2000:])


# A well-behaved client with a live, swapped-out region asks for a second
# region the daemon refuses (too big). The refusal is an ordinary error for
# the application to handle; its first region must go on working.
REFUSED_THEN_USE = """
import sys
import numpy as np
import uswap
c = uswap.connect(sys.argv[1])
r = c.alloc(4 << 20)
a = np.frombuffer(r.buf, dtype=np.uint64).reshape(-1, 512)
ids = np.arange(a.shape[0], dtype=np.uint64)
a[:, 0] = ids + 1
try:
    c.alloc(int(sys.argv[2]))
    print("second alloc accepted", flush=True)
except uswap.UswapError as e:
    print("second alloc refused:", e, flush=True)
print("touching the first region", flush=True)
print("bad pages", int(np.count_nonzero(a[:, 0] != ids + 1)), flush=True)
"""


def test_refused_alloc_keeps_the_clients_other_regions(engine_backing, start_daemon):
    d = start_daemon(engine_backing, store_size="64M", max_resident="1M", config={"max_region_size": MAX_REGION})
    proc = subprocess.Popen([sys.executable, "-c", REFUSED_THEN_USE, d.socket, str(4 * MAX_REGION)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        out, err = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError("after a refused alloc the client hangs on its first region (the daemon"
                             f" dropped it with the connection):\n{out}\n{d.log_text()[-2000:]}") from None
    assert "second alloc refused" in out and "max_region_size" in out, (out, err[-2000:])
    assert proc.returncode == 0 and "bad pages 0" in out, (out, err[-2000:])
    assert d.proc.poll() is None


def test_inject_with_malformed_spec(engine_backing, start_daemon):
    """The (test-only) inject op: a malformed spec is refused, not fatal."""
    d = start_daemon(engine_backing, store_size="64M", max_resident="1M", inject={},
                     config={"max_region_size": MAX_REGION})
    good = GoodClient(d)
    try:
        for spec in ({"no_such_knob": 1}, {"fail_writes": ["EWHAT"]}, {"fail_writes": "EIO"},
                     5, [["write_delay", 1]], {"fail_writes": [["EIO"]]}):
            s = connect(d)
            protocol.send(s, {"op": "inject", "spec": spec})
            expect_refusal(d, s, f"inject {spec!r}")
        assert status(d)["store"]["inject"]["spec"] == {}
        good.verify()
    finally:
        good.kill()

