"""Where the daemon's log lines go and how each is written.

Under journald (systemd's JOURNAL_STREAM names the device and inode of the
stream it connected to stderr) a line carries a `<N>` syslog priority prefix,
which journald strips and files the line under, and no timestamp: journald
stamps every line itself. Anywhere else (a terminal, a file) a line carries
its own time and level name."""
from __future__ import annotations

import logging
import os
import sys

#: Plain stderr: each line says when and how bad.
PLAIN_FORMAT = "%(asctime)s uswap[%(process)d] %(levelname)s %(name)s: %(message)s"
#: Under journald: the priority prefix; time, pid and unit come from the journal.
JOURNAL_FORMAT = "<%(priority)d>%(name)s: %(message)s"

#: logging levels to syslog priorities (sd-daemon(3): <7> debug ... <2> crit).
_PRIORITY = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))


def syslog_priority(levelno: int) -> int:
    """The syslog priority of a logging level (debug and below: 7)."""
    for level, priority in _PRIORITY:
        if levelno >= level:
            return priority
    return 7


class _JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        record.priority = syslog_priority(record.levelno)
        text = super().format(record)
        # A traceback's lines would each land at the default priority: keep
        # them under the record's own.
        return text.replace("\n", f"\n<{record.priority}>")


def stderr_is_journal() -> bool:
    """True when stderr is the stream systemd connected to journald:
    JOURNAL_STREAM is "DEV:INODE" of that stream (systemd.exec(5)). A
    program started from the service with stderr redirected elsewhere
    inherits the variable but not the stream, hence the comparison."""
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    try:
        st = os.fstat(sys.stderr.fileno())
        return (int(dev), int(ino)) == (st.st_dev, st.st_ino)
    except (ValueError, OSError):
        return False


def configure(level: str) -> None:
    """The daemon's logging: to stderr, in the journal's form or the plain one."""
    handler = logging.StreamHandler(sys.stderr)
    if stderr_is_journal():
        handler.setFormatter(_JournalFormatter(JOURNAL_FORMAT))
    else:
        handler.setFormatter(logging.Formatter(PLAIN_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler])
