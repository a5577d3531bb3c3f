"""The protocol's operations (docs/protocol.md), on the engine thread with
the page lock held: hello, alloc, free, discard, status, budget, handover
and inject here; the fork requests are forkops.py's and `adopt` is
adoptop.py's, dispatched from `Ops.handle`. Each validates its message and
answers through the connection (connections.py); an alloc that passes
every check (its fds, its size, no overlap, its registration read from
smaps) goes live (golive.py): the engine serves it from then on.

A refusal is an answer and the connection lives on; a ProtocolError raised
here makes connections.py drop the connection. Lines are logged as
`uswap.server`, through the server's rate-limited client log."""
from __future__ import annotations

import errno
import os
import time
from typing import Callable

from uswap import protocol
from uswap.config import AUTO, Config
from uswap.daemon.adoptop import AdoptOp
from uswap.daemon.autobudget import BudgetControl
from uswap.daemon.connections import Connections, Session
from uswap.daemon.engine import Engine
from uswap.daemon.fdlimits import out_of_fds_error
from uswap.daemon.forkops import ForkOps
from uswap.daemon.golive import GoLive
from uswap.daemon.ratelimit import RateLimitedLog
from uswap.daemon.region import Region, RegionRefused, validate_and_open
from uswap.daemon.report import StatusReport
from uswap.daemon.uidlimits import uid_refusal


