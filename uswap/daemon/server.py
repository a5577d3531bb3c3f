"""The daemon's event loop and lifecycle, on the engine thread: one epoll over
the listening socket and client sockets (connections.py, whose messages the
ops in ops.py, forkops.py and adoptop.py serve), the completion eventfd (poked by the Python and C I/O
pools, and by the fault fast path's threads when they pass records on or
cross the high watermark), the signal wake-up pipe, and the userfaultfds of
the regions the fast path's C threads do not read (every region's when there
is no fast path); signals, drain and stop; sd_notify (notify.py) from the
loop itself, so a hung loop misses its watchdog. It holds the page lock
whenever it runs, letting go only in epoll_wait, while it reads a uffd
(_on_uffd) and while it reads an alloc's smaps (GoLive.check_registration_unlocked
in golive.py); it never blocks on store I/O (invariant 4)."""
from __future__ import annotations

import logging
import os
import select
import signal
import time

from uswap import uffd
from uswap.config import PAGE, Config
from uswap.daemon import pagetable as pt
from uswap.daemon import metrics
from uswap.daemon.autobudget import BudgetControl
from uswap.daemon.connections import Connections, Session
from uswap.daemon.engine import Engine
from uswap.daemon import heap
from uswap.daemon.fdlimits import raise_nofile_limit
from uswap.daemon.listener import Listener
from uswap.daemon.notify import Notifier
from uswap.daemon.metrics import MetricsServer
from uswap.daemon.ops import Ops
from uswap.daemon.ratelimit import RateLimitedLog
from uswap.daemon.region import Region
from uswap.daemon.signals import SignalDesk
from uswap.sizes import format_size
from uswap.daemon.statedir import StateDir
from uswap.store.base import Store

log = logging.getLogger("uswap.server")
# Handover: how often the loop looks at the I/O in flight, and how long it
# waits for it at most (a store that does not answer must not keep an
# upgrade waiting; the successor resolves what is left, adoption.py).
HANDOVER_POLL = 0.02
HANDOVER_PATIENCE = 30


