"""The status op's answer (docs/protocol.md "status"): the engine's counters
(Engine.status) with what only the daemon knows: its version, pid, uptime,
the budget in force (autobudget.py), its own RSS and CPU time, and a line
per client with its regions. Read by `uswap status`, `uswap top` and the
metrics (metrics.py).

Engine thread, page lock held."""
from __future__ import annotations

import os
import time

import psutil

import uswap
from uswap.daemon import pagetable as pt
from uswap.daemon.autobudget import BudgetControl
from uswap.daemon.connections import Connections, Session
from uswap.daemon.engine import Engine

PAGE = 4096


class StatusReport:
    def __init__(self, engine: Engine, conns: Connections, budget: BudgetControl) -> None:
        self.engine = engine
        self.conns = conns
        self.budget = budget
        self.started = time.monotonic()
        self.me = psutil.Process()  # the daemon's own RSS and CPU time

    def status(self, asker: Session | None = None) -> dict:
        """The whole status; `asker` (None: the daemon itself, e.g. for the
        metrics) sees other users' clients only when it is root."""
        st = self.engine.status()
        st["version"] = uswap.__version__
        st["pid"] = os.getpid()
        st["uptime_s"] = round(time.monotonic() - self.started, 3)
        st["budget"] = self.budget.status()
        cpu = self.me.cpu_times()
        st["daemon"] = {"rss_bytes": self.me.memory_info().rss, "cpu_user_seconds_total": cpu.user,
                        "cpu_system_seconds_total": cpu.system}
        st["clients"] = [self._client(session) for session in self.conns.sessions.values()
                         if self._shown(session, asker)]
        return st

    @staticmethod
    def _shown(session: Session, asker: Session | None) -> bool:
        if session is asker and not session.regions:
            return False  # the status query itself
        # Another user's clients are shown to root only.
        return asker is None or asker.uid == 0 or session.uid == asker.uid

    def _client(self, session: Session) -> dict:
        regions = []
        for rid in sorted(session.regions):
            region = self.engine.regions.get(rid)
            if region is None or region.closing:
                continue
            t = region.table
            regions.append({
                "id": rid, "size_bytes": region.size,
                "resident_bytes": (t.count(pt.RESIDENT) + t.count(pt.WRITEBACK) + t.count(pt.PUNCHING)) * PAGE,
                "swapped_bytes": (t.count(pt.SWAPPED) + t.count(pt.LOADING)) * PAGE,
                "faults": self.engine.region_faults(region),
            })
        return {"name": session.name, "pid": session.pid, "uid": session.uid, "regions": regions}
