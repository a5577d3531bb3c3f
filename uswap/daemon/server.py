"""The daemon's event loop: one thread, one epoll over the listening socket,
client sockets, every region's userfaultfd, the I/O completion eventfd and
the signal wake-up pipe. It never blocks on store I/O (invariant 4)."""
from __future__ import annotations

import errno
import logging
import os
import select
import signal
import socket
import stat
import struct
import time

from uswap import protocol, uffd
from uswap.config import Config
from uswap.daemon.engine import Engine
from uswap.daemon.region import Region, RegionRefused, validate_and_open
from uswap.store.base import Store

log = logging.getLogger("uswap.server")


class Session:
    """One client connection."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = protocol.MessageBuffer()
        self.greeted = False
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
        # path's threads; it lets go only while it sleeps in epoll_wait.
        engine.lock()
        while True:
            if self.stop_requested and not engine.draining:
                self._close_listener()
                engine.start_drain()
            if engine.drain_done():
                break
            timeout = engine.run_timers()
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
        self.epoll.unregister(self.listener.fileno())
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

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            if len(self.sessions) >= self.cfg.max_clients:
                log.warning("refusing a client: max_clients (%d) reached", self.cfg.max_clients)
                sock.close()
                continue
            sock.setblocking(False)
            session = Session(sock)
            self.sessions[sock.fileno()] = session
            self.epoll.register(sock.fileno(), select.EPOLLIN | select.EPOLLRDHUP)

    def _on_session(self, session: Session) -> None:
        try:
            data, fds, flags, _addr = socket.recv_fds(session.sock, 65536, protocol.MAX_FDS)
        except BlockingIOError:
            return
        except OSError as e:
            self._drop(session, f"recv failed: {e}")
            return
        if not data:
            for fd in fds:
                os.close(fd)
            self._drop(session, "disconnected")
            return
        try:
            if flags & socket.MSG_CTRUNC:
                for fd in fds:
                    os.close(fd)
                raise protocol.ProtocolError(f"more than {protocol.MAX_FDS} file descriptors in one message")
            session.buf.feed(data, fds)
            while True:
                item = session.buf.next()
                if item is None:
                    break
                msg, msg_fds = item
                self._handle(session, msg, msg_fds)
                if session.sock.fileno() < 0:
                    return
        except protocol.ProtocolError as e:
            log.warning("client pid %d: %s; dropping it", session.pid, e)
            self._reply(session, {"ok": False, "error": str(e)})
            self._drop(session, "protocol error")

    def _handle(self, session: Session, msg: dict, fds: list[int]) -> None:
        op = msg["op"]
        if op != "alloc":
            for fd in fds:
                os.close(fd)
            if fds:
                raise protocol.ProtocolError(f"op {op!r} carries no file descriptors")
        if not session.greeted:
            if op != "hello":
                raise protocol.ProtocolError(f"first message must be hello, got {op!r}")
            if msg.get("version") != protocol.VERSION:
                raise protocol.ProtocolError(
                    f"protocol version {msg.get('version')!r} not supported; this daemon speaks {protocol.VERSION}")
            session.greeted = True
            self._reply(session, {"ok": True, "version": protocol.VERSION, "page_size": 4096})
        elif op == "alloc":
            self._alloc(session, msg, fds)
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

    def _memfds_in_use(self) -> set[tuple[int, int]]:
        out = set()
        for region in self.engine.regions.values():
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

    def _alloc(self, session: Session, msg: dict, fds: list[int]) -> None:
        if len(fds) != 2:
            for fd in fds:
                os.close(fd)
            raise protocol.ProtocolError(f"alloc needs exactly 2 file descriptors (uffd, memfd), got {len(fds)}")
        if self.engine.draining:
            for fd in fds:
                os.close(fd)
            self._reply(session, {"ok": False, "error": "daemon is draining; no new regions"})
            return
        try:
            other = self._overlapping_region(session.pid, msg.get("addr"), msg.get("size"))
            if other is not None:
                raise RegionRefused(f"alloc: the range overlaps region {other.id} of this process")
            region = validate_and_open(msg, fds, self.cfg.max_region_size, session,
                                       in_use=self._memfds_in_use())
        except (RegionRefused, OSError, OverflowError) as e:
            # A refused alloc is an answer, not a reason to drop the client: its
            # other regions live on this connection.
            for fd in fds:
                os.close(fd)
            reason = str(e) if isinstance(e, RegionRefused) else f"alloc: {e}"
            log.warning("client pid %d: %s", session.pid, reason)
            self._reply(session, {"ok": False, "error": reason})
            return
        fast = self.engine.add_region(region)
        session.regions.add(region.id)
        session.allocated.add(region.id)
        if not fast:  # the fast path's threads read the uffds of the others
            self.uffd_regions[region.uffd] = region
            self.epoll.register(region.uffd, select.EPOLLIN)
        log.info("client pid %d: region %d of %d bytes", session.pid, region.id, region.size)
        self._reply(session, {"ok": True, "region": region.id})

    def _reply(self, session: Session, msg: dict) -> None:
        """Send without ever blocking the loop: a client whose socket is full
        is not reading its replies, and is dropped."""
        if session.sock.fileno() < 0:
            return
        try:
            protocol.send(session.sock, msg)
        except OSError as e:
            log.warning("client pid %d: reply failed (%s); dropping it", session.pid, e)
            self._drop(session, "not reading its replies")

    def _drop(self, session: Session, reason: str) -> None:
        """A client that leaves (or misbehaves) loses its regions; their slots
        are freed once their writes return (invariant 7)."""
        fd = session.sock.fileno()
        if fd < 0:
            return
        for rid in list(session.regions):
            region = self.engine.regions.get(rid)
            if region is not None:
                self.engine.close_region(region, f"client pid {session.pid} {reason}")
        self.sessions.pop(fd, None)
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
                    "resident_bytes": (t.count(pt.RESIDENT) + t.count(pt.WRITEBACK)) * 4096,
                    "swapped_bytes": (t.count(pt.SWAPPED) + t.count(pt.LOADING)) * 4096,
                })
            clients.append({"pid": session.pid, "uid": session.uid, "regions": regions})
        st["clients"] = clients
        return st


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
