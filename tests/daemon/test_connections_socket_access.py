"""Who may use the socket (listener.py, connections.py, ops.py, forkops.py): the
socket's group and mode come from socket_group and socket_mode; per-uid
limits (max_clients_per_uid, max_regions_per_uid, max_region_bytes_per_uid)
are counted by the uid the kernel reports for the connecting process
(SO_PEERCRED); each user sees only its own clients in status, root all.

The other users are real processes under other uids (setpriv), not root
pretending: the kernel decides whether they may connect. They keep
CAP_SYS_PTRACE as an ambient capability only because creating a userfaultfd
that serves kernel-mode faults needs it (vm.unprivileged_userfaultfd=0, and
/dev/userfaultfd is root's); it gives no access to the socket."""
from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile

import pytest

import uswap
from tests.daemon_proc import DaemonProc
from tests.harness import Workload, wait_for

MIB = 1 << 20
USERS_GID = 100  # Debian's group "users"
UID_A, UID_B, UID_C = 64101, 64102, 64103


class UidClient(Workload):
    """tests/uid_client.py running as `uid` (group `uid`, plus `groups`)."""

    def __init__(self, socket: str, uid: int, groups: tuple[int, ...] = ()) -> None:
        group_flag = f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups"
        self.uid = uid
        self._spawn(["setpriv", f"--reuid={uid}", f"--regid={uid}", group_flag,
                     "--inh-caps=+sys_ptrace", "--ambient-caps=+sys_ptrace",
                     sys.executable, "-m", "tests.uid_client", socket])

    def ask(self, **cmd) -> dict:
        self.send(json.dumps(cmd) + "\n")
        return self.next(60)

    def close(self) -> None:
        self.proc.stdin.close()
        self.finish(60)
        assert self.proc.returncode == 0, self.proc.stderr.read()[-3000:]


@pytest.fixture
def open_dir(file_backing):
    """A work directory other users may traverse (pytest's tmp_path is
    root's alone), for the daemon's socket."""
    path = tempfile.mkdtemp(prefix="uswap-access-")
    os.chmod(path, 0o755)
    daemons: list[DaemonProc] = []
    yield path, daemons
    for d in daemons:
        d.kill()
    shutil.rmtree(path, ignore_errors=True)


def start(open_dir, file_backing, config: dict, max_resident: str = "16M") -> DaemonProc:
    path, daemons = open_dir
    d = DaemonProc(path, file_backing, store_size="128M", max_resident=max_resident, config=config)
    daemons.append(d)
    return d


def test_the_default_socket_is_0660_of_the_daemons_group(open_dir, file_backing):
    d = start(open_dir, file_backing, {})
    st = os.stat(d.socket)
    assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == os.getgid()
    other = UidClient(d.socket, UID_A)
    assert "Permission denied" in other.ask(connect="c")["error"]
    other.close()
    assert d.stop() == 0


def test_socket_group_and_mode_decide_who_may_connect(open_dir, file_backing):
    d = start(open_dir, file_backing, {"socket_group": "users", "socket_mode": "0660"})
    st = os.stat(d.socket)
    assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == USERS_GID
    member = UidClient(d.socket, UID_A, groups=(USERS_GID,))
    outsider = UidClient(d.socket, UID_B)
    try:
        assert member.ask(connect="c") == {"ok": True, "uid": UID_A}
        assert member.ask(alloc="c", size=4 * MIB) == {"ok": True, "bad_pages": 0}
        refused = outsider.ask(connect="c")
        assert not refused["ok"] and "Permission denied" in refused["error"], refused
    finally:
        member.close()
        outsider.close()
    assert d.stop() == 0


def test_a_mode_for_everyone_lets_any_user_in(open_dir, file_backing):
    d = start(open_dir, file_backing, {"socket_mode": "0666"})
    assert stat.S_IMODE(os.stat(d.socket).st_mode) == 0o666
    other = UidClient(d.socket, UID_B)
    assert other.ask(connect="c")["ok"]
    other.close()
    assert d.stop() == 0


