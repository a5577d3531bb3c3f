"""The fork requests of the protocol (docs/protocol.md, design section 7) on
the socket side: fork_begin (a parent's regions snapshotted for its child,
within its uid's limits), fork_child (a snapshot's memfd for the child to
map) and fork_attach (the child's copy checked as an alloc and made live).
The snapshots themselves are fork.py's.

A refusal is an answer: the parent's regions and the connection live on.
Engine thread, page lock held; lines are logged as `uswap.server`, through
the server's rate-limited client log."""
from __future__ import annotations

import os

from uswap.config import Config
from uswap.daemon.connections import Connections, Session
from uswap.daemon.engine import Engine
from uswap.daemon.fork import ForkRefused
from uswap.daemon.golive import GoLive
from uswap.daemon.ratelimit import RateLimitedLog
from uswap.daemon.region import PAGE, RegionRefused
from uswap.daemon.uidlimits import uid_refusal


class ForkOps:
    """Serves fork_begin, fork_child and fork_attach (Ops.handle)."""

    def __init__(self, cfg: Config, engine: Engine, conns: Connections, client_log: RateLimitedLog,
                 go_live: GoLive) -> None:
        self.cfg = cfg
        self.engine = engine
        self.conns = conns
        self.client_log = client_log
        self.go_live = go_live

    def handle(self, session: Session, op: str, msg: dict, fds: list[int], sender_pid: int) -> None:
        """Fork requests (daemon/fork.py). A refusal is an answer: the
        parent's regions and the connection live on. `fds` is closed by the
        caller (Connections._dispatch) unless a region takes them (then it is emptied)."""
        fork = self.engine.fork
        try:
            if op == "fork_begin":
                ids = msg.get("regions")
                if (not isinstance(ids, list) or len(set(map(repr, ids))) != len(ids)
                        or not all(isinstance(i, int) and not isinstance(i, bool) and i in session.regions for i in ids)):
                    raise ForkRefused(f"fork_begin: regions {ids!r} must be a list of distinct live"
                                      f" region ids of this client, from {sorted(session.regions)}")
                regions = [r for r in (self.engine.regions[i] for i in ids) if not r.closing]
                refusal = uid_refusal(self.cfg, self.engine, self.conns, "fork_begin", session.uid,
                                      [r.size for r in regions])
                if refusal is not None:
                    raise ForkRefused(refusal)
                token, keep_w, done = fork.begin(regions, session.uid)
                try:
                    self.conns.reply(session, {"ok": True, "token": token, "regions": done}, [keep_w])
                finally:
                    os.close(keep_w)
            elif op == "fork_child":
                region = fork.memfd_for(msg.get("token"), msg.get("region"))
                self.conns.reply(session, {"ok": True, "size": region.size, "addr": region.addr}, [region.memfd])
            else:
                if len(fds) != 1:
                    raise ForkRefused(f"fork_attach needs exactly 1 file descriptor (the uffd), got {len(fds)}")
                pending = fork.memfd_for(msg.get("token"), msg.get("region"))
                # The same check as an alloc's, over each part the child maps
                # (fork.py: the parts its parent had mapped in place): really
                # registered MISSING|WP|MINOR, mapping the snapshot's memfd.
                memfd_stat = os.fstat(pending.memfd)
                for first, n in fork.runs_for(msg.get("token"), msg.get("region")):
                    self.go_live.check_registration_unlocked(sender_pid, pending.addr + first * PAGE, n * PAGE,
                                                             memfd_stat, pending.addr, "fork_attach")
                region = fork.attach(msg.get("token"), msg.get("region"), fds[0], session)
                fds.clear()  # the region owns the uffd now
                self.go_live.serve(session, region)
                fork.poison_after_attach(region)
                self.conns.reply(session, {"ok": True, "region": region.id})
        except (ForkRefused, RegionRefused, OSError) as e:
            reason = str(e) if isinstance(e, (ForkRefused, RegionRefused)) else f"{op}: {e}"
            self.client_log.warning("client pid %d: %s", session.pid, reason)
            self.conns.reply(session, {"ok": False, "error": reason})
