"""What every signal a service can be sent means to the daemon.

- SIGTERM, SIGINT, SIGQUIT: drain (every page comes home, each region is
  handed back) and exit 0. SIGQUIT's default action would dump core and
  leave every client with pages on the store, so it drains too.
- SIGHUP: reload the config file's runtime settings (config.RELOADABLE: the
  budget, its watermarks, the log level, the per-uid limits), and say in the
  log what changed, what needs a restart, or why the new file was refused.
- SIGUSR1: one status line in the log.
- SIGUSR2: handover to a new daemon (server.py): stop taking new work,
  let the reads and writes in flight end, exit 0 WITHOUT draining; the
  pages stay on the store and the next daemon on the same state directory
  adopts every region (adoption.py).
- SIGALRM, SIGVTALRM, SIGPROF: logged and ignored (their default would kill
  the daemon undrained).
- SIGPIPE: ignored without a word (a client that hangs up mid-reply gets its
  EPIPE like any socket write).
SIGKILL cannot be caught: what survives it is the subject of adoption.

The handlers only record the signal; the event loop (server.py) wakes on its
wake-up fd and acts on the engine thread, holding the page lock, like any
other event.
"""
from __future__ import annotations

import logging
import signal
from typing import Callable

from uswap import config
from uswap.config import Config
from uswap.sizes import format_size

log = logging.getLogger("uswap.signals")

DRAIN = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
RELOAD = signal.SIGHUP
STATUS = signal.SIGUSR1
HANDOVER = signal.SIGUSR2
IGNORED = {
    signal.SIGALRM: "the daemon sets no alarms",
    signal.SIGVTALRM: "the daemon sets no timers",
    signal.SIGPROF: "the daemon is not being profiled",
}


class SignalDesk:
    """The daemon's signal handlers and what the event loop does with them.

    `source` is (config file or None, command-line overrides): the
    configuration is read again from it as at start."""

    def __init__(self, source: tuple[str | None, dict[str, object]]) -> None:
        self.path, self.overrides = source
        self.pending: list[int] = []

    def install(self) -> None:
        for sig in (*DRAIN, RELOAD, STATUS, HANDOVER, *IGNORED):
            signal.signal(sig, self._record)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)

    def _record(self, signum: int, frame: object) -> None:
        self.pending.append(signum)

    def act(self, drain: Callable[[], None], cfg: Config,
            apply: Callable[[Config], None], status_line: Callable[[], str],
            handover: Callable[[str], None]) -> None:
        """Act on the signals received since the last call, in order:
        `drain()` starts the drain, `apply(cfg)` makes a reloaded
        configuration the running one, `status_line()` describes the daemon,
        `handover(why)` starts the handover to a new daemon."""
        while self.pending:
            signum = self.pending.pop(0)
            name = signal.Signals(signum).name
            if signum in DRAIN:
                log.info("%s: draining", name)
                drain()
            elif signum == RELOAD:
                cfg = self._reload(cfg, apply)
            elif signum == STATUS:
                log.info("SIGUSR1: status: %s", status_line())
            elif signum == HANDOVER:
                handover("SIGUSR2")
            else:
                log.info("%s: ignored (%s)", name, IGNORED[signum])

    def _reload(self, running: Config, apply: Callable[[Config], None]) -> Config:
        if self.path is None:
            log.info("SIGHUP: no config file to read again (started without --config); nothing changed")
            return running
        try:
            new, changed, needs_restart = config.reload(self.path, self.overrides, running)
        except ValueError as e:
            log.warning("SIGHUP: reload refused, keeping the running configuration: %s", e)
            return running
        apply(new)
        what = ", ".join(f"{key} {_show(key, old)} -> {_show(key, value)}"
                         for key, (old, value) in changed.items()) or "nothing that applies at runtime changed"
        log.info("SIGHUP: reloaded %s: %s", self.path, what)
        for key in needs_restart:
            log.warning("SIGHUP: %s changed in the file; it takes effect at the next restart", key)
        return new


#: Settings that are sizes in bytes, shown as such.
_SIZES = ("max_resident", "max_region_bytes_per_uid", "max_resident_per_uid")


def _show(key: str, value: object) -> str:
    if key in config.PER_UID_LIMITS and value == 0:
        return "no limit"
    return format_size(value) if key in _SIZES else str(value)
