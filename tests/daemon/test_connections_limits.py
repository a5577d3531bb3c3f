"""Issue 9, items 1, 2, 3 and 5: what a connection can cost the daemon.

- fds: every fd that rides on a refused, undecodable or out-of-order frame,
  or on a dropped connection, is closed (the daemon's /proc/PID/fd count
  returns to its baseline); a full fd table is a clear per-request refusal
  that drops nobody and never ends the daemon; the daemon raises its own
  open-file limit to what its settings need.
- connections: a silent connection is closed after handshake_timeout; past
  max_clients a new connection gets a "busy" answer, and `uswap status`
  still works (control connections) or prints one clear line.
- logs: the lines a client can cause are rate-limited.
- registration: an alloc whose range is not registered MISSING|WP|MINOR, or is
  not a shared mapping of the memfd sent, is refused; hello's version must be
  the integer 1.

Every test runs the real daemon (`uswap run`) against a real store.
"""
from __future__ import annotations

import json
import os
import resource
import socket
import struct
import subprocess
import sys
import pytest

from tests.daemon_proc import REPO
from tests.harness import Workload, status, wait_clean, wait_for
from tests.raw_client import GoodClient, Pieces, connect, expect_refusal, frame, is_closed, outcome, send_raw
from uswap import protocol, uffd

PAGE = 4096


def _tcp_inodes(pid: int) -> set[str]:
    """Socket inodes of the process's TCP connections (/proc/PID/net/tcp*)."""
    out: set[str] = set()
    for name in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{name}") as f:
                next(f)
                out.update(line.split()[9] for line in f)
        except FileNotFoundError:
            pass
    return out


def daemon_fds(d) -> int:
    """The daemon's fds, less its TCP sockets: those are the nfs:// store's
    own connections, which libnfs opens and re-opens on its own schedule
    (a context lent to a thread connects on first use). What a client can
    make the daemon hold (pipes, memfds, uffds, UNIX sockets) is counted."""
    pid = d.proc.pid
    tcp = _tcp_inodes(pid)
    count = 0
    for n in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{n}")
        except FileNotFoundError:
            continue
        if not (target.startswith("socket:[") and target[8:-1] in tcp):
            count += 1
    return count


def wait_fds(d, baseline: int, what: str, timeout: float = 15) -> None:
    """The daemon's fd count comes back to `baseline` (closing a region's fds
    waits for its I/O, so poll)."""
    try:
        wait_for(f"daemon fds back to {baseline} after {what}", lambda: daemon_fds(d) <= baseline, timeout)
    except AssertionError:
        fds = sorted(os.readlink(f"/proc/{d.proc.pid}/fd/{n}") for n in os.listdir(f"/proc/{d.proc.pid}/fd"))
        raise AssertionError(f"after {what} the daemon holds {len(fds)} fds, {baseline} before:"
                             f" {fds}") from None


def spare_fds(n: int) -> list[int]:
    """n fds to send along with bad messages (pipe ends: any fd will do)."""
    out: list[int] = []
    while len(out) < n:
        out.extend(os.pipe())
    return out[:n]


def closed_or_refused(s: socket.socket) -> None:
    """The daemon answered with an error and/or hung up; never "ok"."""
    reply = outcome(s)
    assert reply is None or reply.get("ok") is False, reply
    s.close()


# ----------------------------------------------------------------- item 1: fds


