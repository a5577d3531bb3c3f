"""Client connections, on the engine thread with the page lock held: the
listening socket; accepting and admitting connections (clients, control
connections past max_clients, "busy" refusals); running out of fds (EMFILE)
with a reserve fd; handshake and unfinished-message deadlines; reading,
framing and dispatching messages to the ops (ops.py, through `handle`);
replies, and dropping a connection with its regions.

Lines are logged as `uswap.server`, through the rate-limited log the server
gives it (one budget for every line a client can cause)."""
from __future__ import annotations

import errno
import heapq
import os
import select
import socket
import struct
import time
from typing import Callable

from uswap import protocol
from uswap.config import Config
from uswap.daemon import clientmaps
from uswap.daemon.engine import Engine
from uswap.daemon.fdlimits import out_of_fds_error
from uswap.daemon.ratelimit import RateLimitedLog

# How long accepting pauses when not even the reserve fd frees a slot.
ACCEPT_PAUSE_S = 0.1


class Session:
    """One client connection."""

    def __init__(self, sock: socket.socket, control_only: bool, deadline: float) -> None:
        self.sock = sock
        self.buf = protocol.MessageBuffer()
        self.greeted = False
        # Accepted beyond max_clients: may ask for status, never allocate.
        self.control_only = control_only
        # Closed at this monotonic time (handshake_timeout after accept) unless
        # a valid hello came first; a control connection keeps it regardless.
        # None when no deadline applies.
        self.deadline: float | None = deadline
        self.name = ""                      # the client's name (hello), else its comm (ops.py)
        self.regions: set[int] = set()      # live regions
        self.allocated: set[int] = set()    # regions allocated and not yet freed by the client
        # A request is being answered later (a discard waiting for its pages):
        # no further message is served, or read, until then (Connections.hold).
        self.held = False
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        self.pid, self.uid, self.gid = struct.unpack("3i", creds)
        # Its /proc/PID/status, read through the pidfd below (set with it
        # in Connections._admit), opened at reclaim's first look at one of
        # its regions and closed with the session (Connections.drop).
        self.proc_status = clientmaps.StatusFile(self.pid)
        # The client's process as it connected, for the access sampler's
        # process_madvise (sampling.py): -1 when none is held (a control
        # connection, no fd left). Taken once the connection is admitted
        # (Connections._admit: a connection refused there holds none) and
        # closed with the session (Connections.drop).
        self.pidfd = -1


SO_PEERPIDFD = 77  # Linux 6.5 (asm-generic/socket.h); not in Python's socket module


def peer_pidfd(sock: socket.socket, pid: int) -> int:
    """A pidfd (O_CLOEXEC) of the process at the other end of `sock`, as it
    connected: SO_PEERPIDFD, which names that process itself -- once it is
    gone, calls through it fail (ESRCH), so a pid reused by another process
    is never reached through it. Before Linux 6.5 (ENOPROTOOPT: no such
    option): pidfd_open(pid) now, the peer being the process SO_PEERCRED
    named a moment ago (a client that died and whose pid was reused in
    between is not told apart). Any other error, EINVAL included (6.5 to
    6.15 give it when the peer has exited already: its pid may be another
    process's by now), and when no fd is left: -1, the client is served
    unsampled."""
    try:
        return sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
    except OSError as e:
        if e.errno != errno.ENOPROTOOPT:
            return -1
    try:
        return os.pidfd_open(pid)
    except OSError:
        return -1


# One message's handler (Ops.handle): session, message, its fds, the pid that sent them.
Handler = Callable[[Session, dict, list, int], None]


