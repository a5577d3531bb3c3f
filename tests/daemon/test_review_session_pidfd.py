"""The pidfd each client session takes at connect (connections.py
`peer_pidfd`, for the sampler's process_madvise), adversarially (a
reviewer's): every way a connection ends -- refused at accept (a per-uid
limit, "busy"), timed out before its hello, dropped for garbage, a client
dead before or after its hello or its alloc, a control connection -- leaves
the daemon holding one pidfd per live client session and no more."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

import uswap
from tests.harness import finish_clean, status, wait_for


def _pidfds(pid: int) -> int:
    """pidfds the daemon holds: its sessions' (and the sampler's own one,
    once it sampled: none here, nothing is reclaimed)."""
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            n += os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:[pidfd]"
        except FileNotFoundError:
            pass
    return n


def test_connections_refused_at_the_per_uid_limit_keep_no_pidfd(file_backing, start_daemon):
    """max_clients_per_uid 1, one client connected: every further connection
    of its uid is refused at accept (connections.py _admit), after its
    Session took the peer's pidfd. The refusal closed the socket and
    dropped the Session, not its pidfd: one pidfd leaked per refused
    connection, until the daemon ran out of fds."""
    d = start_daemon(file_backing, config={"max_clients_per_uid": 1})
    dpid = d.proc.pid
    with uswap.connect(d.socket) as first:
        assert _pidfds(dpid) == 1   # the first client's session's
        for _ in range(20):
            with pytest.raises(uswap.UswapError, match=r"max_clients_per_uid \(1\)"):
                uswap.connect(d.socket)
        # Each refusal was read: the daemon had made (and dropped) its Session.
        assert _pidfds(dpid) == 1, f"{_pidfds(dpid) - 1} pidfds of refused connections kept"
        first.alloc(4096).close()   # the first client is unharmed
    wait_for("the client's session gone", lambda: _pidfds(dpid) == 0, 30)
    finish_clean(d)


ALLOC_AND_WAIT = """
import sys, uswap
c = uswap.connect(sys.argv[1])
r = c.alloc(1 << 20)
r.buf[:4096] = b"x" * 4096
print("ready", flush=True)
sys.stdin.readline()
"""


def test_connections_ending_at_every_point_keep_no_pidfd(file_backing, start_daemon):
    """Connections that end before their hello, after it, half way through a
    message, on garbage, at the handshake deadline, a client SIGKILLed
    holding a region, control connections past max_clients and a "busy"
    refusal past those: the daemon holds exactly one pidfd per live client
    session (none for a control connection) after each, and none at the end."""
    from tests import raw_client
    d = start_daemon(file_backing, config={"max_clients": 3, "control_connections": 2,
                                           "handshake_timeout": "1s"})
    dpid = d.proc.pid

    def settled(n: int, what: str) -> None:
        wait_for(f"{n} pidfds after {what}", lambda: _pidfds(dpid) == n, 30)

    for _ in range(5):
        s = raw_client.connect(d, greet=False)
        s.close()
        s = raw_client.connect(d)
        s.close()
        s = raw_client.connect(d)
        raw_client.send_raw(s, raw_client.frame(b'{"op": "status"')[:7])   # half a frame
        s.close()
        s = raw_client.connect(d)
        raw_client.send_raw(s, raw_client.frame(b"not json"))
        s.close()
    settled(0, "connections closed at each step")
    s = raw_client.connect(d, greet=False)   # never says hello: dropped at the deadline
    settled(1, "a connection waiting for its hello")
    wait_for("the silent connection timed out", lambda: _pidfds(dpid) == 0, 30)
    s.close()
    killed = subprocess.Popen([sys.executable, "-c", ALLOC_AND_WAIT, d.socket], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert killed.stdout.readline().strip() == "ready"
        assert _pidfds(dpid) == 1
    finally:
        killed.kill()
        killed.wait()
    settled(0, "a client killed holding a region")
    clients = [raw_client.connect(d) for _ in range(3)]
    assert _pidfds(dpid) == 3
    controls = [raw_client.connect(d) for _ in range(2)]   # past max_clients: status only, no pidfd
    assert _pidfds(dpid) == 3
    busy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    busy.settimeout(10)
    busy.connect(d.socket)
    from uswap import protocol
    reply, _ = protocol.recv(busy)   # refused at accept
    assert not reply["ok"] and "daemon busy" in reply["error"], reply
    busy.close()
    assert _pidfds(dpid) == 3
    for c in controls + clients:
        c.close()
    settled(0, "every connection closed")
    finish_clean(d)