def test_fds_of_bad_messages_are_closed(engine_backing, start_daemon):
    """Ten rounds of every kind of bad message, each carrying fds: the daemon
    ends up with exactly the fds it had before (on cf2b06a: +2 per alloc
    before hello and per undecodable frame)."""
    d = start_daemon(engine_backing, store_size="64M", max_resident="1M")
    status(d)
    baseline = daemon_fds(d)
    hello = frame(json.dumps({"op": "hello", "version": protocol.VERSION}).encode())
    alloc = frame(json.dumps({"op": "alloc", "size": PAGE, "addr": 1 << 30}).encode())
    bodies = {
        "alloc before hello": (False, alloc),
        "bad JSON": (True, frame(b"{not json")),
        "not an object": (True, frame(b"[1, 2]")),
        "no string op": (True, frame(b'{"op": 7}')),
        "status with fds": (True, frame(b'{"op": "status"}')),
        "alloc with 3 fds": (True, alloc),
        "alloc refused (bad numbers)": (True, frame(b'{"op": "alloc", "size": -1, "addr": 1}')),
        "hello with fds": (False, hello),
        "huge length with fds": (True, struct.pack(">I", 0xFFFFFFF0) + b"{}"),
    }
    fds = spare_fds(3)
    try:
        for _ in range(10):
            for case, (greet, data) in bodies.items():
                s = connect(d, greet=greet)
                send_raw(s, data, fds[:3] if "3 fds" in case else fds[:2])
                closed_or_refused(s)
            # fds riding on a message the client never finishes.
            s = connect(d)
            send_raw(s, struct.pack(">I", 100) + b'{"op": "al', fds[:2])
            assert wait_for("the daemon to take the fds", lambda: daemon_fds(d) > baseline, 30)
            s.close()
            # Two fds per frame, several frames queued, then the connection drops.
            s = connect(d, greet=False)
            for i in range(3):
                socket.send_fds(s, [b"\0"], fds[:2])
            s.close()
    finally:
        for fd in fds:
            os.close(fd)
    wait_fds(d, baseline, "10 rounds of bad messages carrying fds")
    assert d.proc.poll() is None


# A client that allocates one-page regions until the daemon refuses one,
# stamps each, and then takes commands on stdin: alloc (once more), verify,
# exit. Prints one JSON line per step.
FILLER = """
import json, sys
import numpy as np
import uswap
c = uswap.connect(sys.argv[1])
regions, error = [], None
while len(regions) < int(sys.argv[2]):
    try:
        r = c.alloc(4096)
    except uswap.UswapError as e:
        error = str(e)
        break
    np.frombuffer(r.buf, dtype=np.uint64)[0] = len(regions) + 1
    regions.append(r)
print(json.dumps({"regions": len(regions), "error": error}), flush=True)
for line in sys.stdin:
    cmd = line.strip()
    if cmd == "alloc":
        try:
            regions.append(c.alloc(4096))
            np.frombuffer(regions[-1].buf, dtype=np.uint64)[0] = len(regions)
            print(json.dumps({"alloc": "ok"}), flush=True)
        except uswap.UswapError as e:
            print(json.dumps({"alloc": str(e)}), flush=True)
    elif cmd == "verify":
        bad = sum(int(np.frombuffer(r.buf, dtype=np.uint64)[0] != i + 1) for i, r in enumerate(regions))
        print(json.dumps({"bad": bad, "regions": len(regions)}), flush=True)
    elif cmd == "exit":
        break
c.close()
print(json.dumps({"done": True, "errors": 0}), flush=True)
"""


class Filler(Workload):
    def __init__(self, socket_path: str, most: int) -> None:
        self._spawn([sys.executable, "-c", FILLER, socket_path, str(most)])


def test_out_of_fds_is_a_refusal(engine_backing, start_daemon):
    """A daemon held to 160 open files: a client that allocates until the fd
    table is full gets a clear EMFILE refusal and keeps its connection and
    every region; new connections get the same answer; the daemon lives and
    another client's swapped-out region stays intact. On cf2b06a the client is
    told "more than 4 file descriptors" and dropped with all its regions, and
    idle connections end the daemon (accept() EMFILE, exit 70)."""
    d = start_daemon(engine_backing, store_size="64M", max_resident="1M", nofile=(160, 160),
                     config={"max_region_size": 4 << 20, "handshake_timeout": "2s"})
    good = GoodClient(d)
    filler = None
    try:
        status(d)
        baseline = daemon_fds(d)
        assert baseline < 120, f"the daemon alone holds {baseline} fds; this test needs room under 160"
        filler = Filler(d.socket, 1000)
        first = filler.next(timeout=60)
        assert first["regions"] >= 5, first
        assert first["error"] and "out of file descriptors (EMFILE)" in first["error"], first
        assert "more than" not in first["error"], first
        # The same connection is still served: another alloc is refused the same way.
        filler.send("alloc\n")
        again = filler.next(timeout=30)
        assert "EMFILE" in again["alloc"], again
        # New connections while the table is full: a clear answer, no crash.
        answers = []
        for _ in range(8):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(15)
            s.connect(d.socket)
            answers.append(s)
        texts = []
        for s in answers:
            reply = outcome(s)
            texts.append(None if reply is None else reply.get("error"))
            s.close()
        assert any(t and "out of file descriptors (EMFILE)" in t for t in texts), texts
        assert d.proc.poll() is None, d.log_text()[-3000:]
        good.verify()
        filler.send("verify\n")
        checked = filler.next(timeout=60)
        assert checked == {"bad": 0, "regions": first["regions"]}, checked
        filler.send("exit\n")
        filler.finish_ok(timeout=60)
        filler = None
        wait_fds(d, baseline, "the filling client left")
        wait_clean(d)  # every region released, accounting exact: the daemon is well
    finally:
        good.kill()
        if filler is not None:
            filler.kill()