class Server:
    def __init__(self, cfg: Config, store: Store, listener: Listener, inject=None,
                 config_source: tuple[str | None, dict[str, object]] = (None, {}),
                 metrics_server: MetricsServer | None = None, statedir: StateDir | None = None) -> None:
        """`listener`: the socket at cfg.socket, bound before the store was
        opened (listener.py). `config_source`: (config file, command-line
        overrides) as the daemon was started with, read again on SIGHUP (signals.py).
        `metrics_server`: the Prometheus endpoint at cfg.metrics_listen, also
        bound before the store was opened (metrics.py), or None. `statedir`:
        where the regions' tables are kept for a successor, and what a dead
        predecessor left to adopt (adoption.py)."""
        self.cfg = cfg
        self.store = store
        self.statedir = statedir
        heap.fix_mmap_threshold()  # before the engine's arrays: freed large blocks leave the heap
        self.engine = Engine(cfg, store, statedir)
        # Handover (SIGUSR2, the `handover` op): when it began, or None.
        self.handover_since: float | None = None
        self.engine.on_region_closing = self._unwatch_region
        self.epoll = select.epoll()
        self.uffd_regions: dict[int, Region] = {}
        self.events = uffd.EventReader()
        self.stop_requested = False
        self.signals = SignalDesk(config_source)
        # Every line a client can cause goes through this, on a budget apart
        # from the store's error lines.
        self.client_log = RateLimitedLog(log, cfg.error_log_interval, cfg.error_log_burst)
        raise_nofile_limit(cfg)
        self.conns = Connections(cfg, self.engine, self.epoll, self.client_log, listener.sock)
        # The budget in force: the config's, `uswap budget`'s or the host's (autobudget.py).
        self.budget = BudgetControl(cfg, self._apply_budget, lambda: self.engine.region_set.charged * PAGE,
                                    self.engine.region_set.after)
        self.ops = Ops(cfg, self.engine, self.conns, self.client_log, self._watch_region, self.budget, inject,
                       handover=self.begin_handover)
        self.conns.handle = self.ops.handle
        self.epoll.register(self.engine.io.eventfd, select.EPOLLIN)
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.epoll.register(self.wake_r, select.EPOLLIN)
        self.notify = Notifier()
        # (monotonic time, faults_total) at the last STATUS= line: faults/s.
        self.faults_seen = (time.monotonic(), 0)
        self.metrics = metrics_server

    def _apply_budget(self, cfg: Config) -> None:
        """The budget control's (autobudget.py): cfg's budget is the engine's now."""
        self.cfg = cfg
        self.engine.set_budget(cfg)

    def _publish_metrics(self) -> None:
        """Engine thread, lock held: a fresh status for the metrics thread, every REFRESH_S."""
        if self.metrics is None:
            return
        self.metrics.publish(self.ops.status())
        self.engine.region_set.after(metrics.REFRESH_S, self._publish_metrics)

    def _on_signals(self) -> None:
        """Act on the signals received (signals.py), on the engine thread."""
        if not self.signals.pending:
            return  # the loop's every turn: nothing to build or call
        def drain() -> None:
            self.stop_requested = True

        def apply(cfg: Config) -> None:
            logging.getLogger("uswap").setLevel(cfg.log_level.upper())
            logging.getLogger().setLevel(cfg.log_level.upper())
            self.budget.configure(cfg)  # sets self.cfg, through _apply_budget
            # Per-uid limits: the connection limit is counted at accept, the
            # region limits at alloc and fork_begin, the resident share at
            # the next settle. Nothing a uid holds already is taken away.
            self.conns.cfg = cfg
            self.ops.configure(cfg)
            self.engine.shares.set_limit(cfg.max_resident_per_uid)

        def status_line() -> str:
            st = self.engine.status()
            return (f"resident {st['resident_bytes']} of {st['max_resident_bytes']} bytes, "
                    f"swapped {st['swapped_bytes']} bytes, {len(self.conns.sessions)} connections, "
                    f"{len(self.engine.regions)} regions")

        self.signals.act(drain, self.cfg, apply, status_line, self.begin_handover)

    # ---------------------------------------------------------------- loop

    def run(self) -> int:
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        self.signals.install()
        engine = self.engine
        engine.adoption.start()
        more = False
        # The engine runs holding the page lock it shares with the fast
        # path's threads; it lets go only while it sleeps in epoll_wait, and
        # between two events while an alloc's smaps are read
        # (GoLive.check_registration_unlocked, golive.py).
        engine.lock()
        self._publish_metrics()  # before "ready": a scrape from then on sees the daemon
        log.info("ready: store %s (%d bytes), max_resident %d bytes, socket %s",
                 self.store.url, self.store.size_bytes, self.cfg.max_resident, self.cfg.socket)
        self.notify.ready(self._status_summary())
        while True:
            self._on_signals()
            if self.handover_since is not None:
                if self._handover_done():
                    break
            elif self.stop_requested and not engine.draining:
                self.conns.close_listener()
                engine.start_drain()
                self.notify.stopping(self._status_summary())
            if engine.drain_done():
                break
            if self.handover_since is None:
                timeout = _earliest(engine.run_timers(), self.conns.run_timers())
            else:
                # Handing over: no timer starts new work (a retry, a probe);
                # look at the I/O in flight often.
                timeout = _earliest(HANDOVER_POLL, self.conns.run_timers())
            # Sent from here, between two events, so only a turning loop pings.
            timeout = _earliest(timeout, self.notify.tick(self._status_summary,
                                                          (len(engine.regions), engine.draining),
                                                          engine.draining))
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
                elif fd in self.conns.sessions:
                    self.conns.on_session(self.conns.sessions[fd])
                elif fd == self.conns.listener.fileno():
                    self.conns.accept()
                elif fd == self.wake_r:
                    try:
                        os.read(self.wake_r, 4096)
                    except BlockingIOError:
                        pass
            engine.on_completions()
            more = engine.settle() if self.handover_since is None else False
        if self.handover_since is not None:
            return self._finish_handover()
        engine.hand_back_all()
        for session in list(self.conns.sessions.values()):
            self.conns.drop(session, "daemon stopping")
        self._stop_threads_and_store()
        if self.statedir is not None:
            self.statedir.clear()  # nothing is left for a successor to adopt
        log.info("drained: every page is home, store released")
        if self.conns.listener.fileno() >= 0:
            self.conns.close_listener()
        self.notify.close()
        return 0

    def _status_summary(self) -> str:
        """The one-line STATUS= systemd shows (systemctl status uswap)."""
        engine = self.engine
        now, faults = time.monotonic(), engine.region_set.stats["faults"] + engine.region_set.shared.faults
        then, before = self.faults_seen
        self.faults_seen = (now, faults)
        rate = (faults - before) / (now - then) if now > then else 0.0
        live = [r for r in engine.regions.values() if not r.closing]
        swapped = sum(r.table.count(pt.SWAPPED) + r.table.count(pt.LOADING) for r in live)
        head = "draining: " if engine.draining else ""
        return (f"{head}{_count(len(live), 'region')}, {_count(len(self.conns.sessions), 'connection')}; resident"
                f" {format_size(engine.region_set.charged * PAGE)} of {format_size(engine.budget.max_pages * PAGE)},"
                f" swapped {format_size(swapped * PAGE)}, {rate:.0f} faults/s")

    # ---------------------------------------------------------------- handover

    def begin_handover(self, why: str) -> None:
        """Hand every region over to the next daemon (SIGUSR2, the `handover`
        op): take no new connection and no new fault (the fast path and this
        loop stop reading every uffd: faults wait in the kernel's queue for
        the successor), start no new write, read or eviction, let the I/O in
        flight end (_handover_done), and exit 0 without draining. Every
        page table is in the state directory; the next daemon adopts them."""
        if self.handover_since is not None or self.engine.draining:
            log.info("%s: ignored: the daemon is already %s", why,
                     "handing over" if self.handover_since is not None else "draining")
            return
        if self.statedir is None:
            log.warning("%s: refused: no state directory, a successor could adopt nothing", why)
            return
        self.handover_since = time.monotonic()
        self.engine.region_set.handing_over = True
        self.conns.close_listener()
        for region in list(self.engine.regions.values()):
            self._unwatch_uffd(region)
            if self.engine.fp is not None:
                self.engine.fp.close(region)
        log.info("%s: handing over to the next daemon: %d regions stay on the store (state in %s);"
                 " letting the I/O in flight end", why, len(self.engine.regions), self.statedir.path)

    def _handover_done(self) -> bool:
        """True once no store read, write or punch is in flight (or after
        HANDOVER_PATIENCE: what is still in flight then is resolved by the
        successor like after a crash, adoption.py)."""
        rs, engine = self.engine.region_set, self.engine
        busy = rs.writes_inflight + rs.loads_inflight + rs.shared.inflight + len(engine.puncher.jobs)
        if engine.fp is not None:
            # A fault thread that read an event before its region closed (an
            # UNMAP: the kernel gives it once) passes it on as it leaves;
            # _finish_handover applies it.
            busy += sum(engine.fp.inflight(region) for region in engine.regions.values())
        if busy == 0:
            return True
        if time.monotonic() - self.handover_since > HANDOVER_PATIENCE:
            log.warning("handover: %d I/O jobs still in flight after %ds; the next daemon redoes them", busy,
                        HANDOVER_PATIENCE)
            return True
        return False

    def _stop_threads_and_store(self) -> None:
        """The end of a drain or a handover: the page lock let go, the fault,
        punch and I/O threads stopped, the store closed (its lock released),
        the metrics endpoint closed."""
        engine = self.engine
        engine.unlock()
        engine.stop_fast_path()
        engine.punch_io.stop()  # before io.stop(), which closes the eventfd they share
        engine.io.stop()
        if engine.cpool is not None:
            engine.cpool.stop()
        self.store.close()
        if self.metrics is not None:
            self.metrics.close()

    def _finish_handover(self) -> int:
        """Exit without draining: the threads stop, the store is closed (its
        lock released for the successor), the state directory stays."""
        n = len(self.engine.regions)
        # The last events the fast path's threads read (no thread reads any
        # more: _handover_done) go into the tables the successor adopts.
        self.engine.on_completions()
        self._stop_threads_and_store()
        log.info("handover: done in %.3fs: %d regions left for the next daemon in %s, nothing drained",
                 time.monotonic() - self.handover_since, n, self.statedir.path)
        self.notify.stopping(f"handed over: {n} regions left for the next daemon")
        self.notify.close()
        return 0

    # ---------------------------------------------------------------- uffds read here

    def _watch_region(self, region: Region) -> None:
        """A region the fast path's threads do not serve: this loop reads its uffd."""
        self.uffd_regions[region.uffd] = region
        self.epoll.register(region.uffd, select.EPOLLIN)

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

    def _unwatch_uffd(self, region: Region) -> None:
        if self.uffd_regions.pop(region.uffd, None) is not None:
            try:
                self.epoll.unregister(region.uffd)
            except OSError:
                pass

    def _unwatch_region(self, region: Region) -> None:
        self._unwatch_uffd(region)
        owner = region.owner
        if isinstance(owner, Session):
            owner.regions.discard(region.id)


def _earliest(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else min(a, b)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
