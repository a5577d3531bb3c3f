"""The systemd notify protocol (sd_notify(3)), spoken by the engine loop
itself: READY=1 once the daemon accepts clients, a one-line STATUS= kept
current, WATCHDOG=1 while the loop turns, EXTEND_TIMEOUT_USEC= while a drain
runs, STOPPING=1 when the drain starts.

Why from the loop and not a timer thread: a thread would go on pinging while
the engine is stuck (a deadlock on the page lock, a loop that never returns
to epoll), and systemd would never restart the daemon. Every message here is
sent on the engine thread, from Server.run's loop, so a hung engine misses
its watchdog and systemd acts (WatchdogSec= in config/uswap.service).

Never blocking: a datagram socket whose reader is slow (PID 1 busy, or any
reader that stops reading) fills after net.unix.max_dgram_qlen datagrams,
and a blocking send would then stop the engine thread, and every fault with
it, until the reader came back. So each send is MSG_DONTWAIT; what does not
fit waits in `unsent`, merged line by line (a later STATUS= replaces an
earlier one, READY=1 and STOPPING=1 are kept), and goes out at the next turn
of the loop, which `tick` asks for within RETRY_S.

Without NOTIFY_SOCKET (not started by systemd) every call is a no-op."""
from __future__ import annotations

import logging
import os
import socket
import time
from typing import Callable

log = logging.getLogger("uswap.server")

#: How often STATUS= is refreshed when nothing notable changed, and how often
#: EXTEND_TIMEOUT_USEC= is renewed during a drain.
STATUS_INTERVAL_S = 5.0
#: Each EXTEND_TIMEOUT_USEC= grants this many intervals, so one late turn of
#: the loop does not let the stop timeout expire.
EXTEND_INTERVALS = 3
#: How soon the loop turns again to retry messages the reader had no room for.
RETRY_S = 0.05
#: How long close() may wait for a reader to take the last messages (the
#: daemon is stopping: a short block no longer holds up any fault).
CLOSE_FLUSH_S = 1.0


def _watchdog_interval() -> float | None:
    """Half of WATCHDOG_USEC (as sd_watchdog_enabled(3) advises), or None
    when no watchdog is asked for, or it is meant for another process."""
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        log.warning("WATCHDOG_USEC=%r is not a whole number of microseconds; no watchdog pings", usec)
        return None
    return value / 2e6 if value > 0 else None


class Notifier:
    """What this daemon tells systemd, and when each next message is due."""

    def __init__(self) -> None:
        addr = os.environ.get("NOTIFY_SOCKET") or None
        if addr is not None and addr.startswith("@"):
            addr = "\0" + addr[1:]  # abstract namespace
        self.addr = addr
        self.sock: socket.socket | None = None
        if addr is not None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.watchdog_s = _watchdog_interval() if addr is not None else None
        self.next_watchdog = 0.0
        self.next_status = 0.0
        self.next_extend = 0.0
        self.last_status: str | None = None
        self.last_shape: object = None
        self.failed = False
        #: Lines the reader had no room for yet, key -> value, in the order said.
        self.unsent: dict[str, str] = {}
        #: Sends put off because the reader's queue was full (for the log and tests).
        self.deferred = 0

    def send(self, state: str) -> None:
        """Queue `state`'s lines and send everything unsent as one datagram,
        without blocking. A full reader leaves the lines in `unsent` for the
        next try; any other failure is logged once, drops them and never
        stops the daemon."""
        if self.sock is None:
            return
        for line in state.split("\n"):
            key, _, value = line.partition("=")
            self.unsent.pop(key, None)  # re-inserted last: lines keep the order they were said in
            self.unsent[key] = value
        self._flush(socket.MSG_DONTWAIT)

    def _flush(self, flags: int) -> None:
        if not self.unsent or self.sock is None:
            return
        datagram = "\n".join(f"{k}={v}" for k, v in self.unsent.items())
        try:
            self.sock.sendto(datagram.encode(), flags, self.addr)
        except (BlockingIOError, TimeoutError):
            self.deferred += 1  # the reader's queue is full: kept for the next turn
            return
        except OSError as e:
            if not self.failed:
                log.warning("sd_notify to %s failed: %s", self.addr.replace("\0", "@"), e)
            self.failed = True
        self.unsent.clear()

    def ready(self, status: str) -> None:
        self.last_status = status
        self.next_status = time.monotonic() + STATUS_INTERVAL_S
        self.send(f"READY=1\nSTATUS={status}")

    def stopping(self, status: str) -> None:
        self.last_status = status
        self.send(f"STOPPING=1\nSTATUS={status}")

    def tick(self, status_line: Callable[[], str], shape: object, draining: bool) -> float | None:
        """Send what is due now: WATCHDOG=1, a STATUS= line when `shape` (a
        cheap summary: the region count, draining) changed or the last line
        is STATUS_INTERVAL_S old, and during a drain a renewed
        EXTEND_TIMEOUT_USEC=. `status_line` is called only when a STATUS= is
        due. Returns seconds until the next message is due (None: nothing is
        ever due), for the loop's epoll timeout."""
        if self.sock is None:
            return None
        now = time.monotonic()
        self._flush(socket.MSG_DONTWAIT)  # what found the reader full last turn goes first
        if shape != self.last_shape:
            self.last_shape = shape
            self.next_status = 0.0
        if self.watchdog_s is not None and now >= self.next_watchdog:
            self.send("WATCHDOG=1")
            self.next_watchdog = now + self.watchdog_s
        if now >= self.next_status:
            line = status_line()
            if line != self.last_status:
                self.send(f"STATUS={line}")
                self.last_status = line
            self.next_status = now + STATUS_INTERVAL_S
        if draining and now >= self.next_extend:
            # A drain brings every page home, however long the store takes:
            # the stop timeout must not kill it half done (pages would stay
            # on the store). Renewed while the loop turns, so a hung engine
            # still runs out of time.
            self.send(f"EXTEND_TIMEOUT_USEC={int(EXTEND_INTERVALS * STATUS_INTERVAL_S * 1e6)}")
            self.next_extend = now + STATUS_INTERVAL_S
        due = [self.next_status] + ([self.next_watchdog] if self.watchdog_s is not None else [])
        if draining:
            due.append(self.next_extend)
        if self.unsent:
            due.append(now + RETRY_S)
        return max(0.0, min(due) - now)

    def close(self) -> None:
        """Give the reader up to CLOSE_FLUSH_S to take what is still unsent
        (STOPPING=1 above all), then close."""
        if self.sock is not None:
            if self.unsent:
                self.sock.settimeout(CLOSE_FLUSH_S)
                self._flush(0)
                if self.unsent:
                    log.warning("sd_notify: %s never taken by %s", ", ".join(self.unsent),
                                self.addr.replace("\0", "@"))
            self.sock.close()
            self.sock = None