class Connections:
    """The listener and every session on it, watched in the server's epoll."""

    def __init__(self, cfg: Config, engine: Engine, epoll: select.epoll, client_log: RateLimitedLog,
                 listener: socket.socket) -> None:
        """`listener`: the bound, listening socket (listener.py)."""
        self.cfg = cfg
        self.engine = engine
        self.epoll = epoll
        self.client_log = client_log
        self.sessions: dict[int, Session] = {}
        # Set by the server once the ops exist: what a framed message goes to.
        self.handle: Handler | None = None
        # Kept open to be closed when accept() fails with EMFILE: the freed
        # slot lets the daemon accept the waiting connection and tell it why
        # it cannot stay, instead of leaving it hanging or dying.
        self.reserve_fd = self._open_reserve()
        self.accept_paused_until: float | None = None
        self.deadlines: list[tuple[float, int, Session]] = []  # heap; stale entries skipped
        self.deadline_seq = 0
        self.listener = listener
        self.epoll.register(self.listener.fileno(), select.EPOLLIN)

    # ---------------------------------------------------------------- listener

    def close_listener(self) -> None:
        if self.listener.fileno() < 0:
            return
        if self.accept_paused_until is None:
            self.epoll.unregister(self.listener.fileno())
        self.accept_paused_until = None
        self.listener.close()
        try:
            os.unlink(self.cfg.socket)
        except OSError:
            pass

    # ---------------------------------------------------------------- accepting

    @staticmethod
    def _open_reserve() -> int:
        try:
            return os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return -1

    def accept(self) -> None:
        while self.listener.fileno() >= 0 and self.accept_paused_until is None:
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            except OSError as e:
                # Never fatal: a full fd table (or kernel memory) is a state
                # the daemon waits out while serving everyone it has.
                if e.errno in (errno.EMFILE, errno.ENFILE):
                    if not self._turn_away_out_of_fds():
                        return
                elif e.errno not in (errno.ECONNABORTED, errno.EINTR, errno.EPROTO):
                    self.client_log.warning("accept failed: %s; pausing new connections", e)
                    self._pause_accepting()
                continue
            self._admit(sock)

    def _admit(self, sock: socket.socket) -> None:
        """Take a new connection on, as a client, as a control connection
        past max_clients, or not at all with a "busy" answer."""
        clients = sum(1 for s in self.sessions.values() if not s.control_only)
        if len(self.sessions) >= self.cfg.max_clients + self.cfg.control_connections:
            self.client_log.warning("refusing a connection: max_clients (%d) and control_connections (%d)"
                                    " reached", self.cfg.max_clients, self.cfg.control_connections)
            _say_and_close(sock, f"daemon busy: {clients} clients connected (max_clients"
                                 f" {self.cfg.max_clients}) and every control connection in use;"
                                 " try again later")
            return
        sock.setblocking(False)
        try:
            # Each message then carries its writer's pid (SCM_CREDENTIALS).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            session = Session(sock, control_only=clients >= self.cfg.max_clients,
                              deadline=time.monotonic() + self.cfg.handshake_timeout)
        except OSError as e:  # the peer is gone already
            self.client_log.warning("new connection: %s", e)
            sock.close()
            return
        refusal = self._uid_over_limit(session.uid)
        if refusal is not None:
            self.client_log.warning("refusing a connection of pid %d: %s", session.pid, refusal)
            _say_and_close(sock, refusal)
            return
        # Only now, the connection kept: a Session refused above is dropped
        # with no drop() to close what it holds (a pidfd taken before the
        # per-uid refusal leaked one fd per refused connection).
        if not session.control_only:
            session.pidfd = peer_pidfd(sock, session.pid)
            session.proc_status.pidfd = session.pidfd
        self.sessions[sock.fileno()] = session
        self.set_deadline(session, session.deadline)
        self.epoll.register(sock.fileno(), select.EPOLLIN | select.EPOLLRDHUP)

    def of_uid(self, uid: int) -> list[Session]:
        """The connections of user `uid` (its SO_PEERCRED uid)."""
        return [s for s in self.sessions.values() if s.uid == uid]

    def _uid_over_limit(self, uid: int) -> str | None:
        """Why user `uid` may not open one more connection (max_clients_per_uid), or None."""
        limit = self.cfg.max_clients_per_uid
        held = len(self.of_uid(uid))
        if limit and held >= limit:
            return (f"uid {uid} has {held} connections open, the most max_clients_per_uid ({limit})"
                    " allows; close one first")
        return None

    def _turn_away_out_of_fds(self) -> bool:
        """accept() hit EMFILE (it does so before it looks for a connection):
        free the reserve fd, accept the waiting connection, tell it why,
        close it, take the reserve back. Without a reserve, stop watching
        the listener for a moment instead of spinning on a connection that
        cannot be accepted. True when one was turned away (look for more)."""
        if self.reserve_fd < 0:
            self.reserve_fd = self._open_reserve()
            if self.reserve_fd < 0:
                self.client_log.warning("out of file descriptors (EMFILE): pausing new connections")
                self._pause_accepting()
                return False
        os.close(self.reserve_fd)
        self.reserve_fd = -1
        try:
            sock, _ = self.listener.accept()
        except OSError:
            sock = None  # nothing waiting after all (EAGAIN), or no slot still
        if sock is not None:
            self.client_log.warning("refusing a connection: out of file descriptors (EMFILE)")
            _say_and_close(sock, out_of_fds_error("it cannot take a new connection now"))
        self.reserve_fd = self._open_reserve()
        if sock is not None and self.reserve_fd >= 0:
            return True
        if sock is None and self.reserve_fd >= 0:
            return False  # nothing to turn away: wait for epoll to say there is
        self._pause_accepting()
        return False

    def _pause_accepting(self) -> None:
        if self.accept_paused_until is None and self.listener.fileno() >= 0:
            self.epoll.unregister(self.listener.fileno())
            self.accept_paused_until = time.monotonic() + ACCEPT_PAUSE_S

    # ---------------------------------------------------------------- deadlines

    def set_deadline(self, session: Session, when: float | None) -> None:
        session.deadline = when
        if when is not None:
            self.deadline_seq += 1
            heapq.heappush(self.deadlines, (when, self.deadline_seq, session))

    def run_timers(self) -> float | None:
        """Close connections past their deadline, resume a paused accept;
        return seconds until the next such event (None if none)."""
        now = time.monotonic()
        if self.accept_paused_until is not None and self.accept_paused_until <= now:
            self.accept_paused_until = None
            if self.reserve_fd < 0:
                self.reserve_fd = self._open_reserve()
            if self.listener.fileno() >= 0:
                self.epoll.register(self.listener.fileno(), select.EPOLLIN)
        while self.deadlines and self.deadlines[0][0] <= now:
            when, _, session = heapq.heappop(self.deadlines)
            if session.deadline != when or session.sock.fileno() < 0:
                continue  # moved or gone
            self._expire(session)
        upcoming = [t for t in (self.accept_paused_until,
                                self.deadlines[0][0] if self.deadlines else None) if t is not None]
        return max(0.0, min(upcoming) - now) if upcoming else None

    def _expire(self, session: Session) -> None:
        timeout = self.cfg.handshake_timeout
        if not session.greeted:
            reason = f"no valid hello within handshake_timeout ({timeout:g}s); closing the connection"
        elif not session.control_only:
            reason = (f"a message left unfinished for handshake_timeout ({timeout:g}s) after its first"
                      " bytes; closing the connection")
        else:
            reason = (f"control connection open for handshake_timeout ({timeout:g}s); past max_clients"
                      " a connection is for one quick request: closing it")
        self.client_log.warning("client pid %d: %s", session.pid, reason)
        self.reply(session, {"ok": False, "error": reason})
        self.drop(session, "timed out")

    # ---------------------------------------------------------------- messages

    def on_session(self, session: Session) -> None:
        """Read what a client sent and dispatch each whole message in it."""
        try:
            data, fds, flags, sender = protocol.recv_with_creds(session.sock, 65536, protocol.MAX_FDS)
        except BlockingIOError:
            return
        except OSError as e:
            self.drop(session, f"recv failed: {e}")
            return
        if not data:
            _close_fds(fds)
            self.drop(session, "disconnected")
            return
        try:
            # MSG_CTRUNC: the kernel could not hand over every fd. With room
            # for MAX_FDS and MAX_FDS received, the peer sent too many; with
            # fewer, the daemon's fd table is full (EMFILE) and the message
            # is refused on its own, the connection kept.
            fds_lost = bool(flags & socket.MSG_CTRUNC)
            if fds_lost and len(fds) >= protocol.MAX_FDS:
                _close_fds(fds)
                raise protocol.ProtocolError(f"more than {protocol.MAX_FDS} file descriptors in one message")
            session.buf.feed(data, fds, fds_lost, sender)
        except protocol.ProtocolError as e:
            self._refuse(session, e)
            return
        self._serve_frames(session)

    def _serve_frames(self, session: Session) -> None:
        """Dispatch every whole message buffered, unless one is held."""
        try:
            while not session.held:
                frame = session.buf.next()
                if frame is None:
                    break
                self._dispatch(session, frame)
                if session.sock.fileno() < 0:
                    return
            if session.greeted and not session.control_only and not session.held:
                # A message begun must be finished within handshake_timeout of
                # its first bytes (not of its last: a peer trickling one byte
                # at a time gets no longer), or the connection is closed: a
                # half-sent frame holds buffer memory and its fds.
                partial = session.buf.pending_bytes() > 0
                if partial and session.deadline is None:
                    self.set_deadline(session, time.monotonic() + self.cfg.handshake_timeout)
                elif not partial and session.deadline is not None:
                    self.set_deadline(session, None)
        except protocol.ProtocolError as e:
            self._refuse(session, e)

    def _refuse(self, session: Session, e: protocol.ProtocolError) -> None:
        self.client_log.warning("client pid %d: %s; dropping it", session.pid, e)
        self.reply(session, {"ok": False, "error": str(e)})
        self.drop(session, "protocol error")

    def hold(self, session: Session) -> None:
        """The message being served is answered later (release): replies go
        in request order, so the connection is not read meanwhile."""
        session.held = True
        self.epoll.modify(session.sock.fileno(), 0)

    def release(self, session: Session) -> None:
        """The held message was answered: serve what the client sent since."""
        session.held = False
        if session.sock.fileno() < 0:
            return
        self.epoll.modify(session.sock.fileno(), select.EPOLLIN | select.EPOLLRDHUP)
        self._serve_frames(session)

    def _dispatch(self, session: Session, frame: protocol.Frame) -> None:
        """Handle one message. Invariant: every fd that rode on it is closed
        here unless a region took it (then the op, ops.py, empties frame.fds), whatever
        the outcome, refusal or ProtocolError."""
        try:
            if frame.fds_lost:
                op = frame.msg.get("op")
                self.client_log.warning("client pid %d: %s refused: out of file descriptors (EMFILE)",
                                        session.pid, op)
                self.reply(session, {"ok": False, "error": out_of_fds_error(
                    f"the file descriptors sent with this {op!r} request could not be received")})
                return
            self.handle(session, frame.msg, frame.fds, frame.sender_pid or session.pid)
        finally:
            _close_fds(frame.fds)
            frame.fds.clear()

    # ---------------------------------------------------------------- replies, drops

    def reply(self, session: Session, msg: dict, fds: list[int] | None = None) -> None:
        """Send without ever blocking the loop: a client whose socket is full
        is not reading its replies, and is dropped."""
        if session.sock.fileno() < 0:
            return
        try:
            protocol.send(session.sock, msg, fds)
        except OSError as e:
            self.client_log.warning("client pid %d: reply failed (%s); dropping it", session.pid, e)
            self.drop(session, "not reading its replies")

    def drop(self, session: Session, reason: str) -> None:
        """A client that leaves (or misbehaves) loses its regions; their slots
        are freed once their writes return (invariant 7). Every fd still
        queued on the connection is closed with it."""
        fd = session.sock.fileno()
        if fd < 0:
            return
        for rid in list(session.regions):
            region = self.engine.regions.get(rid)
            if region is not None:
                self.engine.close_region(region, f"client pid {session.pid} {reason}")
        self.sessions.pop(fd, None)
        session.deadline = None
        try:
            self.epoll.unregister(fd)
        except OSError:
            pass
        session.buf.close()
        session.proc_status.close()
        if session.pidfd >= 0:
            os.close(session.pidfd)
            session.pidfd = -1
        session.sock.close()


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _say_and_close(sock: socket.socket, error: str) -> None:
    """Answer a connection the daemon will not serve, then close it. The
    reply is small and the socket fresh, so it fits without blocking."""
    try:
        sock.setblocking(False)
        protocol.send(sock, {"ok": False, "error": error})
    except OSError:
        pass
    sock.close()
