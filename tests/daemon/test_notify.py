"""The systemd notify protocol (uswap/daemon/notify.py), through a real
notify socket: the tests bind an AF_UNIX datagram socket and hand its path to
the daemon as NOTIFY_SOCKET, as systemd does. READY=1 and a STATUS= line
arrive and follow the daemon's state; WATCHDOG=1 comes from the engine loop,
so an engine that hangs stops sending it; a drain sends STOPPING=1 and
keeps extending the stop timeout (EXTEND_TIMEOUT_USEC=)."""
from __future__ import annotations

import os
import signal
import socket
import struct
import time

import uswap
from tests.harness import ctl, wait_for

MIB = 1 << 20
PAGE = 4096
SO_TIMESTAMPNS = 35  # asm-generic/socket.h (the socket module lacks the name)
WATCHDOG_USEC = 400_000


class NotifySocket:
    """The receiving end of sd_notify: every datagram with the kernel's
    timestamp of when it was sent (SO_TIMESTAMPNS), so gaps are the
    daemon's, not this test's scheduling."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self.sock.bind(path)
        self.sock.setblocking(False)
        self.got: list[tuple[float, str]] = []

    def poll(self) -> list[tuple[float, str]]:
        """Take in every datagram queued now; return all received so far."""
        while True:
            try:
                data, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(16))
            except BlockingIOError:
                return self.got
            stamp = time.time()
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                    sec, nsec = struct.unpack("qq", payload[:16])
                    stamp = sec + nsec / 1e9
            self.got.append((stamp, data.decode()))

    def lines(self, prefix: str) -> list[tuple[float, str]]:
        """(time, value) of every `PREFIX=value` line received so far."""
        return [(t, line[len(prefix) + 1:]) for t, msg in self.poll() for line in msg.split("\n")
                if line.startswith(prefix + "=")]

    def close(self) -> None:
        self.sock.close()


def start_notified(start_daemon, backing: str, tmp_path, **kw):
    notify = NotifySocket(str(tmp_path / "notify.sock"))
    d = start_daemon(backing, extra_env={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": str(WATCHDOG_USEC)},
                     **kw)
    return d, notify


def test_ready_and_status_arrive_and_follow_the_regions(file_backing, start_daemon, tmp_path):
    d, notify = start_notified(start_daemon, file_backing, tmp_path, max_resident="8M", store_size="64M")
    ready = wait_for("READY=1", lambda: [m for _, m in notify.poll() if "READY=1" in m], 10)
    # READY carries the first status line with it.
    assert "STATUS=0 regions, 0 connections; resident 0 B of 8.0 MiB, swapped 0 B" in ready[0], ready
    with uswap.connect(d.socket) as c:
        region = c.alloc(24 * MIB)
        region.buf[::PAGE] = b"\x01" * (24 * MIB // PAGE)  # three times the budget: most goes to the store
        # A region more changes the line at the loop's next turn.
        line = wait_for("a STATUS= line with the region",
                        lambda: [v for _, v in notify.lines("STATUS") if v.startswith("1 region,")], 10)[-1]
        assert " of 8.0 MiB, swapped " in line and line.endswith(" faults/s"), line
        wait_for("a line with pages on the store",
                 lambda: [v for _, v in notify.lines("STATUS") if "swapped 0 B" not in v and "1 region," in v],
                 15)
        region.close()
    assert d.stop() == 0


def test_watchdog_comes_from_the_engine_loop_and_stops_while_it_hangs(file_backing, start_daemon, tmp_path):
    d, notify = start_notified(start_daemon, file_backing, tmp_path, inject={})
    pings = wait_for("watchdog pings", lambda: len(notify.lines("WATCHDOG")) >= 3 and notify.lines("WATCHDOG"), 10)
    assert all(v == "1" for _, v in pings)
    stall_s = 2.0
    ctl(d, {"op": "inject", "stall_engine": stall_s})  # answered just before the engine stops
    before = len(notify.lines("WATCHDOG"))
    # Pings resume once the engine runs again.
    wait_for("pings after the stall", lambda: len(notify.lines("WATCHDOG")) >= before + 3, 20)
    stamps = [t for t, _ in notify.lines("WATCHDOG")]
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    # The stalled engine sent nothing for its whole stall: longer than
    # WATCHDOG_USEC, so systemd would have acted. A pinging thread beside
    # the engine would have kept the gaps at WATCHDOG_USEC / 2.
    assert max(gaps) >= stall_s > WATCHDOG_USEC / 1e6, gaps
    assert d.stop() == 0


def test_no_watchdog_pings_without_watchdog_usec(file_backing, start_daemon, tmp_path):
    notify = NotifySocket(str(tmp_path / "notify.sock"))
    d = start_daemon(file_backing, extra_env={"NOTIFY_SOCKET": notify.path})
    wait_for("READY=1", lambda: notify.lines("READY"), 10)
    assert d.stop() == 0
    assert notify.lines("READY") and not notify.lines("WATCHDOG")


def test_a_drain_says_stopping_and_extends_the_stop_timeout(file_backing, start_daemon, tmp_path):
    d, notify = start_notified(start_daemon, file_backing, tmp_path, max_resident="8M", store_size="64M",
                               inject={})
    with uswap.connect(d.socket) as c:
        region = c.alloc(32 * MIB)
        region.buf[::PAGE] = b"\x02" * (32 * MIB // PAGE)
        wait_for("pages on the store", lambda: d.status()["swapped_bytes"] >= 16 * MIB, 30)
        # Each read home takes a while: the drain lasts several loop turns.
        d.inject({"read_delay": 0.05})
        d.proc.send_signal(signal.SIGTERM)
        extend = wait_for("EXTEND_TIMEOUT_USEC", lambda: notify.lines("EXTEND_TIMEOUT_USEC"), 30)
        assert int(extend[0][1]) >= 10_000_000, extend  # well beyond one renewal interval
        assert d.proc.wait(120) == 0
    # Lines in the order sent: the test read nothing while the daemon
    # drained, so what found the queue full came later, merged into one
    # datagram (notify.py), in the order it was said.
    lines = [line for _, m in notify.poll() for line in m.split("\n")]
    stopping = lines.index("STOPPING=1")
    first_extend = next(i for i, line in enumerate(lines) if line.startswith("EXTEND_TIMEOUT_USEC="))
    assert stopping < first_extend, lines
    assert lines[stopping + 1].startswith("STATUS=draining: 1 region,"), lines[stopping:stopping + 2]
    assert not os.path.exists(d.socket)


def fill_queue(path: str) -> socket.socket:
    """Datagrams from another sender until the reader's queue at `path` is
    full (net.unix.max_dgram_qlen), as when systemd is slow to read; the
    sender is returned so its datagrams can be told apart by content."""
    filler = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    filler.setblocking(False)
    sent = 0
    while True:
        try:
            filler.sendto(b"FILLER=1", path)
        except BlockingIOError:
            break
        sent += 1
    assert sent > 0
    return filler


def test_a_reader_that_does_not_read_never_stops_the_daemon(file_backing, start_daemon, tmp_path):
    """The notify socket's queue is full before the daemon starts and nobody
    reads it: READY=1, WATCHDOG=1 and STATUS= find no room. The engine must
    go on serving (a blocking send would stop it at READY=1, before its
    first fault: this is how CI once hung for 90 minutes), keep what it had
    to say, and say it once the reader reads again."""
    notify = NotifySocket(str(tmp_path / "notify.sock"))
    filler = fill_queue(notify.path)
    d = start_daemon(file_backing, max_resident="4M", store_size="64M",
                     extra_env={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": str(WATCHDOG_USEC)})
    size = 16 * MIB
    # ctl has a deadline: a daemon stuck in its notify send fails here.
    ctl(d, {"op": "status"}, timeout=20)
    with uswap.connect(d.socket) as c:
        region = c.alloc(size)
        for i in range(size // PAGE):
            region.buf[i * PAGE:i * PAGE + 8] = i.to_bytes(8, "little")
        for i in range(size // PAGE):
            assert region.buf[i * PAGE:i * PAGE + 8] == i.to_bytes(8, "little"), i
        assert d.status()["swapped_bytes"] > 0  # the engine worked through the full queue
        # Now the reader reads: READY=1 was kept, and the pings resume.
        wait_for("READY=1", lambda: [m for _, m in notify.poll() if "READY=1" in m], 20)
        before = len(notify.lines("WATCHDOG"))
        wait_for("pings after the reader came back", lambda: len(notify.lines("WATCHDOG")) >= before + 3, 20)
        # The queue full again and never read from here on: a stop still ends.
        fill_queue(notify.path).close()
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(60) == 0
    # close() gave the reader a moment, then said what it could not deliver.
    assert "sd_notify: " in d.log_text() and "never taken by" in d.log_text(), d.log_text()[-2000:]
    filler.close()
    notify.close()
