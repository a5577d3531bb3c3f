"""The budget at runtime: `uswap budget` (the budget op, ops.py) and
`max_resident: auto`, a budget that follows the host.

Automatic budget, in the manner of Meta's senpai: every `auto_interval` the
daemon reads the host's available memory (psutil) and its memory pressure
(PSI, /proc/pressure/memory, where the kernel has it) and sets the budget
(auto_target):
- the budget may take `auto_fraction` of the memory the host could give it:
  what is available plus what the daemon's regions hold now (they would be
  available if it gave them back);
- under pressure (PSI "some" avg10 at or above `auto_pressure` percent) it
  shrinks by AUTO_STEP of itself each interval, so reclaim hands memory back
  to the host;
- without pressure it grows back towards that share, by at most AUTO_STEP
  each interval, so one idle moment does not undo it;
always within [auto_min, auto_max]. Each change is logged with its reason.

Thread: everything here runs on the engine thread, holding the page lock
(the timer runs from the server's loop, the op from ops.py): the budget
changes under that lock, as Engine.set_budget requires.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Callable

import psutil

from uswap.config import MIN_BUDGET, PAGE, Config, parse_budget
from uswap.sizes import format_size

log = logging.getLogger("uswap.budget")

#: The largest change of an automatic budget per interval, as a share of itself.
AUTO_STEP = 0.10
#: A smaller automatic change is not made (nor logged): it is noise.
AUTO_DEADBAND = 0.01
PSI_MEMORY = "/proc/pressure/memory"


@dataclasses.dataclass
class HostMemory:
    available: int                 # bytes (MemAvailable)
    total: int                     # bytes
    pressure: float | None         # PSI memory "some" avg10, percent; None without PSI


def psi_some_avg10(path: str = PSI_MEMORY) -> float | None:
    """The share of the last 10 s in which some task waited for memory
    (percent), or None where the kernel has no PSI."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("some "):
                    fields = dict(part.split("=", 1) for part in line.split()[1:])
                    return float(fields["avg10"])
    except (OSError, ValueError, KeyError):
        return None
    return None


def read_host() -> HostMemory:
    vm = psutil.virtual_memory()
    return HostMemory(available=int(vm.available), total=int(vm.total), pressure=psi_some_avg10())


def auto_target(current: int, ours: int, host: HostMemory, cfg: Config, first: bool = False) -> tuple[int, str]:
    """The automatic budget after `current` (bytes), with `ours` bytes
    resident in the daemon's regions, and why. `first`: the daemon's first
    look at the host, which takes the share at once (no step limit)."""
    share = int(cfg.auto_fraction * (host.available + ours))
    seen = f"host available {format_size(host.available)} of {format_size(host.total)}"
    if host.pressure is not None:
        seen += f", memory pressure {host.pressure:.2f}%"
    if host.pressure is not None and host.pressure >= cfg.auto_pressure:
        target = min(share, int(current * (1 - AUTO_STEP)))
        why = f"shrinking under memory pressure (at or above auto_pressure {cfg.auto_pressure:g}%)"
    elif first or share <= current:
        target = share
        why = f"auto_fraction {cfg.auto_fraction:g} of available plus resident"
    else:
        target = min(share, int(current * (1 + AUTO_STEP)))
        why = ("growing back, no PSI on this host" if host.pressure is None
               else f"growing back, memory pressure below auto_pressure {cfg.auto_pressure:g}%")
    bounded = max(cfg.auto_min, min(cfg.auto_max, target))
    bounded = max(MIN_BUDGET, bounded - bounded % PAGE)
    if bounded != target - target % PAGE:
        why += f", held within auto_min {format_size(cfg.auto_min)} .. auto_max {format_size(cfg.auto_max)}"
    return bounded, f"{why}; {seen}"


class BudgetControl:
    """Who sets the budget of the running daemon: the config (start, SIGHUP),
    `uswap budget`, or the host (max_resident: auto)."""

    def __init__(self, cfg: Config, apply: Callable[[Config], None], resident: Callable[[], int],
                 after: Callable[[float, Callable[[], None]], None]) -> None:
        """`apply(cfg)`: make cfg's budget the engine's (and the server's
        running configuration); `resident()`: bytes the regions hold now;
        `after(delay, fn)`: the engine's timers (RegionSet.after)."""
        self.cfg = cfg
        self.apply = apply
        self.resident = resident
        self.after = after
        self.host: HostMemory | None = None
        self.reason = "max_resident from the configuration"
        self.timer_seq = 0  # a stale timer (auto turned off and on again) does nothing
        self.configure(cfg)

    def configure(self, cfg: Config) -> Config:
        """A configuration to run with (start, SIGHUP): its budget, or the
        host's when it says max_resident: auto. Returns what is in force."""
        self.cfg = cfg
        self.timer_seq += 1
        if cfg.budget_auto:
            self._auto_step(first=True)
            self._arm()
        else:
            self.reason = "max_resident from the configuration"
            self.apply(cfg)
        return self.cfg

    def set_fixed(self, value: object) -> tuple[int, int]:
        """`uswap budget SIZE`: a fixed budget at once (an automatic one
        stops). Returns (old, new) bytes; raises ValueError naming a bad
        value (config.parse_budget)."""
        new = parse_budget(value, self.cfg.store_size)
        old = self.cfg.max_resident
        self.timer_seq += 1
        self.reason = "set by `uswap budget`"
        self._set(dataclasses.replace(self.cfg, max_resident=new, budget_auto=False))
        log.info("budget: max_resident %s -> %s (set by uswap budget)", format_size(old), format_size(new))
        return old, new

    def set_auto(self) -> tuple[int, int]:
        """`uswap budget auto`: follow the host again, within the configured bounds."""
        old = self.cfg.max_resident
        self.configure(dataclasses.replace(self.cfg, budget_auto=True))
        return old, self.cfg.max_resident

    def status(self) -> dict:
        out = {"mode": "auto" if self.cfg.budget_auto else "fixed", "auto": self.cfg.budget_auto,
               "reason": self.reason}
        if self.cfg.budget_auto:
            out.update(auto_min_bytes=self.cfg.auto_min, auto_max_bytes=self.cfg.auto_max,
                       auto_fraction=self.cfg.auto_fraction, auto_pressure=self.cfg.auto_pressure,
                       auto_interval_s=self.cfg.auto_interval)
            if self.host is not None:
                out.update(host_available_bytes=self.host.available, host_total_bytes=self.host.total,
                           memory_pressure=self.host.pressure)
        return out

    # ---------------------------------------------------------------- automatic

    def _set(self, cfg: Config) -> None:
        self.cfg = cfg
        self.apply(cfg)

    def _arm(self) -> None:
        seq = self.timer_seq

        def tick() -> None:
            if seq != self.timer_seq or not self.cfg.budget_auto:
                return  # replaced by a later configuration or a fixed budget
            self._auto_step(first=False)
            self._arm()

        self.after(self.cfg.auto_interval, tick)

    def _auto_step(self, first: bool) -> None:
        self.host = read_host()
        old = self.cfg.max_resident
        new, why = auto_target(old, self.resident(), self.host, self.cfg, first)
        if not first and abs(new - old) < AUTO_DEADBAND * old and new not in (self.cfg.auto_min, self.cfg.auto_max):
            return
        self.reason = why
        if new != old or first:
            self._set(dataclasses.replace(self.cfg, max_resident=new))
        if new != old:
            log.info("budget: auto: max_resident %s -> %s (%s)", format_size(old), format_size(new), why)
