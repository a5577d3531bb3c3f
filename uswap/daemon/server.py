"""The daemon's event loop: one thread, one epoll over the listening socket,
client sockets, every region's userfaultfd, the I/O completion eventfd and
the signal wake-up pipe. It never blocks on store I/O (invariant 4)."""
from __future__ import annotations

import errno
import heapq
import logging
import os
import select
import signal
import socket
import stat
import resource
import struct
import time

from uswap import protocol, uffd
from uswap.config import Config
from uswap.daemon.engine import Engine
from uswap.daemon.fork import ForkRefused
from uswap.daemon.ratelimit import RateLimitedLog
from uswap.daemon.region import Region, RegionRefused, check_registration, validate_and_open
from uswap.store.base import Store

log = logging.getLogger("uswap.server")

# File descriptors the daemon itself needs besides its clients' (store, epoll,
# eventfds, NFS sockets of the I/O threads, the fast path's, logging, slack).
NOFILE_OWN = 512
# How long accepting pauses when not even the reserve fd frees a slot.
ACCEPT_PAUSE_S = 0.1


def nofile_needed(cfg: Config) -> int:
    """Open files the daemon can need at its configured limits: one socket per
    connection, and a uffd and a memfd per region of every client."""
    connections = cfg.max_clients + cfg.control_connections
    return NOFILE_OWN + connections + 2 * cfg.max_clients * cfg.max_regions_per_client