class Ops:
    """Serves each message a connection frames (Connections.handle)."""

    def __init__(self, cfg: Config, engine: Engine, conns: Connections, client_log: RateLimitedLog,
                 watch_uffd: Callable[[Region], None], budget: BudgetControl, inject=None,
                 handover: Callable[[str], None] | None = None) -> None:
        self.cfg = cfg
        self.engine = engine
        self.conns = conns
        self.client_log = client_log
        # `watch_uffd` is the server's: a region the fast path's threads do
        # not serve has its uffd read by the event loop.
        self.go_live = GoLive(engine, watch_uffd)
        self.fork_ops = ForkOps(cfg, engine, conns, client_log, self.go_live)
        self.adopt_op = AdoptOp(engine, conns, client_log, self.go_live)
        self.inject = inject
        self.budget = budget  # `uswap budget`, max_resident: auto (autobudget.py)
        self.handover = handover  # the server's: start the handover to a new daemon
        self.report = StatusReport(engine, conns, budget)

    def configure(self, cfg: Config) -> None:
        """A reloaded configuration (SIGHUP): its per-uid limits apply to
        the next alloc or fork_begin; regions already held are kept."""
        self.cfg = cfg
        self.fork_ops.cfg = cfg

    def handle(self, session: Session, msg: dict, fds: list[int], sender_pid: int) -> None:
        """One message of `session`. `fds` is closed by the caller (Connections._dispatch)
        unless a region takes them (then this empties the list)."""
        op = msg["op"]
        if op not in ("alloc", "fork_attach", "adopt") and fds:
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
            session.name = _client_name(msg.get("name"), session.pid)
            session.greeted = True
            if not session.control_only:  # control connections keep theirs: one request's time
                self.conns.set_deadline(session, None)
            self.conns.reply(session, {"ok": True, "version": protocol.VERSION, "page_size": 4096})
        elif op == "alloc":
            self._alloc(session, msg, fds, sender_pid)
        elif op == "free":
            rid = msg.get("region")
            if msg.get("repeated") is True and isinstance(rid, int) and rid not in session.allocated:
                # Sent again after the daemon it was sent to died unanswered
                # (client.py _again_on_the_next_daemon): that daemon freed
                # the region, or left it waiting for adoption here.
                self.engine.adoption.drop_freed(rid, session.pid)
                self.conns.reply(session, {"ok": True})
                return
            if not isinstance(rid, int) or isinstance(rid, bool) or rid not in session.allocated:
                raise protocol.ProtocolError(f"free: no region {rid!r} of this client")
            # The region may already be closing or gone: a client that
            # unregisters before it says "free" makes our next ioctl on the
            # region fail, which closes it. Freeing it again is not an error.
            region = self.engine.regions.get(rid)
            if region is not None:
                self.engine.close_region(region, "freed by client")
            session.allocated.discard(rid)
            self.conns.reply(session, {"ok": True})
        elif op == "discard":
            self._discard(session, msg)
        elif op in ("fork_begin", "fork_child", "fork_attach"):
            self.fork_ops.handle(session, op, msg, fds, sender_pid)
        elif op == "status":
            self.conns.reply(session, {"ok": True, "status": self.status(asker=session)})
        elif op == "budget":
            self._budget(session, msg.get("max_resident"))
        elif op == "adopt":
            self.adopt_op.handle(session, msg, fds, sender_pid)
        elif op == "handover":
            # Only root or the daemon's own user may make it exit undrained.
            if session.uid not in (0, os.getuid()):
                self.conns.reply(session, {"ok": False, "error": f"handover: uid {session.uid} may not ask for it;"
                                           f" only root or the daemon's uid {os.getuid()}"})
                return
            self.conns.reply(session, {"ok": True})
            self.handover(f"handover requested by pid {session.pid}")
        elif op == "inject":
            if self.inject is None:
                self.conns.reply(session, {"ok": False, "error": "fault injection is not enabled (USWAP_INJECT)"})
                return
            if "stall_engine" in msg:
                self._stall_engine(session, msg["stall_engine"])
                return
            try:
                self.inject.update(msg.get("spec"))
            except (ValueError, TypeError) as e:
                self.conns.reply(session, {"ok": False, "error": str(e)})
                return
            self.conns.reply(session, {"ok": True})
        else:
            raise protocol.ProtocolError(f"unknown op {op!r}")

    def _discard(self, session: Session, msg: dict) -> None:
        """Discard part of a region (discard.py): answered once its pages
        have left memory, the connection held until then. Bad values are
        refused, the connection kept."""
        rid, offset, length = msg.get("region"), msg.get("offset"), msg.get("length")
        ours = _is_int(rid) and rid in session.allocated
        region = self.engine.regions.get(rid) if ours else None
        reason = None
        if not ours:
            reason = f"discard: no region {rid!r} of this client; its regions are {sorted(session.allocated)}"
        elif not (_is_int(offset) and _is_int(length)) or offset < 0 or length <= 0:
            reason = (f"discard: offset {offset!r} and length {length!r} must be integers,"
                      " offset >= 0 and length > 0")
        elif offset % 4096 or length % 4096:
            reason = f"discard: offset {offset} and length {length} must be multiples of the page size (4096)"
        elif region is not None and offset + length > region.size:
            reason = (f"discard: offset {offset} + length {length} passes the end of region {rid}"
                      f" ({region.size} bytes)")
        if reason is not None:
            self.conns.reply(session, {"ok": False, "error": reason})
            return
        if region is None or region.closing:
            # Closed already (the client unmapped all of it, or an error): nothing is left to discard.
            self.conns.reply(session, {"ok": True})
            return

        def settled(gone: bool) -> None:
            self.conns.reply(session, {"ok": True} if gone else
                             {"ok": False, "error": f"discard: region {rid} was closed meanwhile"})
            self.conns.release(session)

        if self.engine.discard.discard(region, offset >> 12, length >> 12, settled):
            self.conns.reply(session, {"ok": True})
        else:
            self.conns.hold(session)

    def _stall_engine(self, session: Session, seconds: object) -> None:
        """Tests only: the engine thread stops for `seconds` with the page
        lock held, as a hung engine would (a deadlock, a loop that never
        returns to epoll). Answered first, so the asker knows it began."""
        if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or not 0 < seconds <= 60:
            self.conns.reply(session, {"ok": False, "error": f"inject: stall_engine: {seconds!r} is not"
                                                              " accepted; use seconds in (0, 60]"})
            return
        self.conns.reply(session, {"ok": True})
        self.client_log.warning("client pid %d: stalling the engine for %gs (fault injection)", session.pid, seconds)
        time.sleep(seconds)

    def _budget(self, session: Session, value: object) -> None:
        """`uswap budget SIZE|auto`: the budget changes at once (a lower one is
        reached by reclaim, as on SIGHUP). A bad value is an answer naming it.
        The budget is every client's: only root and the daemon's own user may
        change it, as only they may send it SIGHUP."""
        if session.uid not in (0, os.getuid()):
            self.conns.reply(session, {"ok": False, "error": (
                f"budget: uid {session.uid} may not change the daemon's budget; only root"
                f" or the daemon's user (uid {os.getuid()}) may")})
            return
        try:
            old, new = self.budget.set_auto() if value == AUTO else self.budget.set_fixed(value)
        except ValueError as e:
            self.conns.reply(session, {"ok": False, "error": str(e)})
            return
        self.conns.reply(session, {"ok": True, "old_bytes": old, "max_resident_bytes": new,
                                   "mode": self.budget.status()["mode"]})

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

    def _alloc_refusal(self, session: Session, msg: dict, fds: list[int]) -> str | None:
        """Why this alloc cannot be served without even looking at its fds, or None."""
        if self.engine.draining:
            return "daemon is draining; no new regions"
        if self.engine.region_set.handing_over:
            return "daemon is handing over to a new daemon; no new regions here (retry on the new one)"
        if session.control_only:
            return (f"daemon busy: max_clients ({self.cfg.max_clients}) clients connected; this"
                    " connection may ask for status only. Try again later")
        if len(session.regions) >= self.cfg.max_regions_per_client:
            return (f"alloc: this connection holds {len(session.regions)} regions, the most"
                    f" max_regions_per_client ({self.cfg.max_regions_per_client}) allows;"
                    " free one or use larger regions")
        size = msg.get("size")
        if not isinstance(size, int) or isinstance(size, bool):
            return None  # refused later, by validate_and_open, naming the size
        return uid_refusal(self.cfg, self.engine, self.conns, "alloc", session.uid, [size])

    def _alloc(self, session: Session, msg: dict, fds: list[int], sender_pid: int) -> None:
        """Serve an alloc. The caller closes `fds` afterwards unless this
        empties the list, which it does only once a region owns them.
        `sender_pid` is the process that sent the fds: its mappings are
        the ones checked."""
        if len(fds) != 2:
            raise protocol.ProtocolError(f"alloc needs exactly 2 file descriptors (uffd, memfd), got {len(fds)}")
        reason = self._alloc_refusal(session, msg, fds)
        region = None
        orphan = self.engine.adoption.orphan_of_memfd(fds[1]) if reason is None else None
        if orphan is not None:
            # The dead daemon made this region but died before answering; the
            # client asks again (client.py _again_on_the_next_daemon): the
            # answer is that region, adopted, not a second one beside it.
            entry = {"id": orphan.meta["id"], "addr": msg.get("addr"), "size": orphan.meta["size"]}
            try:
                region = self.adopt_op.adopt_one(session, entry, fds[0], fds[1], sender_pid)
            except (RegionRefused, OSError) as e:
                reason = str(e).replace("adopt:", "alloc (repeated after a daemon restart):", 1)
            else:
                fds.clear()  # the region owns them now
                self.client_log.info("client pid %d: alloc repeated after a daemon restart: region %d adopted",
                                     session.pid, region.id)
                self.conns.reply(session, {"ok": True, "region": region.id})
                return
        if reason is None:
            try:
                other = self._overlapping_region(session.pid, msg.get("addr"), msg.get("size"))
                if other is not None:
                    raise RegionRefused(f"alloc: the range overlaps region {other.id} of this process")
                region = validate_and_open(msg, fds, self.cfg.max_region_size, session,
                                           in_use=self._memfds_in_use(), peer_pid=sender_pid,
                                           registration_check=self.go_live.check_registration_unlocked)
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
            self.conns.reply(session, {"ok": False, "error": reason})
            return
        fds.clear()  # the region owns them now
        try:
            self.go_live.serve(session, region)
        except OSError as e:
            # Its table could not be kept in the state directory (EMFILE):
            # refused like any alloc the fd table has no room for.
            region.release()
            reason = (out_of_fds_error("it cannot keep this region's table") if e.errno in (errno.EMFILE, errno.ENFILE)
                      else f"alloc: cannot keep the region's table: {e}")
            self.client_log.warning("client pid %d: %s", session.pid, reason)
            self.conns.reply(session, {"ok": False, "error": reason})
            return
        self.client_log.info("client pid %d: region %d of %d bytes", session.pid, region.id, region.size)
        self.conns.reply(session, {"ok": True, "region": region.id})

    def status(self, asker: Session | None = None) -> dict:
        """The status op's answer (report.py); `asker` sees only its own uid's
        clients unless it is root."""
        return self.report.status(asker)


#: A client's name (hello's "name"): what status, metrics and `uswap top` show.
NAME_MAX = 64


def _client_name(name: object, pid: int) -> str:
    """The name a client gave in hello, else its process's comm. A name
    must be 1 to NAME_MAX printable characters: it is shown in status,
    metrics labels and `uswap top`; anything else refuses the hello."""
    if name is None:
        try:
            with open(f"/proc/{pid}/comm") as f:
                return f.read().strip()
        except OSError:
            return ""
    if not isinstance(name, str) or not 1 <= len(name) <= NAME_MAX or not name.isprintable():
        raise protocol.ProtocolError(f"hello: name {name!r} is not accepted; use 1 to {NAME_MAX}"
                                     " printable characters")
    return name


def _is_int(value: object) -> bool:
    """An integer of the protocol: bool is an int to Python, not to JSON."""
    return isinstance(value, int) and not isinstance(value, bool)