def test_open_file_limit_is_raised_at_start(file_backing, start_daemon):
    """Started under a service's default soft limit (1024), the daemon raises
    its own to what max_clients x max_regions_per_client need, logs it, and
    one client gets 600 small regions (cf2b06a stopped near 500 with a
    misleading "more than 4 file descriptors")."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]  # raising a hard limit may need privileges
    assert hard >= 8192, f"this test needs a hard open-file limit of 8192 or more, not {hard}"
    d = start_daemon(file_backing, store_size="64M", max_resident="8M", nofile=(1024, hard),
                     config={"max_clients": 4, "max_regions_per_client": 700})
    with open(f"/proc/{d.proc.pid}/limits") as f:
        line = next(x for x in f if x.startswith("Max open files"))
    soft = int(line.split()[3])
    assert soft >= 2 * 4 * 700, line
    assert "open-file limit" in d.log_text(), d.log_text()[-2000:]
    filler = Filler(d.socket, 600)
    try:
        first = filler.next(timeout=120)
        assert first == {"regions": 600, "error": None}, first
        filler.send("verify\n")
        assert filler.next(timeout=60) == {"bad": 0, "regions": 600}
        # max_regions_per_client: the 701st region of one connection is refused, by name.
        for _ in range(100):
            filler.send("alloc\n")
            assert filler.next(timeout=30) == {"alloc": "ok"}
        filler.send("alloc\n")
        refused = filler.next(timeout=30)["alloc"]
        assert "max_regions_per_client" in refused and "700" in refused, refused
        filler.send("exit\n")
        filler.finish_ok(timeout=60)
    finally:
        filler.kill()
    assert d.proc.poll() is None


# ----------------------------------------------------------------- item 2: connections


def test_silent_connection_is_closed_after_the_handshake_timeout(engine_backing, start_daemon):
    """cf2b06a kept a connection that never said hello for ever, holding a
    max_clients slot."""
    d = start_daemon(engine_backing, store_size="64M", max_resident="1M",
                     config={"handshake_timeout": "1s", "max_clients": 3, "control_connections": 0})
    greeted = connect(d)  # quiet, but greeted: never timed out
    silent = connect(d, greet=False)
    partial = connect(d, greet=False)
    partial.send(frame(b'{"op": "hello", "version": 1}')[:10])  # half a hello, then nothing
    for s in (silent, partial):
        reply = outcome(s)  # the socket's own 10 s timeout bounds this
        assert reply is not None and reply["ok"] is False, reply
        assert "handshake_timeout" in reply["error"], reply
        assert is_closed(s)
        s.close()
    # Their slots are free again, and the greeted client, quiet for longer
    # than the timeout, is still served.
    others = [connect(d), connect(d)]
    for s in [greeted] + others:
        protocol.send(s, {"op": "status"})
        assert outcome(s)["ok"] is True
        s.close()


def test_greeted_connection_stuck_mid_message_is_closed(engine_backing, start_daemon):
    """A greeted client that sends part of a message and then nothing held its
    slot, its buffered bytes and any fds on them for ever (the fuzz test's
    "truncated then silent" connections); a quiet greeted client between
    messages is left alone."""
    d = start_daemon(engine_backing, store_size="64M", max_resident="1M",
                     config={"handshake_timeout": "1s", "max_clients": 2, "control_connections": 0})
    quiet = connect(d)
    stuck = connect(d)
    fds = spare_fds(2)
    try:
        send_raw(stuck, frame(b'{"op": "status"}')[:7], fds)  # half a status, with fds, then nothing
        reply = outcome(stuck)  # the socket's own 10 s timeout bounds this
        assert reply is not None and reply["ok"] is False, reply
        assert "unfinished" in reply["error"] and "handshake_timeout" in reply["error"], reply
        assert is_closed(stuck)
    finally:
        for fd in fds:
            os.close(fd)
        stuck.close()
    # Its slot is free again, and the quiet client is still served.
    other = connect(d)
    for s in (quiet, other):
        protocol.send(s, {"op": "status"})
        assert outcome(s)["ok"] is True
        s.close()


def uswap_status(d) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "uswap.cli", "status", "--socket", d.socket],
                          capture_output=True, text=True, timeout=30, cwd=REPO)


def test_busy_at_max_clients(engine_backing, start_daemon):
    """At max_clients `uswap status` still works (a control connection), an
    alloc there is refused as busy, and past the control connections too a
    newcomer gets a "busy" answer and `uswap status` one line, no traceback."""
    d = start_daemon(engine_backing, store_size="64M", max_resident="1M",
                     config={"max_clients": 2, "control_connections": 1, "handshake_timeout": "20s"})
    held = [connect(d), connect(d)]
    try:
        st = uswap_status(d)
        assert st.returncode == 0 and "clients" in st.stdout, (st.stdout, st.stderr)
        # An alloc on the control connection: refused, with the reason.
        p = Pieces()
        try:
            s = connect(d)
            send_raw(s, frame(json.dumps(p.msg()).encode()), [p.uffd, p.memfd])
            reply = outcome(s)
            assert reply and reply["ok"] is False and "busy" in reply["error"], reply
            assert "max_clients" in reply["error"], reply
            # Now the control connection is taken too: a newcomer is told so.
            late = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            late.settimeout(10)
            late.connect(d.socket)
            reply = outcome(late)
            assert reply and reply["ok"] is False and "busy" in reply["error"], reply
            assert is_closed(late)
            late.close()
            st = uswap_status(d)
            assert st.returncode == 1, (st.stdout, st.stderr)
            assert "Traceback" not in st.stderr, st.stderr
            lines = st.stderr.strip().splitlines()
            assert len(lines) == 1 and "busy" in lines[0], st.stderr
            s.close()
        finally:
            p.close()
    finally:
        for s in held:
            s.close()
    # Once they leave, everyone is served again.
    wait_for("uswap status to work again", lambda: uswap_status(d).returncode == 0, 15)
    assert d.proc.poll() is None


# ----------------------------------------------------------------- item 3: logs


def test_client_caused_log_lines_are_rate_limited(file_backing, start_daemon):
    """200 protocol errors in a row, then 50 regions allocated and freed,
    leave at most error_log_burst lines per error_log_interval for each of the
    daemon's two client budgets (its connections, its regions) in the log
    (cf2b06a: one WARNING per error, two INFO lines per region)."""
    d = start_daemon(file_backing, store_size="64M", max_resident="1M",
                     config={"error_log_interval": "10m", "error_log_burst": 5})
    before = d.log_text().count("\n")
    for i in range(200):
        s = connect(d, greet=i % 2 == 0)
        send_raw(s, frame(b"garbage"))
        closed_or_refused(s)
    with d.client() as c:
        for _ in range(50):
            c.alloc(PAGE).close()
    status(d)
    new_lines = d.log_text().splitlines()[before:]
    assert len(new_lines) <= 2 * 5, new_lines[:20]
    assert any("not acceptable JSON" in line for line in new_lines), new_lines  # limited, not silenced
    assert d.proc.poll() is None


# ----------------------------------------------------------------- item 5: registration

@pytest.mark.parametrize("register,missing", [
    (uffd.REGISTER_WP, "MISSING"),
    (uffd.REGISTER_WP | uffd.REGISTER_MINOR, "MISSING"),
    (uffd.REGISTER_MISSING | uffd.REGISTER_WP, "MINOR"),
], ids=["wp-only", "wp-minor", "missing-wp"])
def test_alloc_of_a_range_registered_without_a_mode(served_limits, register, missing):
    """cf2b06a accepted a range registered WP without MISSING (its check was
    the WP ioctl); the client then read zeros after eviction."""
    d, good = served_limits
    p = Pieces(register=register)
    try:
        s = connect(d)
        send_raw(s, frame(json.dumps(p.msg()).encode()), [p.uffd, p.memfd])
        expect_refusal(d, s, f"registered {register:#x}", "not registered for", missing)
    finally:
        p.close()
    good.verify()


def test_alloc_with_a_memfd_that_is_not_the_mapping(served_limits):
    """The range is registered right, but maps another memfd than the one
    sent: the daemon would manage memory the client does not see."""
    d, good = served_limits
    mapped, other = Pieces(), Pieces()
    try:
        s = connect(d)
        send_raw(s, frame(json.dumps(mapped.msg()).encode()), [mapped.uffd, other.memfd])
        expect_refusal(d, s, "another memfd", "not a MAP_SHARED mapping of the memfd sent")
    finally:
        mapped.close()
        other.close()
    good.verify()


@pytest.mark.parametrize("version", [True, 1.0, "1"])
def test_hello_version_must_be_the_integer(served_limits, version):
    d, good = served_limits
    s = connect(d, greet=False)
    protocol.send(s, {"op": "hello", "version": version})
    expect_refusal(d, s, f"hello version {version!r}", "version", "not supported", must_close=True)
    good.verify()


@pytest.fixture
def served_limits(engine_backing, start_daemon):
    d = start_daemon(engine_backing, store_size="64M", max_resident="1M", config={"max_region_size": 4 << 20})
    good = GoodClient(d)
    try:
        yield d, good
    finally:
        good.kill()


# A forked child allocates a region of its own over its parent's connection:
# the registration checked must be the child's (the writer's pid travels with
# each message, SCM_CREDENTIALS), not the parent's, where nothing is mapped
# at the child's new address.
FORKED = """
import fcntl, os, sys
import numpy as np
import uswap
from uswap import native, uffd
c = uswap.connect(sys.argv[1])
pid = os.fork()
if pid == 0:
    size = 1 << 20
    memfd = os.memfd_create("uswap-region", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(memfd, size)
    fcntl.fcntl(memfd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
    addr = native.mmap_shared(memfd, size)
    u = uffd.open_uffd()
    uffd.register(u, addr, size, uffd.REGISTER_MISSING | uffd.REGISTER_WP | uffd.REGISTER_MINOR)
    try:
        reply = c._request({"op": "alloc", "size": size, "addr": addr}, [u, memfd])
    except uswap.UswapError as e:
        print("child alloc refused:", e, flush=True)
        os._exit(1)
    a = np.frombuffer(native.buffer_at(addr, size), dtype=np.uint64).reshape(-1, 512)
    a[:, 0] = np.arange(a.shape[0]) + 7
    print("child region", reply["region"], "bad", int(np.count_nonzero(a[:, 0] != np.arange(a.shape[0]) + 7)),
          flush=True)
    c._request({"op": "free", "region": reply["region"]})
    os._exit(0)
_, st = os.waitpid(pid, 0)
print("child exit", os.waitstatus_to_exitcode(st), flush=True)
"""


def test_forked_child_allocates_over_its_parents_connection(file_backing, start_daemon):
    d = start_daemon(file_backing, store_size="64M", max_resident="8M")
    res = subprocess.run([sys.executable, "-c", FORKED, d.socket], capture_output=True, text=True,
                         cwd=REPO, timeout=60)
    assert "child exit 0" in res.stdout and "bad 0" in res.stdout, (res.stdout, res.stderr[-2000:],
                                                                    d.log_text()[-2000:])
    assert d.proc.poll() is None