def raise_nofile_limit(cfg: Config) -> int:
    """Raise the soft RLIMIT_NOFILE toward the hard limit, as far as the
    configured limits need (the default soft limit of a service, 1024, holds
    only ~500 regions). Logs what it set; returns the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = nofile_needed(cfg)
    ceiling = hard if hard != resource.RLIM_INFINITY else max(soft, needed)
    target = min(ceiling, max(soft, needed))
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as e:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, e)
    log.info("open-file limit %d (hard %d); %d wanted for max_clients %d x max_regions_per_client %d",
             soft, hard, needed, cfg.max_clients, cfg.max_regions_per_client)
    if soft < needed:
        log.warning("open-file limit %d is below the %d the settings can need: about %d regions fit in"
                    " all; past that allocs are refused with EMFILE (raise LimitNOFILE)",
                    soft, needed, max(0, (soft - NOFILE_OWN) // 2))
    return soft


def out_of_fds_error(what: str) -> str:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return (f"daemon out of file descriptors (EMFILE): {what}; its open-file limit is {soft}."
            " Nothing was lost and the connection stays; free regions or try again later"
            " (the administrator can raise LimitNOFILE)")


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
        self.regions: set[int] = set()      # live regions
        self.allocated: set[int] = set()    # regions allocated and not yet freed by the client
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        self.pid, self.uid, self.gid = struct.unpack("3i", creds)


class Server:
    def __init__(self, cfg: Config, store: Store, inject=None) -> None:
        self.cfg = cfg
        self.store = store
        self.inject = inject
        self.engine = Engine(cfg, store)
        self.engine.on_region_closing = self._unwatch_region
        self.started = time.monotonic()
        self.epoll = select.epoll()
        self.sessions: dict[int, Session] = {}
        self.uffd_regions: dict[int, Region] = {}
        self.events = uffd.EventReader()
        self.stop_requested = False
        # Every line a client can cause goes through this, on a budget apart
        # from the store's error lines.
        self.client_log = RateLimitedLog(log, cfg.error_log_interval, cfg.error_log_burst)
        raise_nofile_limit(cfg)
        # Kept open to be closed when accept() fails with EMFILE: the freed
        # slot lets the daemon accept the waiting connection and tell it why
        # it cannot stay, instead of leaving it hanging or dying.
        self.reserve_fd = self._open_reserve()
        self.accept_paused_until: float | None = None
        self.deadlines: list[tuple[float, int, Session]] = []  # heap; stale entries skipped
        self.deadline_seq = 0
        self.listener = self._listen(cfg.socket)
        self.epoll.register(self.listener.fileno(), select.EPOLLIN)
        self.epoll.register(self.engine.io.eventfd, select.EPOLLIN)
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.epoll.register(self.wake_r, select.EPOLLIN)

    # ---------------------------------------------------------------- setup

    @staticmethod
    def _listen(path: str) -> socket.socket:
        parent = os.path.dirname(path) or "."
        os.makedirs(parent, mode=0o755, exist_ok=True)
        if os.path.lexists(path):
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise ValueError(f"socket: {path!r} exists and is not a socket")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)  # stale socket of a daemon that is gone
            else:
                raise ValueError(f"socket: another uswap daemon is listening on {path!r}")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        # Accepted sockets inherit it: every message from then on carries its
        # writer's pid, even one sent before the daemon got to accept().
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        sock.bind(path)
        os.chmod(path, 0o660)
        sock.listen(64)
        return sock

    def _on_signal(self, signum: int, frame: object) -> None:
        if not self.stop_requested:
            log.info("signal %d: draining", signum)
        self.stop_requested = True

    # ---------------------------------------------------------------- loop

    def run(self) -> int:
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        log.info("ready: store %s (%d bytes), max_resident %d bytes, socket %s",
                 self.store.url, self.store.size_bytes, self.cfg.max_resident, self.cfg.socket)
        _sd_notify("READY=1")
        engine = self.engine
        more = False
        # The engine runs holding the page lock it shares with the fast
        # path's threads; it lets go only while it sleeps in epoll_wait, and
        # between two events while an alloc's smaps are read
        # (_check_registration_unlocked).
        engine.lock()
        while True:
            if self.stop_requested and not engine.draining:
                self._close_listener()
                engine.start_drain()
            if engine.drain_done():
                break
            timeout = _earliest(engine.run_timers(), self._run_session_timers())
            if more:
                timeout = 0  # reclaim has more to do: look for events, don't sleep
            engine.unlock()
            try:
                ready = self.epoll.poll(-1 if timeout is None else timeout)
            finally:
                engine.lock()
            for fd, mask in ready:
                if fd in self.uffd_regions:
                    self._on_uffd(fd)
                elif fd in self.sessions:
                    self._on_session(self.sessions[fd])
                elif fd == self.listener.fileno():
                    self._accept()
                elif fd == self.wake_r:
                    try:
                        os.read(self.wake_r, 4096)
                    except BlockingIOError:
                        pass
            engine.on_completions()
            more = engine.settle()
        _sd_notify("STOPPING=1")
        engine.hand_back_all()
        for session in list(self.sessions.values()):
            self._drop(session, "daemon stopping")
        engine.unlock()
        engine.stop_fast_path()
        engine.punch_io.stop()  # before io.stop(), which closes the eventfd they share
        engine.io.stop()
        if engine.cpool is not None:
            engine.cpool.stop()
        self.store.close()
        log.info("drained: every page is home, store released")
        if self.listener.fileno() >= 0:
            self._close_listener()
        return 0

    def _close_listener(self) -> None:
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

    def _on_uffd(self, fd: int) -> None:
        """Read a region's fault events (a region the fast path's threads do
        not watch) and hand them to the engine.

        The read is made without the page lock: the uffd's open file is
        shared with the client, which can clear its O_NONBLOCK, and nothing
        may wait on a client while holding the lock. The read itself never
        blocks either (RWF_NOWAIT, native/uffd_copy.h), so a client that
        clears the flag cannot stall this loop. Releasing the lock here is
        like releasing it in epoll_wait: the engine is between steps, with
        no transition half done. Only this thread reads these uffds, so the
        events are handled in the order the kernel queued them."""
        region = self.uffd_regions[fd]
        err = None
        self.engine.unlock()
        try:
            events = self.events.read(fd)
        except OSError as e:
            err = e
        finally:
            self.engine.lock()
        if err is not None:
            self.engine.close_region(region, f"reading its userfaultfd failed: {err}")
            return
        self.engine.on_events(region, events)

    def _unwatch_region(self, region: Region) -> None:
        if self.uffd_regions.pop(region.uffd, None) is not None:
            try:
                self.epoll.unregister(region.uffd)
            except OSError:
                pass
        owner = region.owner
        if isinstance(owner, Session):
            owner.regions.discard(region.id)

    # ---------------------------------------------------------------- clients

    @staticmethod
    def _open_reserve() -> int:
        try:
            return os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return -1

    def _accept(self) -> None:
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
        self.sessions[sock.fileno()] = session
        self._set_deadline(session, session.deadline)
        self.epoll.register(sock.fileno(), select.EPOLLIN | select.EPOLLRDHUP)

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

    def _set_deadline(self, session: Session, when: float | None) -> None:
        session.deadline = when
        if when is not None:
            self.deadline_seq += 1
            heapq.heappush(self.deadlines, (when, self.deadline_seq, session))

    def _run_session_timers(self) -> float | None:
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
        self._reply(session, {"ok": False, "error": reason})
        self._drop(session, "timed out")

    def _on_session(self, session: Session) -> None:
        try:
            data, fds, flags, sender = protocol.recv_with_creds(session.sock, 65536, protocol.MAX_FDS)
        except BlockingIOError:
            return
        except OSError as e:
            self._drop(session, f"recv failed: {e}")
            return
        if not data:
            _close_fds(fds)
            self._drop(session, "disconnected")
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
            while True:
                frame = session.buf.next()
                if frame is None:
                    break
                self._dispatch(session, frame)
                if session.sock.fileno() < 0:
                    return
            if session.greeted and not session.control_only:
                # A message begun must be finished within handshake_timeout of
                # its first bytes (not of its last: a peer trickling one byte
                # at a time gets no longer), or the connection is closed: a
                # half-sent frame holds buffer memory and its fds.
                partial = session.buf.pending_bytes() > 0
                if partial and session.deadline is None:
                    self._set_deadline(session, time.monotonic() + self.cfg.handshake_timeout)
                elif not partial and session.deadline is not None:
                    self._set_deadline(session, None)
        except protocol.ProtocolError as e:
            self.client_log.warning("client pid %d: %s; dropping it", session.pid, e)
            self._reply(session, {"ok": False, "error": str(e)})
            self._drop(session, "protocol error")

    def _dispatch(self, session: Session, frame: protocol.Frame) -> None:
        """Handle one message. Invariant: every fd that rode on it is closed
        here unless a region took it (then _alloc empties frame.fds), whatever
        the outcome, refusal or ProtocolError."""
        try:
            if frame.fds_lost:
                op = frame.msg.get("op")
                self.client_log.warning("client pid %d: %s refused: out of file descriptors (EMFILE)",
                                        session.pid, op)
                self._reply(session, {"ok": False, "error": out_of_fds_error(
                    f"the file descriptors sent with this {op!r} request could not be received")})
                return
            self._handle(session, frame.msg, frame.fds, frame.sender_pid or session.pid)
        finally:
            _close_fds(frame.fds)
            frame.fds.clear()

    def _handle(self, session: Session, msg: dict, fds: list[int], sender_pid: int) -> None:
        op = msg["op"]
        if op not in ("alloc", "fork_attach") and fds:
            raise protocol.ProtocolError(f"op {op!r} carries no file descriptors")
        if not session.greeted:
            if op != "hello":
                raise protocol.ProtocolError(f"first message must be hello, got {op!r}")
            version = msg.get("version")
            # bool is an int to Python, not to this protocol: true is not 1.
            if type(version) is not int or version != protocol.VERSION:
                raise protocol.ProtocolError(
                    f"protocol version {version!r} not supported; this daemon speaks"
                    f" {protocol.VERSION} (an integer)")
            session.greeted = True
            if not session.control_only:  # control connections keep theirs: one request's time
                self._set_deadline(session, None)
            self._reply(session, {"ok": True, "version": protocol.VERSION, "page_size": 4096})
        elif op == "alloc":
            self._alloc(session, msg, fds, sender_pid)
        elif op == "free":
            rid = msg.get("region")
            if not isinstance(rid, int) or isinstance(rid, bool) or rid not in session.allocated:
                raise protocol.ProtocolError(f"free: no region {rid!r} of this client")
            # The region may already be closing or gone: a client that
            # unregisters before it says "free" makes our next ioctl on the
            # region fail, which closes it. Freeing it again is not an error.
            region = self.engine.regions.get(rid)
            if region is not None:
                self.engine.close_region(region, "freed by client")
            session.allocated.discard(rid)
            self._reply(session, {"ok": True})
        elif op in ("fork_begin", "fork_child", "fork_attach"):
            self._fork_op(session, op, msg, fds, sender_pid)
        elif op == "status":
            self._reply(session, {"ok": True, "status": self.status(asker=session)})
        elif op == "inject":
            if self.inject is None:
                self._reply(session, {"ok": False, "error": "fault injection is not enabled (USWAP_INJECT)"})
                return
            try:
                self.inject.update(msg.get("spec"))
            except (ValueError, TypeError) as e:
                self._reply(session, {"ok": False, "error": str(e)})
                return
            self._reply(session, {"ok": True})
        else:
            raise protocol.ProtocolError(f"unknown op {op!r}")

    def _fork_op(self, session: Session, op: str, msg: dict, fds: list[int], sender_pid: int) -> None:
        """Fork requests (daemon/fork.py). A refusal is an answer: the
        parent's regions and the connection live on. `fds` is closed by the
        caller (_dispatch) unless a region takes them (then it is emptied)."""
        fork = self.engine.fork
        try:
            if op == "fork_begin":
                ids = msg.get("regions")
                if (not isinstance(ids, list) or len(set(map(repr, ids))) != len(ids)
                        or not all(isinstance(i, int) and not isinstance(i, bool) and i in session.regions for i in ids)):
                    raise ForkRefused(f"fork_begin: regions {ids!r} must be a list of distinct live"
                                      f" region ids of this client, from {sorted(session.regions)}")
                regions = [self.engine.regions[i] for i in ids]
                token, keep_w, done = fork.begin([r for r in regions if not r.closing])
                try:
                    self._reply(session, {"ok": True, "token": token, "regions": done}, [keep_w])
                finally:
                    os.close(keep_w)
            elif op == "fork_child":
                region = fork.memfd_for(msg.get("token"), msg.get("region"))
                self._reply(session, {"ok": True, "size": region.size, "addr": region.addr}, [region.memfd])
            else:
                if len(fds) != 1:
                    raise ForkRefused(f"fork_attach needs exactly 1 file descriptor (the uffd), got {len(fds)}")
                pending = fork.memfd_for(msg.get("token"), msg.get("region"))
                # The same check as an alloc's: the child's range must really be
                # registered MISSING|WP|MINOR and map the snapshot's memfd.
                self._check_registration_unlocked(sender_pid, pending.addr, pending.size, os.fstat(pending.memfd))
                region = fork.attach(msg.get("token"), msg.get("region"), fds[0], session)
                fds.clear()  # the region owns the uffd now
                self._adopt(session, region)
                fork.poison_after_attach(region)
                self._reply(session, {"ok": True, "region": region.id})
        except (ForkRefused, RegionRefused, OSError) as e:
            reason = str(e) if isinstance(e, (ForkRefused, RegionRefused)) else f"{op}: {e}"
            self.client_log.warning("client pid %d: %s", session.pid, reason)
            self._reply(session, {"ok": False, "error": reason})

    def _adopt(self, session: Session, region: Region) -> None:
        """A validated region goes live: the engine serves it from now on."""
        fast = self.engine.add_region(region)
        session.regions.add(region.id)
        session.allocated.add(region.id)
        if not fast:  # the fast path's threads read the uffds of the others
            self.uffd_regions[region.uffd] = region
            self.epoll.register(region.uffd, select.EPOLLIN)

    def _memfds_in_use(self) -> set[tuple[int, int]]:
        out = set()
        # A fork's pending child regions are the daemon's own memfds: never a new region.
        for region in list(self.engine.regions.values()) + self.engine.fork.pending_regions():
            st = os.fstat(region.memfd)
            out.add((st.st_dev, st.st_ino))
        return out

    def _overlapping_region(self, pid: int, addr: object, size: object) -> Region | None:
        """A live region of the same process whose range meets [addr, addr+size):
        one range registered in one uffd cannot be two regions."""
        if not isinstance(addr, int) or not isinstance(size, int):
            return None
        for region in self.engine.regions.values():
            owner = region.owner
            if (not region.closing and isinstance(owner, Session) and owner.pid == pid
                    and addr < region.addr + region.size and region.addr < addr + size):
                return region
        return None

    def _check_registration_unlocked(self, pid: int, addr: int, size: int, memfd_stat: os.stat_result) -> None:
        """check_registration without the page lock: reading /proc/PID/smaps
        walks the page tables of every mapping of the client (~150 ms for 2 GiB
        resident), and the fast path's threads must not wait for that. Safe:
        the check reads only /proc and touches no engine state, and the engine
        is between two events here, as consistent as when it sleeps in epoll."""
        self.engine.unlock()
        try:
            check_registration(pid, addr, size, memfd_stat)
        finally:
            self.engine.lock()

    def _alloc_refusal(self, session: Session, msg: dict, fds: list[int]) -> str | None:
        """Why this alloc cannot be served without even looking at its fds, or None."""
        if self.engine.draining:
            return "daemon is draining; no new regions"
        if session.control_only:
            return (f"daemon busy: max_clients ({self.cfg.max_clients}) clients connected; this"
                    " connection may ask for status only. Try again later")
        if len(session.regions) >= self.cfg.max_regions_per_client:
            return (f"alloc: this connection holds {len(session.regions)} regions, the most"
                    f" max_regions_per_client ({self.cfg.max_regions_per_client}) allows;"
                    " free one or use larger regions")
        return None

    def _alloc(self, session: Session, msg: dict, fds: list[int], sender_pid: int) -> None:
        """Serve an alloc. The caller closes `fds` afterwards unless this
        empties the list, which it does only once a region owns them.
        `sender_pid` is the process that sent the fds: its mappings are
        the ones checked."""
        if len(fds) != 2:
            raise protocol.ProtocolError(f"alloc needs exactly 2 file descriptors (uffd, memfd), got {len(fds)}")
        reason = self._alloc_refusal(session, msg, fds)
        region = None
        if reason is None:
            try:
                other = self._overlapping_region(session.pid, msg.get("addr"), msg.get("size"))
                if other is not None:
                    raise RegionRefused(f"alloc: the range overlaps region {other.id} of this process")
                region = validate_and_open(msg, fds, self.cfg.max_region_size, session,
                                           in_use=self._memfds_in_use(), peer_pid=sender_pid,
                                           registration_check=self._check_registration_unlocked)
            except RegionRefused as e:
                reason = str(e)
            except OSError as e:
                reason = (out_of_fds_error("it cannot check this alloc") if e.errno in (errno.EMFILE, errno.ENFILE)
                          else f"alloc: {e}")
            except OverflowError as e:
                reason = f"alloc: {e}"
        if region is None:
            # A refused alloc is an answer, not a reason to drop the client: its
            # other regions live on this connection.
            self.client_log.warning("client pid %d: %s", session.pid, reason)
            self._reply(session, {"ok": False, "error": reason})
            return
        fds.clear()  # the region owns them now
        self._adopt(session, region)
        self.client_log.info("client pid %d: region %d of %d bytes", session.pid, region.id, region.size)
        self._reply(session, {"ok": True, "region": region.id})

    def _reply(self, session: Session, msg: dict, fds: list[int] | None = None) -> None:
        """Send without ever blocking the loop: a client whose socket is full
        is not reading its replies, and is dropped."""
        if session.sock.fileno() < 0:
            return
        try:
            protocol.send(session.sock, msg, fds)
        except OSError as e:
            self.client_log.warning("client pid %d: reply failed (%s); dropping it", session.pid, e)
            self._drop(session, "not reading its replies")

    def _drop(self, session: Session, reason: str) -> None:
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
        session.sock.close()

    # ---------------------------------------------------------------- status

    def status(self, asker: Session | None = None) -> dict:
        from uswap.daemon import pagetable as pt
        st = self.engine.status()
        st["pid"] = os.getpid()
        st["uptime_s"] = round(time.monotonic() - self.started, 3)
        clients = []
        for session in self.sessions.values():
            if session is asker and not session.regions:
                continue  # the status query itself
            regions = []
            for rid in sorted(session.regions):
                region = self.engine.regions.get(rid)
                if region is None or region.closing:
                    continue
                t = region.table
                regions.append({
                    "id": rid, "size_bytes": region.size,
                    "resident_bytes": (t.count(pt.RESIDENT) + t.count(pt.WRITEBACK) + t.count(pt.PUNCHING)) * 4096,
                    "swapped_bytes": (t.count(pt.SWAPPED) + t.count(pt.LOADING)) * 4096,
                })
            clients.append({"pid": session.pid, "uid": session.uid, "regions": regions})
        st["clients"] = clients
        return st


def _earliest(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else min(a, b)


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


def _sd_notify(state: str) -> None:
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            s.send(state.encode())
    except OSError as e:
        log.warning("sd_notify failed: %s", e)