def test_per_uid_limits_refuse_naming_uid_limit_and_value(open_dir, file_backing):
    d = start(open_dir, file_backing, {"socket_mode": "0666", "max_clients_per_uid": 2,
                                       "max_regions_per_uid": 2, "max_region_bytes_per_uid": "8M"})
    a = UidClient(d.socket, UID_A)
    b = UidClient(d.socket, UID_B)
    try:
        # Connections: two per uid; the third is refused, another uid's is not.
        assert a.ask(connect="a1")["ok"] and a.ask(connect="a2")["ok"]
        third = a.ask(connect="a3")
        assert not third["ok"] and (f"uid {UID_A} has 2 connections open, the most max_clients_per_uid (2)"
                                    in third["error"]), third
        assert b.ask(connect="b1")["ok"]
        # Regions: two per uid, counted over all its connections.
        assert a.ask(alloc="a1", size=1 * MIB) == {"ok": True, "bad_pages": 0}
        assert a.ask(alloc="a2", size=1 * MIB) == {"ok": True, "bad_pages": 0}
        over = a.ask(alloc="a2", size=1 * MIB)
        assert not over["ok"] and (f"alloc: uid {UID_A} holds 2 regions, the most max_regions_per_uid (2)"
                                   in over["error"]), over
        # Bytes: 8M per uid; B's 6M leaves room for 2M, not 4M.
        assert b.ask(alloc="b1", size=6 * MIB) == {"ok": True, "bad_pages": 0}
        over = b.ask(alloc="b1", size=4 * MIB)
        assert not over["ok"] and (f"alloc: uid {UID_B} holds {6 * MIB} bytes of regions; {4 * MIB} bytes more"
                                   f" would exceed max_region_bytes_per_uid ({8 * MIB} bytes)" in over["error"]), over
        assert b.ask(alloc="b1", size=2 * MIB) == {"ok": True, "bad_pages": 0}
        # A freed region makes room again.
        assert a.ask(free="a1", region=0)["ok"]
        assert a.ask(alloc="a1", size=1 * MIB) == {"ok": True, "bad_pages": 0}
        # Root is a uid like the others: its own count, untouched by A's and B's.
        with uswap.connect(d.socket) as c:
            r1, r2 = c.alloc(1 * MIB), c.alloc(1 * MIB)
            with pytest.raises(uswap.UswapError, match="alloc: uid 0 holds 2 regions"):
                c.alloc(1 * MIB)
            # Status: root sees every user's clients, a user only its own.
            assert {cl["uid"] for cl in c.status()["clients"]} == {0, UID_A, UID_B}
            seen_by_b = b.ask(status="b1")["status"]["clients"]
            assert {cl["uid"] for cl in seen_by_b} == {UID_B}, seen_by_b
            r1.close()
            r2.close()
        refusals = [line for line in d.log_text().splitlines() if "max_" in line and "_per_uid" in line]
        assert len(refusals) >= 3, d.log_text()
    finally:
        a.close()
        b.close()
    assert d.stop() == 0


def fork_and_report(regions) -> list:
    """Fork this process; the child reports, for each region, why it lost it
    (None: it kept it, and read its first page back)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report and leave at once, whatever happens
        try:
            report = [region.lost if region.lost else bytes(region.buf[:8]).hex() for region in regions]
            os.write(w, json.dumps(report).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        report = json.loads(f.read())
    os.waitpid(pid, 0)
    return report


def test_a_fork_counts_its_childs_regions_against_the_uid(file_backing, start_daemon):
    """The child's regions are its uid's too: a fork that would take the uid
    past max_regions_per_uid gets no snapshot, and the child is told why;
    the parent's regions are untouched either way."""
    d = start_daemon(file_backing, config={"max_regions_per_uid": 3})
    with uswap.connect(d.socket) as c:
        regions = [c.alloc(1 * MIB), c.alloc(1 * MIB)]
        for i, region in enumerate(regions):
            region.buf[:8] = bytes([i + 1]) * 8
        report = fork_and_report(regions)
        assert all("fork_begin: uid 0 holds 2 regions; 2 more would exceed max_regions_per_uid (3)" in why
                   for why in report), report
        regions[1].close()  # now 1 region: the child's 1 more fits
        report = fork_and_report(regions[:1])
        assert report == ["01" * 8], report
        assert bytes(regions[0].buf[:8]) == b"\x01" * 8
        regions[0].close()
    assert d.stop() == 0


