"""Rate-limited logging, like the kernel's printk_ratelimit()."""
from __future__ import annotations

import logging
import time


class RateLimitedLog:
    """At most `burst` lines per `interval` seconds, whatever their level;
    suppressed lines are counted and reported with the next line that gets
    through. Every line a client (or a failing store) can cause at will goes
    through one of these, so no peer can flood the journal."""

    def __init__(self, logger: logging.Logger, interval: float, burst: int) -> None:
        self.logger = logger
        self.interval = interval
        self.burst = burst
        self.window_start = 0.0
        self.in_window = 0
        self.suppressed = 0

    def error(self, msg: str, *args: object) -> None:
        self.log(logging.ERROR, msg, *args)

    def warning(self, msg: str, *args: object) -> None:
        self.log(logging.WARNING, msg, *args)

    def info(self, msg: str, *args: object) -> None:
        self.log(logging.INFO, msg, *args)

    def log(self, level: int, msg: str, *args: object) -> None:
        if not self.logger.isEnabledFor(level):
            return
        now = time.monotonic()
        if now - self.window_start >= self.interval:
            self.window_start = now
            self.in_window = 0
        if self.in_window >= self.burst:
            self.suppressed += 1
            return
        self.in_window += 1
        if self.suppressed:
            msg += f" ({self.suppressed} similar messages suppressed)"
            self.suppressed = 0
        self.logger.log(level, msg, *args)