def uid_resident(d: DaemonProc, uid: int) -> int:
    return sum(r["resident_bytes"] for c in d.status()["clients"] if c["uid"] == uid for r in c["regions"])


def test_a_uid_over_its_resident_share_loses_its_own_pages_only(open_dir, file_backing):
    """max_resident_per_uid: root writes three times its share; its own
    pages go to the store although the budget has room for all of them,
    while another uid under its share keeps every page resident. Every page
    reads back right."""
    d = start(open_dir, file_backing, {"socket_mode": "0666", "max_resident_per_uid": "8M"}, max_resident="64M")
    other = UidClient(d.socket, UID_A)
    try:
        assert other.ask(connect="c")["ok"]
        assert other.ask(alloc="c", size=6 * MIB) == {"ok": True, "bad_pages": 0}
        with uswap.connect(d.socket) as c:
            region = c.alloc(24 * MIB)
            for off in range(0, region.size, 4096):
                region.buf[off:off + 8] = (off + 7).to_bytes(8, "little")
            # 30M in all, under the 64M budget: only the share evicts, and only root's pages.
            wait_for("root back under its share", lambda: uid_resident(d, 0) <= 8 * MIB, 30)
            assert d.status()["swapouts_total"] > 0
            assert uid_resident(d, UID_A) == 6 * MIB, d.status()["clients"]
            bad = sum(bytes(region.buf[off:off + 8]) != (off + 7).to_bytes(8, "little")
                      for off in range(0, region.size, 4096))
            assert bad == 0
            wait_for("root back under its share after reading", lambda: uid_resident(d, 0) <= 8 * MIB, 30)
            assert uid_resident(d, UID_A) == 6 * MIB
            region.close()
    finally:
        other.close()
    assert d.stop() == 0


def test_pending_fork_snapshots_count_against_the_uid(file_backing, start_daemon):
    """Each fork_begin's snapshot becomes the child's regions when the child
    attaches, which is not checked again: a snapshot not attached yet must
    already count. It did not, so forks in a row (each asked before the
    last child had attached) took a uid past max_regions_per_uid and
    max_region_bytes_per_uid."""
    d = start_daemon(file_backing, config={"max_regions_per_uid": 2, "max_region_bytes_per_uid": "4M"})
    with uswap.connect(d.socket) as c:
        region = c.alloc(1 * MIB)
        with c._lock:
            first, fds = c._exchange({"op": "fork_begin", "regions": [region.id]})
            assert first["ok"] and len(fds) == 1, first
            keep = fds
            # A second pending snapshot would take uid 0 to 3 regions.
            with pytest.raises(uswap.UswapError, match=re.escape(
                    "fork_begin: uid 0 holds 2 regions; 1 more would exceed max_regions_per_uid (2)")):
                c._exchange({"op": "fork_begin", "regions": [region.id]})
        for fd in keep:
            os.close(fd)  # the snapshot is abandoned: room again once it is dropped
        wait_for("the abandoned snapshot dropped", lambda: d.status()["fork"]["fork_pending"] == 0, 10)
        with c._lock:
            again, fds = c._exchange({"op": "fork_begin", "regions": [region.id]})
        assert again["ok"], again
        for fd in fds:
            os.close(fd)
        region.close()
    assert d.stop() == 0


CHURN_CLIENT = """
import sys, time
import uswap
c = uswap.connect(sys.argv[1])
r = c.alloc(4 << 20)
r.buf[:8] = b"churning"
print("ready", flush=True)
time.sleep(600)
"""


def test_per_uid_counts_come_back_after_every_way_a_region_ends(file_backing, start_daemon):
    """Regions and connections of a uid end by free, client death (SIGKILL),
    fork children that attach and exit, and fork snapshots abandoned before
    any child attached, many times over; after all of them the uid, which
    was at each limit every round, has its whole allowance again: not one
    region, byte or connection left counted."""
    limits = {"max_clients_per_uid": 3, "max_regions_per_uid": 2, "max_region_bytes_per_uid": "4M"}
    d = start_daemon(file_backing, config=limits)
    for round_ in range(6):
        with uswap.connect(d.socket) as c:
            a, b = c.alloc(2 * MIB), c.alloc(2 * MIB)  # at both limits
            with pytest.raises(uswap.UswapError, match="max_regions_per_uid"):
                c.alloc(1 * MIB)
            b.close()  # free
            a.buf[:8] = bytes([round_]) * 8
            assert fork_and_report([a]) == [bytes([round_]).hex() * 8]  # attached, then gone
            with c._lock:  # a snapshot abandoned before any child attached it
                _, fds = c._exchange({"op": "fork_begin", "regions": [a.id]})
            for fd in fds:
                os.close(fd)
            c.alloc(1 * MIB).close()  # the abandoned snapshot counts no more, at once
            a.close()
        # The fork child's connection ends when the daemon reads its EOF.
        wait_for("the fork child's connection gone", lambda: not d.status()["clients"], 30)
        # Client death: a process at the byte limit killed with its region.
        dying = subprocess.Popen([sys.executable, "-c", CHURN_CLIENT, d.socket], stdout=subprocess.PIPE,
                                 text=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
        try:
            assert dying.stdout.readline().strip() == "ready"
        finally:
            dying.kill()
            dying.wait()
    wait_for("every client and snapshot gone",
             lambda: (lambda st: not st["clients"] and st["fork"]["fork_pending"] == 0)(d.status()), 30)
    conns = [uswap.connect(d.socket) for _ in range(3)]
    try:
        regions = [conns[0].alloc(2 * MIB), conns[1].alloc(2 * MIB)]
        with pytest.raises(uswap.UswapError, match="max_region"):
            conns[2].alloc(4096)
        with pytest.raises(uswap.UswapError, match="max_clients_per_uid"):
            uswap.connect(d.socket).alloc(4096)
        for r in regions:
            r.close()
    finally:
        for c in conns:
            c.close()
    assert d.stop() == 0


def test_a_refusal_is_read_even_when_the_daemon_closed_before_our_hello(file_backing, start_daemon,
                                                                         monkeypatch):
    """A daemon refusing a connection (here max_clients_per_uid) answers
    and closes at accept, without reading the hello; a client whose hello
    is sent after that close gets EPIPE. It must still report the daemon's
    reason, not "went away before answering". The order is forced: the
    hello waits until the refusal and the hang-up are in the socket."""
    import select
    from uswap import protocol
    d = start_daemon(file_backing, config={"max_clients_per_uid": 1})
    real_send = protocol.send

    def send_after_the_hangup(sock, msg, fds=None):
        if msg.get("op") == "hello":
            p = select.poll()
            # Only the hang-up: the refusal itself (POLLIN) comes first.
            p.register(sock.fileno(), select.POLLRDHUP)
            events = p.poll(30_000)
            assert events and events[0][1] & (select.POLLRDHUP | select.POLLHUP), \
                "the daemon did not close the refused connection"
        real_send(sock, msg, fds)

    with uswap.connect(d.socket) as first:
        monkeypatch.setattr(protocol, "send", send_after_the_hangup)
        with pytest.raises(uswap.UswapError, match=r"max_clients_per_uid \(1\)"):
            uswap.connect(d.socket)
        monkeypatch.setattr(protocol, "send", real_send)
        first.alloc(4096).close()  # the first client is unharmed
    assert d.stop() == 0
